"""PyTorch checkpoints in and out, our model directories and training checkpoints."""
