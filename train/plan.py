"""`python -m train.plan` in a checkout: `deebert_jax.commands.plan` (the command installed as `deebert-plan`)."""
from train import stand_in

stand_in(__name__, "deebert_jax.commands.plan")
