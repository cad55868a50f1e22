"""MiniLM-L6 on the full SST-2 training set at length 64, 1 + 1 epochs: about 75 minutes on
2 CPU cores (`configs/glue.py:model=minilm,budget=cpu_full`).

    python -m train.demo --config configs/sst2_full.py --config.workdir=workdirs/results/sst2
"""

from deebert_jax.configs import glue


def get_config():
    return glue.get_config("model=minilm,budget=cpu_full")
