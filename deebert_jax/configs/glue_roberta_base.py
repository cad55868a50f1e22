"""The paper's setting for roberta-base (`configs/glue.py:model=roberta_base,budget=paper`): lr 2e-5,
batch 8 per device, 10 epochs per stage, length 128, no warmup, no weight decay, clipping at 1.0.

Needs roberta-base weights: --config.init_checkpoint=/path/to/roberta-base (config.json +
model.safetensors or pytorch_model.bin, with its tokenizer: vocab.json + merges.txt or tokenizer.json).
"""

from deebert_jax.configs import glue


def get_config():
    return glue.get_config("model=roberta_base,budget=paper")
