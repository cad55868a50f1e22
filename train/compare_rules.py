"""`python -m train.compare_rules` in a checkout: `research.commands.compare_rules` (not installed)."""
from train import stand_in

stand_in(__name__, "research.commands.compare_rules")
