"""`configs/glue_minilm.py` in a checkout: the training config installed with the package
(`deebert_jax/configs/glue_minilm.py`), so both paths name the same values."""

from deebert_jax.configs.glue_minilm import *  # noqa: F401,F403
from deebert_jax.configs.glue_minilm import get_config  # noqa: F401
