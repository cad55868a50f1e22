"""`make demo`: MiniLM-L6 on SST-2, two stages, threshold sweep and latency, in about 20 minutes on 2 CPU cores.

To fit that budget the demo trains on a subset of SST-2 (`train_limit`) at length 64; the
summary says so. `configs/glue_minilm.py` is the full recipe.
    python -m train.demo --config configs/demo.py [--config.train_limit=0 ...]
"""

from configs import glue_minilm


def get_config():
    c = glue_minilm.get_config()
    c.task = "sst2"
    c.max_seq_length = 64           # SST-2 sentences: 99% fit in 64 word pieces
    c.train_limit = 4000            # of 67,349: the 20-minute budget on 2 CPU cores
    c.stage1_epochs = 1.0
    c.stage2_epochs = 3.0           # stage 2 is cheap (no backbone backward): more passes for the ramps
    c.per_device_batch_size = 32
    c.learning_rate = 5e-5
    c.stage2_learning_rate = 2e-3   # measured on cached features: 5e-4 x 1 epoch trains only ramp 5
    c.workdir = "workdirs/demo"
    c.save_every_steps = 50
    c.eval_batch_size = 64
    return c
