"""Where a compiled step's time goes, operation by operation, from a JAX profiler trace.

Run the step under `jax.profiler.trace(DIR, create_perfetto_trace=True)` with XLA's per-operation
trace events on (`--xla_cpu_enable_xprof_traceme=true` on the CPU) and its optimized HLO dumped as
text (`--xla_dump_to=... --xla_dump_hlo_as_text`); `op_table` joins the two: each operation's total
time with its output shape, its matmul dimension numbers and the JAX source op it came from, and
`by_category` adds them up by kind (matmuls forward and backward, dropout bits, softmax, loop
bookkeeping, the rest). On one CPU thread operations do not overlap, so the times add up to the step.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
from typing import Iterable

# Trace events that wrap operations rather than being one.
_WRAPPERS = ("Thunk", "$", "Slinky", "ThreadPool")
CATEGORIES = ("matmul, forward", "matmul, backward", "dropout bits", "softmax",
              "loop bookkeeping (stacked residuals, slices)", "other")
# An inference call has no backward pass and no dropout: `category` gives it these.
INFERENCE_CATEGORIES = ("matmul, forward", "softmax", "loop bookkeeping (stacked residuals, slices)", "other")


def trace_durations(trace_dir: str) -> tuple[collections.Counter, collections.Counter]:
    """-> (total microseconds per event name, calls per name) over every `*.trace.json.gz` under DIR."""
    total, calls = collections.Counter(), collections.Counter()
    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))
    if not paths:
        raise FileNotFoundError(f"{trace_dir}: no *.trace.json.gz written by the profiler")
    for path in paths:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            trace = json.load(f)
        for event in trace["traceEvents"] if isinstance(trace, dict) else trace:
            if event.get("ph") == "X" and not str(event.get("name", "")).startswith(_WRAPPERS):
                total[event["name"]] += event.get("dur", 0)
                calls[event["name"]] += 1
    return total, calls


def _instructions(hlo: str) -> tuple[dict[str, str], dict[str, str]]:
    """-> (instruction name -> its line, fused computation name -> its body) of an HLO text dump."""
    lines = {}
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = ", line)
        if m:
            lines[m.group(1)] = line
    bodies = {m.group(1): m.group(2)
              for m in re.finditer(r"^%([\w.\-]+) \(.*?\) -> .*? \{\n(.*?)\n\}", hlo, re.S | re.M)}
    return lines, bodies


def describe(name: str, lines: dict[str, str], bodies: dict[str, str]) -> dict:
    """One operation: {shape, dot (dimension numbers, "" if no matmul), source (JAX op name)}."""
    line = lines.get(name, "")
    called = re.search(r"calls=%([\w.\-]+)", line)
    body = bodies.get(called.group(1), "") if called else line
    dots = re.findall(r"dot\(.*?\), ((?:lhs_batch_dims=\S+ )?lhs_contracting_dims=\S+ "
                      r"(?:rhs_batch_dims=\S+ )?rhs_contracting_dims=\S+)", body)
    shape = re.match(r"\s*(?:ROOT )?%[\w.\-]+ = (\S+)", line)
    source = re.search(r'op_name="([^"]+)"', line)
    return {"shape": shape.group(1) if shape else "", "dot": " ".join(d.rstrip(",") for d in dots),
            "source": source.group(1) if source else ""}


def short_source(source: str) -> str:
    """'jit(f)/transpose(jvp(DeeBert))/while/body/closed_call/layers.body/layers/key/dot_general'
    -> 'backward: layers/key/dot_general' (the transforms and loop plumbing dropped)."""
    backward = "transpose(" in source
    kept = [part for part in source.split("/")
            if part and not re.match(r"^(jit\(|jvp\(|transpose\(|pmap\(|while$|body$|closed_call$|\w+\.body$)", part)]
    return ("backward: " if backward else "") + "/".join(kept)


def category(op: dict) -> str:
    """Which of `CATEGORIES` an operation (`describe`'s dict plus its name) belongs to."""
    source, name = op["source"], op["name"]
    if op["dot"]:
        return "matmul, backward" if "transpose(" in source else "matmul, forward"
    if any(word in source for word in ("bernoulli", "_uniform", "threefry", "random_bits")):
        return "dropout bits"
    if any(word in source for word in ("softmax", "reduce_max", "exp")):
        return "softmax"
    if "dynamic" in source or "dynamic" in name or name.startswith(("wrapped_broadcast", "copy.")):
        return "loop bookkeeping (stacked residuals, slices)"
    return "other"


def op_table(trace_dir: str, hlo_text: str, runs: int = 1) -> list[dict]:
    """Every traced operation, slowest first: {name, ms (per run), calls (per run), shape, dot,
    source, category}."""
    total, calls = trace_durations(trace_dir)
    lines, bodies = _instructions(hlo_text)
    ops = []
    for name, us in total.most_common():
        op = {"name": name, "ms": us / 1e3 / runs, "calls": calls[name] / runs, **describe(name, lines, bodies)}
        op["category"] = category(op)
        ops.append(op)
    return ops


def by_category(ops: Iterable[dict], categories: Iterable[str] = CATEGORIES) -> dict[str, float]:
    """-> milliseconds per category of `categories` (every one present, slowest first)."""
    sums = {c: 0.0 for c in categories}
    for op in ops:
        sums[op["category"]] += op["ms"]
    return dict(sorted(sums.items(), key=lambda kv: -kv[1]))


def largest_hlo_dump(dump_dir: str, contains: str = "") -> str:
    """The text of the largest `*after_optimizations.txt` in DIR whose name contains `contains`
    (the step itself, not the small helper computations compiled around it)."""
    paths = [p for p in glob.glob(os.path.join(dump_dir, "*after_optimizations.txt"))
             if contains in os.path.basename(p) and "buffer-assignment" not in p]
    if not paths:
        raise FileNotFoundError(f"{dump_dir}: no optimized HLO dump{f' for {contains!r}' if contains else ''}")
    with open(max(paths, key=os.path.getsize), encoding="utf-8") as f:
        return f.read()


# PyTorch's eager step, for comparison: the same categories, from torch.profiler's CPU events.

TORCH_CATEGORIES = ("matmul, forward", "matmul, backward", "softmax", "layer norm", "dropout", "gelu",
                    "optimizer (clipping, AdamW)", "other")
_TORCH_MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::baddbmm")


def torch_category(name: str, backward: bool, optimizer: bool) -> str:
    """Which of `TORCH_CATEGORIES` an aten op belongs to (`backward`: run by autograd; `optimizer`:
    under the gradient clipping or the optimizer step)."""
    if optimizer:
        return "optimizer (clipping, AdamW)"
    if name in _TORCH_MATMULS:
        return "matmul, backward" if backward else "matmul, forward"
    for word, cat in (("softmax", "softmax"), ("layer_norm", "layer norm"), ("bernoulli", "dropout"),
                      ("dropout", "dropout"), ("gelu", "gelu")):
        if word in name:
            return cat
    return "other"


def torch_op_table(events, runs: int = 1) -> list[dict]:
    """torch.profiler `prof.events()` -> per (op, forward/backward, optimizer): {name, ms (self CPU
    time per run), calls, backward, category}, slowest first. An op is backward when an autograd
    node is among its callers, optimizer when clipping or `Optimizer.step` is."""
    total, calls = collections.Counter(), collections.Counter()
    for event in events:
        callers, parent = [], event.cpu_parent
        while parent is not None:
            callers.append(parent.name)
            parent = parent.cpu_parent
        backward = any("Backward" in n or n.startswith("autograd::engine") for n in callers + [event.name])
        optimizer = any(n.startswith("Optimizer.") or "clip_grad" in n for n in callers + [event.name])
        key = (event.name, backward, optimizer)
        total[key] += event.self_cpu_time_total
        calls[key] += 1
    ops = []
    for (name, backward, optimizer), us in total.most_common():
        ops.append({"name": name, "ms": us / 1e3 / runs, "calls": calls[(name, backward, optimizer)] / runs,
                    "backward": backward, "category": torch_category(name, backward, optimizer)})
    return ops


def by_torch_category(ops: Iterable[dict]) -> dict[str, float]:
    """-> milliseconds per `TORCH_CATEGORIES` entry (all present, slowest first)."""
    return by_category(ops, TORCH_CATEGORIES)
