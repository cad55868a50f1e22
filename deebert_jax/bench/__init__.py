"""Benchmarks and profiling: JAX against eager PyTorch, latency and training steps."""
