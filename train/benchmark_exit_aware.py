"""`python -m train.benchmark_exit_aware` in a checkout: `benchmarks.commands.benchmark_exit_aware` (not installed)."""
from train import stand_in

stand_in(__name__, "benchmarks.commands.benchmark_exit_aware")
