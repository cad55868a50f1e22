"""`python -m train.report` in a checkout: `benchmarks.commands.report` (not installed)."""
from train import stand_in

stand_in(__name__, "benchmarks.commands.report")
