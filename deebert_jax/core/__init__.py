"""Basics: the model config, errors, trees, files, hosts and the process."""
