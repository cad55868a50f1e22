"""`configs/tiny.py` in a checkout: the training config installed with the package
(`deebert_jax/configs/tiny.py`), so both paths name the same values."""

from deebert_jax.configs.tiny import *  # noqa: F401,F403
from deebert_jax.configs.tiny import get_config  # noqa: F401
