"""`make demo`: MiniLM-L6 on 4000 SST-2 examples at length 64, two stages, threshold sweep and
latency, in about 20 minutes on 2 CPU cores (`configs/glue.py:model=minilm,budget=demo`).

    python -m train.demo --config configs/demo.py [--config.train_limit=0 ...]
"""

from deebert_jax.configs import glue


def get_config():
    return glue.get_config("model=minilm,budget=demo")
