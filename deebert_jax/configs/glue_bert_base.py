"""The paper's setting for bert-base (`configs/glue.py:model=bert_base,budget=paper`): lr 2e-5,
batch 8 per device, 3 epochs per stage, length 128, no warmup, no weight decay, clipping at 1.0.

Needs bert-base weights: --config.init_checkpoint=/path/to/bert-base-uncased (config.json +
model.safetensors or pytorch_model.bin, with its tokenizer).
"""

from deebert_jax.configs import glue


def get_config():
    return glue.get_config("model=bert_base,budget=paper")
