"""`train.cli` in a checkout: `deebert_jax.commands.cli`, what every command shares."""
from train import stand_in

stand_in(__name__, "deebert_jax.commands.cli")
