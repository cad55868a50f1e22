"""Latency of the same weights and inputs through JAX/XLA, eager PyTorch and ONNX Runtime.

    python -m train.benchmark (--checkpoint DIR | --pytorch DIR | --random-model bert-base)
        [--task T] [--batch-sizes 1,32] [--thresholds 0,0.1,0.5] [--runs N] --out bench.json

Writes bench.json, bench.md (table) and bench.png (latency against threshold) and prints the
table. CPU by default; `--device auto` puts both frameworks on the GPU when one is present.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from deebert_jax.commands.cli import floats, ints, positive_int, run


def parse_args(argv=None) -> argparse.Namespace:
    from benchmarks.benchmarking import DEFAULT_THRESHOLDS, MIN_RUNS, PADDINGS, RANDOM_MODELS
    from benchmarks.harness import available_cpus
    from deebert_jax.model.attention import ATTENTION_IMPLS
    from benchmarks.precision import PRECISIONS
    p = argparse.ArgumentParser(prog="python -m train.benchmark", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="deebert-jax (orbax) checkpoint directory")
    src.add_argument("--pytorch", help="PyTorch BERT / DeeBERT / RoBERTa / DeeRoBERTa directory (config.json + weights)")
    src.add_argument("--random-model", choices=RANDOM_MODELS, help="random weights of this size")
    src.add_argument("--render", metavar="BENCH_JSON",
                     help="only re-derive targets, table and plot of an existing bench.json")
    p.add_argument("--num-labels", type=positive_int, default=2, help="classes for --pytorch / --random-model")
    p.add_argument("--task", default="none", help="GLUE task for real dev sentences (e.g. sst2); 'none': random tokens")
    p.add_argument("--glue-dir", default=os.environ.get("GLUE_DIR"), help="local GLUE folder (default $GLUE_DIR)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model directory)")
    p.add_argument("--seq-len", type=positive_int, default=128, help="padded length (the predictor's max_seq_length)")
    p.add_argument("--batch-sizes", type=ints, default=[1, 32])
    p.add_argument("--thresholds", type=floats, default=None,
                   help=f"default {','.join(f'{t:g}' for t in DEFAULT_THRESHOLDS)}, plus CHECKPOINT/exit_policy.json's "
                        "entropy threshold when there is one (train.calibrate)")
    p.add_argument("--runs", type=positive_int, default=MIN_RUNS, help=f"timed runs per cell (>= {MIN_RUNS} for reported numbers)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=available_cpus(), help="threads for XLA and torch alike")
    p.add_argument("--device", choices=("cpu", "auto"), default="cpu",
                   help="cpu (default), or auto: both frameworks on the GPU when one is present")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="fp32 (IEEE float32 matmuls, the default), tf32 or bf16, the same on both sides "
                        "(benchmarks.precision)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="older spelling: float32 = --precision fp32, bfloat16 = --precision bf16")
    p.add_argument("--schedule", choices=("interleaved", "blocked"), default="interleaved")
    p.add_argument("--backends", default=None,
                   help="comma-separated subset of jax,torch,onnxruntime (ONNX Runtime: the eager twin exported to "
                        "ONNX, full depth, each batch at its own length, on the CPU, float32); default: all three "
                        "on the CPU at fp32, else jax,torch")
    p.add_argument("--layout", choices=("unstacked", "stacked"), default="unstacked",
                   help="JAX params as served: unstacked per layer (layouts.unstack_params) or stacked")
    p.add_argument("--probe-size", type=int, default=None,
                   help="n of the n x n matmul-rate probe (default 1024 on CPU, 4096 on GPU)")
    p.add_argument("--ablation", action="store_true",
                   help="also time JAX on the stacked training layout (modes full_stacked, early_exit_stacked)")
    p.add_argument("--exit-aware", action="store_true",
                   help="also time exit-aware batching (deebert_jax.exit_aware_predict; mode exit_aware)")
    p.add_argument("--attention", choices=ATTENTION_IMPLS, default="default",
                   help="JAX's self-attention core: default (as always), dot_product_attention "
                        "(jax.nn.dot_product_attention, XLA's choice) or cudnn (its cuDNN fused kernel: "
                        "NVIDIA GPU, --precision bf16); PyTorch is unchanged")
    p.add_argument("--padding", choices=PADDINGS, default="pool",
                   help="what JAX and PyTorch run each batch at: pool (--seq-len, every batch alike) or its longest "
                        "row padded to the next power of two or multiple of 8 from 16 (as train.serve --length-spacing "
                        "pads), or own: each batch at its longest row (one compile per length: what padding costs); ONNX "
                        "Runtime always runs at each batch's own length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", help="bench.json path (.md and .png are written beside it)")
    args = p.parse_args(argv)
    if not args.render and not args.out:
        p.error("--out is required")
    return args


def main(argv=None) -> int:
    return run(_main, argv)


def _main(argv: list[str]) -> int:
    args = parse_args(argv)
    from benchmarks import benchmarking as bm
    from benchmarks import harness
    from benchmarks import report as bench_report
    from benchmarks.results import command_line, relative_paths
    if args.render:
        paths = bench_report.render(args.render)
        print("wrote " + ", ".join(paths.values()), file=sys.stderr)
        return 0
    from deebert_jax.core.fileutil import check_outputs, with_siblings
    from deebert_jax.weights.checkpoint import MODEL_DIR_FILES
    # Before the timing, not after it: bench.json, .md and .png are neither directories nor read here.
    outputs = with_siblings("--out", args.out, table=".md", plot=".png")
    sources = {"--checkpoint": args.checkpoint, "--pytorch": args.pytorch, "--tokenizer": args.tokenizer}
    check_outputs(outputs, {**sources, **_dev_file(args)}, reads={k: MODEL_DIR_FILES for k in sources})
    from benchmarks import precision as precision_lib
    precision = precision_lib.resolve(args.precision, args.dtype)
    import jax

    from deebert_jax.cpu.process import setup_process
    # Before JAX starts its backends (importing jax does not start them).
    setup_process(threads=args.threads, share_accelerator_memory=True)
    if args.device == "cpu":
        jax.config.update("jax_platforms", "cpu")
    import torch
    from deebert_jax.weights.checkpoint import load_checkpoint
    from deebert_jax.weights.convert import load_pytorch_checkpoint
    from deebert_jax.weights.model_loading import jitted_init_params

    torch.set_num_threads(args.threads)
    precision_record = precision_lib.apply(precision)   # before anything is traced or loaded
    from deebert_jax.evaluation.calibration import with_policy_threshold
    thresholds = args.thresholds or with_policy_threshold(bm.DEFAULT_THRESHOLDS, args.checkpoint, bm.BenchmarkSpec.rule)
    from deebert_jax.inference.exit_policy import load_exit_policy
    policy = load_exit_policy(args.checkpoint) if args.checkpoint else None
    policy_threshold = float(policy["threshold"]) if policy and policy["rule"] == bm.BenchmarkSpec.rule else None
    spec = bm.BenchmarkSpec(batch_sizes=args.batch_sizes, thresholds=thresholds, runs=args.runs,
                            warmup=args.warmup, schedule=args.schedule, dtype=precision.dtype, layout=args.layout,
                            ablation=args.ablation, exit_aware=args.exit_aware, attention=args.attention,
                            backends=_backends(args, precision), padding=args.padding)
    spec.check()
    if args.checkpoint:
        config, params = load_checkpoint(args.checkpoint)
        model_name, model_dir = f"checkpoint {relative_paths(args.checkpoint)}", args.checkpoint
    elif args.pytorch:
        config, params = load_pytorch_checkpoint(args.pytorch, num_labels=args.num_labels)
        model_name, model_dir = f"pytorch {relative_paths(args.pytorch)}", args.pytorch
    else:
        config = bm.random_model_config(args.random_model, args.num_labels)
        harness.check_input_pool(harness.random_inputs(config.vocab_size, 1, args.seq_len), config)   # a bad --seq-len: before the weights
        # One compile rather than one per op; the weights differ from eager init's by < 1e-8.
        params = jitted_init_params(config, jax.random.PRNGKey(args.seed))
        model_name, model_dir = f"random {args.random_model}", None
    model_name += (f" ({'RoBERTa, ' if config.model_type == 'roberta' else ''}{config.num_hidden_layers} layers, "
                   f"width {config.hidden_size}, "
                   f"{config.num_labels} labels)")
    arrays, inputs = _inputs(args, config, model_dir, spec)
    jax_platform = jax.devices()[0].platform
    torch_device = harness.torch_device_for(jax_platform)
    env = harness.environment(args.threads, torch_device, args.probe_size)
    print(f"device: {env['device']}; threads: {env['threads']}; precision: {precision.name}; "
          f"matmul GFLOP/s: {env['matmul_gflops']}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="deebert-bench-") as tmp:
        torch_model = None
        onnx_session = None
        if "torch" in spec.backends or "onnxruntime" in spec.backends:
            torch_model = bm.torch_twin(config, params, os.path.join(tmp, "torch"), torch_device, precision.dtype)
        if "onnxruntime" in spec.backends:
            from benchmarks.onnx_engine import onnx_twin
            onnx_session = onnx_twin(torch_model, os.path.join(tmp, "onnx"), int(arrays["input_ids"].shape[1]),
                                     args.threads, {k: v[:8] for k, v in arrays.items()})
            torch_model = torch_model.to(torch_device)
        def result_of(rows, incomplete=None):
            # Paths under the checkout are recorded relative to it, so results read the same on any machine.
            result = {**env, "model": model_name, "inputs": inputs, "runs": spec.runs, "warmup": spec.warmup,
                      "schedule": spec.schedule, "dtype": spec.dtype, "precision": precision.name,
                      "precision_settings": precision_record, "rule": spec.rule, "jax_params_layout": spec.layout,
                      "attention": spec.attention, "padding": spec.padding, "policy_threshold": policy_threshold,
                      "command": command_line("train.benchmark", argv),
                      "load_average_after": harness.load_average(), "rows": rows}
            if incomplete:
                result["incomplete"] = incomplete
            result["targets"] = bench_report.check_targets(result)
            return result

        def save_so_far(rows):
            # A run stopped before its last batch size (a time limit, a lost machine) keeps what it timed.
            timed = sorted({r["batch_size"] for r in rows})
            if len(timed) < len(spec.batch_sizes):
                bench_report.write_outputs(result_of(rows, f"batch sizes {', '.join(map(str, timed))} of "
                                                 f"{', '.join(map(str, spec.batch_sizes))} timed so far"), args.out)

        rows = bm.run_benchmark(config, params, arrays, spec, torch_model=torch_model,
                                torch_device=torch_device, onnx_session=onnx_session,
                                show_progress=not args.no_progress,
                                on_batch_size_done=save_so_far)
    result = result_of(rows)
    paths = bench_report.write_outputs(result, args.out)
    print(bench_report.markdown(result))
    print("wrote " + ", ".join(paths.values()), file=sys.stderr)
    return 0


def _backends(args, precision) -> tuple[str, ...]:
    """--backends, or its default: ONNX Runtime beside JAX and torch where it runs as they do (the CPU, float32)."""
    if args.backends is not None:
        return tuple(b.strip() for b in args.backends.split(",") if b.strip())
    on_cpu_fp32 = args.device == "cpu" and precision.dtype == "float32"
    return ("jax", "torch", "onnxruntime") if on_cpu_fp32 else ("jax", "torch")


def _dev_file(args) -> dict[str, str]:
    """{"--glue-dir": the dev file `--task` reads} when it reads one from a folder, else {}."""
    from deebert_jax.data import glue as data
    if args.task.lower() in ("none", "") or not args.glue_dir:
        return {}
    task = data.canonical_task(args.task)
    return {"--glue-dir": data.glue_file(task, "dev", args.glue_dir)} if data.TASKS[task] is not None else {}


def _inputs(args, config, model_dir, spec):
    """The input pool: real dev sentences of `--task`, else random full-length token ids."""
    from benchmarks import harness
    need = args.runs * max(spec.batch_sizes)
    if args.task.lower() in ("none", ""):
        arrays = harness.random_inputs(config.vocab_size, need, args.seq_len, args.seed)
        return arrays, f"random tokens, {need} rows, all {args.seq_len} positions real"
    from deebert_jax.data import glue as data
    task = data.canonical_task(args.task)
    tokenizer = None
    if data.TASKS[task] is not None:
        tok_dir = args.tokenizer or model_dir
        if tok_dir is None:
            raise harness.BenchmarkError(f"--task {task} needs a tokenizer: pass --tokenizer DIR with --random-model")
        tokenizer = data.load_tokenizer(tok_dir, config)
    arrays = data.load_split(task, "dev", glue_dir=args.glue_dir, tokenizer=tokenizer, max_seq_length=args.seq_len,
                             limit=need, vocab_size=config.vocab_size, seed=args.seed)
    n = arrays["input_ids"].shape[0]
    real = float(arrays["attention_mask"].sum(-1).mean())
    return arrays, f"{task} dev, {n} sentences, padded to {args.seq_len} (mean {real:.1f} real tokens)"


entry = main   # the console script and `python -m`: `main` prints its own errors


if __name__ == "__main__":
    sys.exit(entry())
