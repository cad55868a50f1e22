"""Fields shared by the training configs (`python -m train.train --config configs/NAME.py`)."""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Data
    c.task = "sst2"                 # sst2 mrpc rte qnli qqp mnli cola synthetic (SST-2 spellings work too)
    c.glue_dir = ""                 # GLUE TSV folder; "" -> $GLUE_DIR, else the nyu-mll/glue hub
    c.max_seq_length = 128
    c.train_limit = 0               # keep the first N training examples (0: all)
    c.eval_limit = 0                # keep the first N dev examples (0: all)
    # Hold out the last N rows of the training split: no stage ever sees them. After stage 2 they
    # choose the exit threshold (train.calibrate's train-holdout split, the budget below) and the
    # model directory gets its exit_policy.json; dev stays the untouched report set. 0: off.
    c.calibration_holdout = 0
    c.calibration_max_drop = 1.0    # points of the task metric below ramp L
    c.calibration_confidence = 0.95 # the Learn-then-Test guarantee's level; 0: empirical, no guarantee
    c.calibration_rule = "entropy"
    # Before that, one temperature per off-ramp can be fitted on the first `temperature_rows` of
    # the held-out rows ("agreement": softmax(logits / T) predicts ramp L's class) and folded into
    # the off-ramp classifiers of the model directory; the threshold is then chosen on the other
    # held-out rows. Predictions are unchanged; exits are on one scale. "none": off.
    c.ramp_temperature = "none"
    c.temperature_rows = 1000
    # Model
    c.init_checkpoint = ""          # "" packaged MiniLM-L6; a PyTorch/HF or deebert-jax dir; "random"
    c.tokenizer = ""                # "" -> the init checkpoint's own tokenizer
    c.model = ml_collections.ConfigDict()  # DeeBertConfig fields (random init) / dropout overrides
    # What off-ramps 1..L-1 read: "first" token (DeeBERT), "mean" of the real tokens, or "" (keep
    # the init checkpoint's; "first" for a random model or a plain BERT checkpoint).
    c.model.ramp_pooling = ""
    # Optimisation
    c.stages = "1,2"
    c.per_device_batch_size = 8
    c.eval_batch_size = 32          # per device
    c.stage1_epochs = 3.0
    c.stage2_epochs = 3.0
    c.steps_per_stage = 0           # > 0 overrides the epochs (quick runs)
    c.learning_rate = 2e-5
    c.stage2_learning_rate = 2e-5
    c.warmup_ratio = 0.0
    c.weight_decay = 0.0
    c.adam_b1 = 0.9
    c.adam_b2 = 0.999
    c.adam_eps = 1e-8
    c.max_grad_norm = 1.0           # <= 0: no clipping
    # Stage 2's loss for off-ramps 1..L-1: "labels" (DeeBERT: cross-entropy with the labels) or
    # "distill" (also ramp L's soft predictions at distill_temperature, weight distill_weight:
    # (1 - w) CE + w T^2 KL; the exit guarantee bounds disagreement with ramp L, so this trains for it).
    c.offramp_loss = "labels"
    c.distill_temperature = 2.0
    c.distill_weight = 0.5
    c.seed = 42
    # What the training step computes in: "float32", or "bfloat16" (mixed precision: matmuls and
    # activations in bf16; parameters, optimizer state, softmax, loss and checkpoints in float32).
    # Dev evaluation after each stage runs in float32, as the saved model is served by default.
    c.dtype = "float32"
    # Run
    c.workdir = ""
    c.save_every_steps = 500
    c.keep_checkpoints = 3
    c.log_every_steps = 50
    c.multihost = "auto"            # auto: jax.distributed.initialize() on multi-host TPU slices
    # After training (read by train.demo only)
    c.eval_mode = "exit_aware"      # dev-set sweep: exit_aware (rows compacted as they exit) or batch
    c.bench_batch_sizes = "1"       # latency benchmark: batch sizes, thresholds, timed runs per cell
    c.bench_thresholds = "0,0.01,0.05,0.1,0.2,0.3,0.4,0.5,0.6,0.7"
    c.bench_runs = 30
    return c
