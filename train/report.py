"""`python -m train.report` in a checkout: `research.commands.report` (not installed)."""
from train import stand_in

stand_in(__name__, "research.commands.report")
