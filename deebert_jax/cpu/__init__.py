"""The CPU-tuned kernels (`kernels="cpu_tuned"`) and the process settings that serve them."""
