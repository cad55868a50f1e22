"""Random tiny model on the synthetic task: the CI smoke run (well under a minute on CPU)."""

from deebert_jax.configs.common import base_config


def get_config():
    c = base_config()
    c.task = "synthetic"
    c.init_checkpoint = "random"
    c.model.vocab_size = 100
    c.model.hidden_size = 32
    c.model.num_hidden_layers = 2
    c.model.num_attention_heads = 4
    c.model.intermediate_size = 64
    c.model.max_position_embeddings = 64
    c.max_seq_length = 16
    c.train_limit = 512
    c.eval_limit = 100              # not a multiple of devices x batch: exercises eval padding
    c.per_device_batch_size = 4
    c.eval_batch_size = 8
    c.stage1_epochs = 4.0           # 64 steps of 32 on 8 devices: the rule is learnt (dev accuracy ~0.98)
    c.stage2_epochs = 2.0
    c.learning_rate = 3e-3
    c.stage2_learning_rate = 3e-3
    c.warmup_ratio = 0.1
    c.weight_decay = 0.01
    c.workdir = "workdirs/tiny"
    c.save_every_steps = 10
    c.keep_checkpoints = 2
    c.log_every_steps = 5
    return c
