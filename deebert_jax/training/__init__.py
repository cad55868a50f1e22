"""Two-stage training: the config, the steps and the loop."""
