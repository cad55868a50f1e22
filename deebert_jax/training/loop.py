"""The two-stage training run: data, stages, checkpoints, evaluation and the model it writes.

The steps it runs are `training.steps` (pure, `pmap`-able); this module is the loop around them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from deebert_jax.data import glue as data_lib
from deebert_jax.weights.checkpoint import (TrainCheckpointManager, is_checkpoint_dir, load_checkpoint, save_checkpoint,
                                            write_label_names)
from deebert_jax.core.config import DeeBertConfig
from deebert_jax.evaluation.sweep import evaluate_ramps
from deebert_jax.evaluation.metrics import metric_name
from deebert_jax.weights.model_loading import load_initial_model, model_overrides
from deebert_jax.core.errors import InputError, NonFiniteLossError
from deebert_jax.model import kernels as kernels_lib
from deebert_jax.training.steps import OptimizerSettings, init_train_state, pmapped_train_step
from deebert_jax.training.run_config import (RUN_SPEC_FILE, check_max_seq_length, check_run_spec, compute_dtype,
                                    stage_learning_rate, stage_steps, validate_config)
from deebert_jax.core.runtime import MetricsLog, maybe_initialize_distributed, pmap_devices, replicate, \
    unreplicate, workdir_lock


Params = Any
log = logging.getLogger("deebert_jax.training.loop")


# ----------------------------------------------------------------------------------------------
# The training run

@dataclasses.dataclass
class RunContext:
    cfg: Any
    workdir: str
    task: str
    config: DeeBertConfig
    train: dict
    dev: dict
    tokenizer: Any
    devices: list
    log: MetricsLog
    on_step: Callable | None = None
    params: Params = None   # the model as the run goes: the start, then after each stage
    kernels: str = "reference"   # what the training graph is built from, for `devices` (`model.kernels`)


def _save_model(ctx: RunContext, directory: str, params: Params) -> None:
    """A model directory others can use alone: checkpoint + `tokenizer/` (host 0 writes)."""
    if jax.process_index() != 0:
        return
    names = data_lib.label_names(ctx.task)

    def write_extra(tmp):
        if ctx.tokenizer is not None:
            ctx.tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
        if len(names) == ctx.config.num_labels:  # so predictions say "positive", not "LABEL_1"
            write_label_names(tmp, names)
    # The tokenizer and labels go in with the same atomic rename: a stage directory is complete or absent.
    save_checkpoint(directory, ctx.config, params, write_extra=write_extra)


def run_stage(ctx: RunContext, stage: int, params: Params) -> Params:
    """Trains one stage from `params` (or resumes it from its latest checkpoint) -> final params."""
    from tqdm.auto import tqdm

    cfg, config = ctx.cfg, ctx.config
    n_dev = len(ctx.devices)
    global_batch = int(cfg.per_device_batch_size) * jax.device_count()
    total = stage_steps(cfg, stage, data_lib.num_examples(ctx.train), global_batch)
    settings = OptimizerSettings(stage_learning_rate(cfg, stage), total,
                                 int(round(float(cfg.get("warmup_ratio", 0.0)) * total)), float(cfg.weight_decay),
                                 float(cfg.adam_b1), float(cfg.adam_b2), float(cfg.adam_eps), float(cfg.max_grad_norm))
    dtype = compute_dtype(cfg)
    p_step, tx = pmapped_train_step(config, stage, settings, pmap_devices(ctx.devices), dtype, ctx.kernels)
    state = init_train_state(params, tx, stage, config.num_hidden_layers)
    manager = TrainCheckpointManager(os.path.join(ctx.workdir, "checkpoints", f"stage{stage}"),
                                     max_to_keep=int(cfg.keep_checkpoints))
    start = manager.latest_step() or 0
    # What decides the trajectory; a resumed run must agree with it to end where the first would have.
    run_spec = {"optimizer": dataclasses.asdict(settings), "model": config.to_dict(), "seed": int(cfg.seed),
                "global_batch_size": global_batch, "task": ctx.task,
                "train_examples": data_lib.num_examples(ctx.train), "max_seq_length": int(cfg.max_seq_length),
                "dtype": dtype}
    check_run_spec(os.path.join(manager.directory, RUN_SPEC_FILE), run_spec, resuming=bool(start))
    if start:
        # The newest intact step: a damaged one (a file cut short or lost) is set aside with a warning.
        start, restored = manager.restore_latest(state)
        state = jax.tree_util.tree_map(jnp.asarray, restored)
        log.info("stage %d: resumed from step %d (%s)", stage, start, manager.directory)
    ctx.log.drop_after(stage, start)  # what an earlier run logged past its last checkpoint is logged again

    state = replicate(state, ctx.devices)
    dropout_key = replicate(jax.random.fold_in(jax.random.PRNGKey(cfg.seed), stage), ctx.devices)
    data_seed = int(cfg.seed) * 10 + stage
    save_every = int(cfg.save_every_steps)
    log_every = max(1, int(cfg.log_every_steps))
    bar = tqdm(total=total, initial=start, desc=f"stage {stage}", disable=jax.process_index() != 0,
               dynamic_ncols=True)
    tick, tick_step = time.perf_counter(), start
    try:
        for step in range(start, total):
            batch = data_lib.train_batch(ctx.train, global_batch, data_seed, step,
                                         jax.process_index(), jax.process_count())
            state, metrics = p_step(state, data_lib.shard(batch, n_dev), dropout_key)
            metrics = {k: float(v[0]) for k, v in jax.device_get(metrics).items()}
            done = step + 1
            if metrics["finite"] < 1.0 or not math.isfinite(metrics["loss"]):
                last = manager.latest_step()
                raise NonFiniteLossError(
                    f"stage {stage}, step {done}: loss is {metrics['loss']} (grad norm {metrics['grad_norm']}); "
                    f"stopping without saving this step. Last good checkpoint: "
                    f"{os.path.join(manager.directory, str(last)) if last else 'none'}")
            bar.update(1)
            if done % log_every == 0 or done == total:
                now = time.perf_counter()
                rate = (done - tick_step) * global_batch / max(now - tick, 1e-9)
                tick, tick_step = now, done
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['learning_rate']:.2e}",
                                ex_s=f"{rate:.1f}")
                record = {"event": "train", "stage": stage, "step": done, "examples_per_second": rate,
                          **{k: metrics[k] for k in ("loss", "accuracy", "learning_rate", "grad_norm")}}
                ctx.log.write(record, {f"stage{stage}/train/{k}": record[k] for k in
                                       ("loss", "accuracy", "learning_rate", "grad_norm", "examples_per_second")}, done)
            if (save_every > 0 and done % save_every == 0) or done == total:
                manager.save(done, unreplicate(state))
            if ctx.on_step is not None:
                ctx.on_step(stage, done)
    finally:
        bar.close()
        manager.close()
    return unreplicate(state.params)


def evaluate_stage(ctx: RunContext, stage: int, params: Params, step: int) -> dict:
    """Dev metrics after `stage`: the final ramp after stage 1; every ramp after stage 2."""
    result = evaluate_ramps(ctx.config, params, ctx.dev, ctx.task, int(ctx.cfg.eval_batch_size), devices=ctx.devices,
                      progress=jax.process_index() == 0)
    name = metric_name(ctx.task)
    record = {"event": "eval", "stage": stage, "step": step, "task": ctx.task, "metric": name,
              "num_examples": result["num_examples"], "final": result["ramps"][-1]}
    scalars = {f"stage{stage}/eval/final_{k}": v for k, v in result["ramps"][-1].items()}
    if stage == 2:
        record["ramps"] = [{"layer": i + 1, **m} for i, m in enumerate(result["ramps"])]
        scalars.update({f"stage2/eval/ramp{i + 1}_{name}": m[name] for i, m in enumerate(result["ramps"])})
    ctx.log.write(record, scalars, step)
    return record


def train(cfg, *, on_step: Callable[[int, int], None] | None = None) -> dict:
    """Runs the configured stages into `cfg.workdir`, resuming whatever a previous run left there.

    Writes `workdir/stage1`, `workdir/stage2` (each stage's final model + tokenizer), `workdir/model`
    (the last stage's), `checkpoints/stage{n}/<step>`, `metrics.jsonl` and `tensorboard/`, holding
    `workdir/.lock` throughout (a second run on the workdir fails at once). A config that cannot
    run fails before any work. `on_step(stage, step)` is called after every step (tests use it to
    interrupt a run). -> {"workdir", "model", "eval": {stage: eval record}}.
    """
    maybe_initialize_distributed(cfg.get("multihost", "auto"))
    stages = validate_config(cfg)
    task = data_lib.canonical_task(cfg.task)
    workdir = os.path.abspath(os.path.expanduser(cfg.workdir))
    with workdir_lock(workdir):
        ctx = _prepare(cfg, workdir, task, stages, on_step)
        evals = {}
        try:
            for stage in stages:
                stage_dir = os.path.join(workdir, f"stage{stage}")
                if is_checkpoint_dir(stage_dir):
                    log.info("stage %d: already complete in %s, skipping", stage, stage_dir)
                    _, ctx.params = load_checkpoint(stage_dir)
                    continue
                ctx.params = run_stage(ctx, stage, ctx.params)
                total = stage_steps(cfg, stage, data_lib.num_examples(ctx.train),
                                    int(cfg.per_device_batch_size) * jax.device_count())
                evals[stage] = evaluate_stage(ctx, stage, ctx.params, total)
                _save_model(ctx, stage_dir, ctx.params)
            _save_model(ctx, os.path.join(workdir, "model"), ctx.params)
        finally:
            ctx.log.close()
    return {"workdir": workdir, "model": os.path.join(workdir, "model"), "eval": evals}


def _prepare(cfg, workdir: str, task: str, stages: tuple[int, ...], on_step) -> RunContext:
    """The starting model, its tokenizer and both splits -> the run's context (with `params`)."""
    config, params, init_dir = load_initial_model(cfg, data_lib.num_labels(task))
    if 2 in stages and 1 not in stages and is_checkpoint_dir(os.path.join(workdir, "stage1")):
        # Stage 2 alone continues from this workdir's stage 1 when there is one.
        config, params = load_checkpoint(os.path.join(workdir, "stage1"))
        config = config.replace(**model_overrides(cfg))
        init_dir = os.path.join(workdir, "stage1")
    check_max_seq_length(cfg, config.max_sequence_length, f"the model's {config.sequence_limit}")
    tokenizer = None
    if task != "synthetic":
        tokenizer_source = cfg.get("tokenizer", "") or init_dir
        tokenizer = data_lib.load_tokenizer(tokenizer_source)
        if len(tokenizer) > config.vocab_size:  # ids past the embedding table would turn into NaNs
            raise InputError(f"tokenizer {tokenizer_source} has {len(tokenizer)} tokens, more than the model's "
                             f"vocab_size={config.vocab_size}")
    glue_dir = cfg.get("glue_dir", "") or os.environ.get("GLUE_DIR") or None
    common = dict(glue_dir=glue_dir, tokenizer=tokenizer, max_seq_length=int(cfg.max_seq_length),
                  vocab_size=config.vocab_size, seed=int(cfg.seed))
    train_arrays = data_lib.load_split(task, "train", limit=cfg.get("train_limit", 0) or None, **common)
    dev_arrays = data_lib.load_split(task, "dev", limit=cfg.get("eval_limit", 0) or None, **common)
    if jax.process_count() > 1:
        dev_arrays = data_lib.host_eval_rows(dev_arrays, jax.process_index(), jax.process_count())
    log.info("task %s: train %s; dev %s", task, data_lib.describe(train_arrays), data_lib.describe(dev_arrays))
    devices = jax.local_devices()
    return RunContext(cfg, workdir, task, config, train_arrays, dev_arrays, tokenizer, devices,
                      MetricsLog(workdir), on_step, params, kernels=kernels_lib.for_devices(devices))
