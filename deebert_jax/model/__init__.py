"""The Flax model, its parameter layouts and the inference step every loop runs."""
