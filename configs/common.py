"""`configs/common.py` in a checkout: the base of the training configs installed with the package
(`deebert_jax/configs/common.py`)."""

from deebert_jax.configs.common import *  # noqa: F401,F403
