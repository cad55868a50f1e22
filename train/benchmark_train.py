"""`python -m train.benchmark_train` in a checkout: `benchmarks.commands.benchmark_train` (not installed)."""
from train import stand_in

stand_in(__name__, "benchmarks.commands.benchmark_train")
