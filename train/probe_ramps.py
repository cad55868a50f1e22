"""`python -m train.probe_ramps` in a checkout: `research.commands.probe_ramps` (not installed)."""
from train import stand_in

stand_in(__name__, "research.commands.probe_ramps")
