"""`python -m train.benchmark` in a checkout: `benchmarks.commands.benchmark` (not installed)."""
from train import stand_in

stand_in(__name__, "benchmarks.commands.benchmark")
