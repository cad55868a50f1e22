"""`python -m train.predict` in a checkout: `deebert_jax.commands.predict` (the command installed as `deebert-predict`)."""
from train import stand_in

stand_in(__name__, "deebert_jax.commands.predict")
