"""`python -m train.profile_layer` in a checkout: `benchmarks.commands.profile_layer` (not installed)."""
from train import stand_in

stand_in(__name__, "benchmarks.commands.profile_layer")
