"""`python -m train.evaluate` in a checkout: `deebert_jax.commands.evaluate` (the command installed as `deebert-evaluate`)."""
from train import stand_in

stand_in(__name__, "deebert_jax.commands.evaluate")
