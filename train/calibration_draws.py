"""`python -m train.calibration_draws` in a checkout: `research.commands.calibration_draws` (not installed)."""
from train import stand_in

stand_in(__name__, "research.commands.calibration_draws")
