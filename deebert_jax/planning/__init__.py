"""Compiling the product's programs for a Cloud TPU slice without one (`train.plan`)."""
