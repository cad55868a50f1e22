"""`python -m train.convert` in a checkout: `deebert_jax.commands.convert` (the command installed as `deebert-convert`)."""
from train import stand_in

stand_in(__name__, "deebert_jax.commands.convert")
