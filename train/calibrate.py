"""`python -m train.calibrate` in a checkout: `deebert_jax.commands.calibrate` (the command installed as `deebert-calibrate`)."""
from train import stand_in

stand_in(__name__, "deebert_jax.commands.calibrate")
