"""The packaged MiniLM-L6 fine-tuned on one GLUE task, then its off-ramps: the paper's recipe
with the step sizes a 6-layer, 384-wide model prefers (`configs/glue.py:model=minilm,budget=paper`).

    python -m train.train --config configs/glue_minilm.py --config.task=SST-2 --config.workdir=workdirs/sst2
"""

from deebert_jax.configs import glue


def get_config():
    return glue.get_config("model=minilm,budget=paper")
