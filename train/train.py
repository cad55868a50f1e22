"""`python -m train.train` in a checkout: `deebert_jax.commands.train` (the command installed as `deebert-train`)."""
from train import stand_in

stand_in(__name__, "deebert_jax.commands.train")
