"""`python -m train.profile_step` in a checkout: `benchmarks.commands.profile_step` (not installed)."""
from train import stand_in

stand_in(__name__, "benchmarks.commands.profile_step")
