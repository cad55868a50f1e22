"""`configs/glue_bert_base.py` in a checkout: the training config installed with the package
(`deebert_jax/configs/glue_bert_base.py`), so both paths name the same values."""

from deebert_jax.configs.glue_bert_base import *  # noqa: F401,F403
from deebert_jax.configs.glue_bert_base import get_config  # noqa: F401
