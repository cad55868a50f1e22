"""`python -m train.benchmark_drift` in a checkout: `benchmarks.commands.benchmark_drift` (not installed)."""
from train import stand_in

stand_in(__name__, "benchmarks.commands.benchmark_drift")
