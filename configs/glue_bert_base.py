"""The paper's setting for bert-base (castorini/DeeBERT scripts): lr 2e-5, batch 8 per device,
3 epochs per stage, length 128, no warmup, no weight decay, clipping at 1.0, seed 42.

Needs bert-base weights: --config.init_checkpoint=/path/to/bert-base-uncased (config.json +
model.safetensors or pytorch_model.bin, with its tokenizer).
"""

from configs.common import base_config


def get_config():
    c = base_config()
    c.task = "sst2"
    c.init_checkpoint = "google-bert/bert-base-uncased"   # a hub id (online) or a local directory
    c.max_seq_length = 128
    c.per_device_batch_size = 8
    c.eval_batch_size = 32
    c.stage1_epochs = 3.0
    c.stage2_epochs = 3.0
    c.learning_rate = 2e-5
    c.stage2_learning_rate = 2e-5
    c.warmup_ratio = 0.0
    c.weight_decay = 0.0
    c.max_grad_norm = 1.0
    c.seed = 42
    c.workdir = "workdirs/glue_bert_base"
    return c
