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

from deebert_jax.data import batching
from deebert_jax.data import glue as data_lib
from deebert_jax.weights.checkpoint import (TrainCheckpointManager, is_checkpoint_dir, load_checkpoint,
                                            model_fingerprint, save_checkpoint, write_label_names,
                                            write_training_info)
from deebert_jax.core.config import DeeBertConfig
from deebert_jax.evaluation.sweep import all_ramp_logits, evaluate_ramps
from deebert_jax.evaluation.metrics import metric_name
from deebert_jax.weights.model_loading import load_initial_model, model_overrides
from deebert_jax.core.errors import InputError, NonFiniteLossError
from deebert_jax.model import kernels as kernels_lib
from deebert_jax.training.losses import LABELS
from deebert_jax.training.steps import (OptimizerSettings, init_train_state, pmapped_train_step,
                                         stage_optimizer_settings)
from deebert_jax.training.run_config import (RUN_SPEC_FILE, calibration_budget, check_max_seq_length, check_run_spec,
                                             compute_dtype, offramp_loss, ramp_temperature_rows,
                                             stage_steps, validate_config)
from deebert_jax.core.runtime import MetricsLog, maybe_initialize_distributed, pmap_devices, replicate, \
    unreplicate, workdir_lock
from deebert_jax.evaluation import calibration, ramp_temperature
from deebert_jax.weights.checkpoint import ramp_temperature_record


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
    holdout: dict | None = None  # training rows no stage sees, for the calibration (`config.calibration_holdout`)


def _save_model(ctx: RunContext, directory: str, params: Params, ramp_temperatures: dict | None = None) -> None:
    """A model directory others can use alone: checkpoint + `tokenizer/` (host 0 writes);
    `ramp_temperatures` (`FittedTemperatures.record`) goes into its training.json."""
    if jax.process_index() != 0:
        return
    names = data_lib.label_names(ctx.task)

    def write_extra(tmp):
        if ctx.tokenizer is not None:
            ctx.tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
        if len(names) == ctx.config.num_labels:  # so predictions say "positive", not "LABEL_1"
            write_label_names(tmp, names)
        if ctx.cfg is not None:   # predict and serve default --max-seq-length to the training length
            # ... and which rows it trained on, so that train-holdout calibration can refuse them.
            write_training_info(tmp, int(ctx.cfg.max_seq_length), ramp_temperatures,
                                train_rows=None if ctx.train is None else data_lib.num_examples(ctx.train))
    # The tokenizer, labels and training length go in with the same atomic rename: a stage
    # directory is complete or absent.
    save_checkpoint(directory, ctx.config, params, write_extra=write_extra)


def _checkpoint_dir(ctx: RunContext, stage: int) -> str:
    return os.path.join(ctx.workdir, "checkpoints", f"stage{stage}")


def stage_run_spec(ctx: RunContext, stage: int) -> tuple[OptimizerSettings, dict]:
    """-> (the stage's optimizer settings, its run spec): what decides the trajectory. A resumed
    run, or a finished one run again, must agree with it to mean the run that was started."""
    cfg, config = ctx.cfg, ctx.config
    global_batch = int(cfg.per_device_batch_size) * jax.device_count()
    total = stage_steps(cfg, stage, data_lib.num_examples(ctx.train), global_batch)
    settings = stage_optimizer_settings(cfg, stage, total)
    spec = {"optimizer": dataclasses.asdict(settings), "model": config.to_dict(), "seed": int(cfg.seed),
            "global_batch_size": global_batch, "task": ctx.task,
            "train_examples": data_lib.num_examples(ctx.train), "max_seq_length": int(cfg.max_seq_length),
            "dtype": compute_dtype(cfg)}
    if stage == 2:
        spec["offramp_loss"] = offramp_loss(cfg).describe()
    return settings, spec


def run_stage(ctx: RunContext, stage: int, params: Params) -> Params:
    """Trains one stage from `params` (or resumes it from its latest checkpoint) -> final params."""
    from tqdm.auto import tqdm

    cfg, config = ctx.cfg, ctx.config
    n_dev = len(ctx.devices)
    settings, run_spec = stage_run_spec(ctx, stage)
    global_batch, total, dtype = run_spec["global_batch_size"], settings.total_steps, run_spec["dtype"]
    loss = offramp_loss(cfg) if stage == 2 else LABELS
    p_step, tx = pmapped_train_step(config, stage, settings, pmap_devices(ctx.devices), dtype, ctx.kernels, loss)
    state = init_train_state(params, tx, stage, config.num_hidden_layers)
    manager = TrainCheckpointManager(_checkpoint_dir(ctx, stage), max_to_keep=int(cfg.keep_checkpoints))
    start = manager.latest_step() or 0
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
            batch = batching.train_batch(ctx.train, global_batch, data_seed, step,
                                         jax.process_index(), jax.process_count())
            state, metrics = p_step(state, batching.shard(batch, n_dev), dropout_key)
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
                          **{k: metrics[k] for k in ("loss", "accuracy", "agreement", "learning_rate", "grad_norm")
                             if k in metrics}}
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
        evals, calibrated = {}, None
        model_dir = os.path.join(workdir, "model")
        try:
            for stage in stages:
                stage_dir = os.path.join(workdir, f"stage{stage}")
                if is_checkpoint_dir(stage_dir):
                    # A finished stage is reused only for the settings it was trained with.
                    spec_path = os.path.join(_checkpoint_dir(ctx, stage), RUN_SPEC_FILE)
                    check_run_spec(spec_path, stage_run_spec(ctx, stage)[1], resuming=True, finished=True)
                    log.info("stage %d: already complete in %s, skipping", stage, stage_dir)
                    _, ctx.params = load_checkpoint(stage_dir)
                    continue
                ctx.params = run_stage(ctx, stage, ctx.params)
                total = stage_steps(cfg, stage, data_lib.num_examples(ctx.train),
                                    int(cfg.per_device_batch_size) * jax.device_count())
                evals[stage] = evaluate_stage(ctx, stage, ctx.params, total)
                _save_model(ctx, stage_dir, ctx.params)
            if not evals and is_checkpoint_dir(model_dir):
                _check_model_temperatures(ctx, model_dir)
            if evals or not is_checkpoint_dir(model_dir):   # a finished run again leaves the user's model as it is
                calibrate = ctx.holdout is not None and 2 in stages
                fitted = fit_temperatures_after_training(ctx) if calibrate else None
                _save_model(ctx, model_dir, fitted.params if fitted else ctx.params, fitted and fitted.record)
                if calibrate:
                    calibrated = calibrate_after_training(ctx, model_dir, fitted)
        finally:
            ctx.log.close()
    return {"workdir": workdir, "model": model_dir, "eval": evals, "calibration": calibrated}


@dataclasses.dataclass(frozen=True)
class FittedTemperatures:
    """Off-ramp temperatures fitted on the first `record["rows"]` held-out rows, and the params
    with them folded into the off-ramp classifiers (what the model directory holds)."""
    params: Params
    record: dict   # {"temperatures": [L], "rows": N, "holdout": H, "fit": "agreement"}


def fit_temperatures_after_training(ctx: RunContext) -> FittedTemperatures | None:
    """`config.ramp_temperature`: fits one temperature per off-ramp on the first
    `config.temperature_rows` held-out rows (`evaluation.ramp_temperature`); None when off."""

    rows = ramp_temperature_rows(ctx.cfg)
    if not rows:
        return None
    fit_rows = {k: v[:rows] for k, v in ctx.holdout.items()}
    logits = all_ramp_logits(ctx.config, ctx.params, fit_rows, int(ctx.cfg.eval_batch_size), devices=ctx.devices)
    temperatures = ramp_temperature.fit_ramp_temperatures(logits)
    record = {"fit": ctx.cfg.ramp_temperature, "temperatures": [round(float(t), 6) for t in temperatures],
              "rows": rows, "holdout": data_lib.num_examples(ctx.holdout)}
    # Rounded first, so training.json states exactly what the classifiers were divided by.
    params = ramp_temperature.apply_ramp_temperatures(ctx.params, record["temperatures"])
    log.info("off-ramp temperatures fitted on the first %d held-out rows: %s", rows,
             ", ".join(f"{t:.3g}" for t in record["temperatures"]))
    ctx.log.write({"event": "ramp_temperatures", **record}, {}, 0)
    return FittedTemperatures(params, record)


def _check_model_temperatures(ctx: RunContext, model_dir: str) -> None:
    """A finished run again keeps its model; asking it for other off-ramp temperatures than the
    model was written with would do nothing, so it is refused (InputError) with what to do."""

    asked = (ctx.cfg.get("ramp_temperature", "none") if ctx.holdout is not None else "none")
    record = ramp_temperature_record(model_dir)
    written = record.get("fit", "agreement") if record else "none"
    if asked != written:
        raise InputError(f"{model_dir} was written with config.ramp_temperature={written!r}, this run asks for "
                         f"{asked!r}, and a finished run keeps its model: move {model_dir} away to redo what follows "
                         "training (the stages are reused), or use another workdir")


def calibrate_after_training(ctx: RunContext, model_dir: str, fitted: FittedTemperatures | None = None) -> dict:
    """Chooses the exit threshold on the held-out training rows (those after the ones `fitted`
    was fitted on), reports it on dev, and writes `model_dir/exit_policy.json` (host 0), for the
    params the model directory holds. -> {"policy": the policy or None, "refused": reason or None}.
    A budget nothing meets is not an error: the model is written without a policy, and the
    reason is logged, recorded in metrics.jsonl and returned."""

    budget = calibration_budget(ctx.cfg)
    batch = int(ctx.cfg.eval_batch_size)
    params = fitted.params if fitted else ctx.params
    skip = fitted.record["rows"] if fitted else 0
    rows = {k: v[skip:] for k, v in ctx.holdout.items()}
    n = data_lib.num_examples(rows)
    where = f"the last {n} held-out rows" if skip else f"the {n} held-out rows"
    held = all_ramp_logits(ctx.config, params, rows, batch, devices=ctx.devices)
    dev = all_ramp_logits(ctx.config, params, ctx.dev, batch, devices=ctx.devices)
    policy, refused = None, None
    try:
        chosen, tested = calibration.choose_threshold(ctx.task, held, rows["labels"], budget.max_drop,
                                                      budget.rule, budget.confidence)
    except calibration.CalibrationError as e:
        refused = str(e)
        log.warning("calibration on %s: %s; %s has no exit_policy.json (train.predict runs it at full depth)",
                    where, refused, model_dir)
    else:
        reported = calibration.threshold_stats(ctx.task, dev, ctx.dev["labels"], chosen["threshold"], budget.rule)
        extra = {"ramp_temperatures": fitted.record} if fitted else {}
        policy = calibration.make_policy(ctx.task, budget.rule, budget.max_drop, budget.confidence, chosen, tested,
                                         reported, "train-holdout", ctx.config.num_hidden_layers,
                                         calibration_size=n, max_seq_length=int(ctx.cfg.max_seq_length),
                                         model_fingerprint=model_fingerprint(ctx.config, params), **extra)
        if jax.process_index() == 0:
            calibration.write_exit_policy(model_dir, policy)
        log.info("calibration on %s: threshold %g, dev saving %.1f%%, dev drop %.2f points; wrote %s", where,
                 policy["threshold"], 100 * reported["saving"], reported["drop"],
                 os.path.join(model_dir, calibration.POLICY_FILE))
    ctx.log.write({"event": "calibration", "holdout": data_lib.num_examples(ctx.holdout), "calibration_rows": n,
                   "policy": policy, "refused": refused}, {}, 0)
    return {"policy": policy, "refused": refused}


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
        # With the config: a tokenizer larger than the embedding table (ids past it would turn into
        # NaNs), or padding with another id than the model's, is refused here.
        tokenizer = data_lib.load_tokenizer(tokenizer_source, config)
    glue_dir = cfg.get("glue_dir", "") or os.environ.get("GLUE_DIR") or None
    common = dict(glue_dir=glue_dir, tokenizer=tokenizer, max_seq_length=int(cfg.max_seq_length),
                  vocab_size=config.vocab_size, seed=int(cfg.seed))
    holdout = int(cfg.get("calibration_holdout", 0) or 0)   # out of every stage, not only stage 2
    train_arrays, holdout_arrays = data_lib.load_train_and_holdout(task, holdout, limit=cfg.get("train_limit", 0) or None,
                                                                   **common)
    dev_arrays = data_lib.load_split(task, "dev", limit=cfg.get("eval_limit", 0) or None, **common)
    if jax.process_count() > 1:
        dev_arrays = batching.host_eval_rows(dev_arrays, jax.process_index(), jax.process_count())
    log.info("task %s: train %s; dev %s%s", task, data_lib.describe(train_arrays), data_lib.describe(dev_arrays),
             f"; held out for calibration {data_lib.describe(holdout_arrays)}" if holdout_arrays else "")
    devices = jax.local_devices()
    return RunContext(cfg, workdir, task, config, train_arrays, dev_arrays, tokenizer, devices,
                      MetricsLog(workdir), on_step, params, kernels=kernels_lib.for_devices(devices),
                      holdout=holdout_arrays)
