"""`python -m train.benchmark_serve` in a checkout: `benchmarks.commands.benchmark_serve` (not installed)."""
from train import stand_in

stand_in(__name__, "benchmarks.commands.benchmark_serve")
