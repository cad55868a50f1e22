"""`python -m train.demo` in a checkout: `benchmarks.commands.demo` (not installed)."""
from train import stand_in

stand_in(__name__, "benchmarks.commands.demo")
