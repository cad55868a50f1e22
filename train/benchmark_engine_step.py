"""`python -m train.benchmark_engine_step` in a checkout: `benchmarks.commands.benchmark_engine_step` (not installed)."""
from train import stand_in

stand_in(__name__, "benchmarks.commands.benchmark_engine_step")
