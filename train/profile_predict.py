"""`python -m train.profile_predict` in a checkout: `benchmarks.commands.profile_predict` (not installed)."""
from train import stand_in

stand_in(__name__, "benchmarks.commands.profile_predict")
