"""`python -m train.monitoring_coverage` in a checkout: `research.commands.monitoring_coverage` (not installed)."""
from train import stand_in

stand_in(__name__, "research.commands.monitoring_coverage")
