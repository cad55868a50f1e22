"""A dry run on a Cloud TPU slice: every program a run compiles, compiled by the TPU compiler
for the slice's devices, and what the compiler says of each (`train.plan`).

Every time here is an estimate from the compiler's analysis (a roofline floor: no step can be
faster), never a measurement: nothing runs on a TPU.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Callable, Sequence

import jax

from deebert_jax.core.errors import InputError
from deebert_jax.core.fileutil import atomic_write_text, check_outputs
from deebert_jax.model.modeling import init_params
from deebert_jax.planning import programs as programs_lib
from deebert_jax.planning.chips import Slice, slice_devices
from deebert_jax.planning.report import ProgramReport, compile_program
from deebert_jax.planning.summary import format_plan
from deebert_jax.training import run_config

GROUPS = ("train", "predict", "serve")


class PlanRefusal(InputError):
    """The run cannot go ahead on the slice as configured; the message says what would, and
    `plan` holds the plan that found it."""

    def __init__(self, message: str, plan: dict):
        super().__init__(message)
        self.plan = plan


@dataclasses.dataclass
class BatchSearch:
    """The largest per-chip batch whose step compiles within the chip's HBM: temporaries grow
    about linearly with the batch, so two compiles (one that fits; the other fitting or not: the
    compiler says what it would have needed) put a line through them, and the batch where it
    meets the HBM left is confirmed by compiling it (re-aimed with each miss, at most 4 times)."""

    stage: int
    largest: int | None
    probes: list                 # [{"batch", "hbm_total", "temporaries", "fits", "compile_seconds", "error"}]
    estimate: int | None = None  # the first line's prediction

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _probe(cfg, shape, sl: Slice, stage: int, batch: int) -> ProgramReport:
    program = next(p for p in programs_lib.training_programs(cfg, shape, sl, per_chip_batch=batch) if p.stage == stage)
    return compile_program(program, sl.chip)


def _temporaries(report: ProgramReport) -> float | None:
    return report.hbm["temporaries"] if report.fits else report.needed_temporaries


def _probe_record(batch: int, report: ProgramReport) -> dict:
    return {"batch": batch, "hbm_total": report.hbm and report.hbm["total"], "temporaries": _temporaries(report),
            "fits": bool(report.fits), "compile_seconds": round(report.compile_seconds, 1), "error": report.error}


def largest_batch(compile_at: Callable[[int], ProgramReport], hbm_bytes: int, stage: int,
                  known: dict[int, ProgramReport] | None = None,
                  say: Callable[[str], None] = lambda s: None) -> BatchSearch:
    """`compile_at(batch)`: the stage's step compiled at that per-chip batch; `hbm_bytes`: the
    chip's; `known`: reports already compiled, by batch (the configured one)."""
    seen = dict(known or {})
    probes = []

    def probe(b: int) -> ProgramReport:
        if b not in seen:
            say(f"stage {stage}: compiling a per-chip batch of {b}")
            seen[b] = compile_at(b)
        if all(p["batch"] != b for p in probes):
            probes.append(_probe_record(b, seen[b]))
        return seen[b]

    for b in sorted(seen):
        probe(b)
    fitting = [b for b, r in seen.items() if r.fits]
    low = max(fitting) if fitting else None
    if low is None:
        low = max(1, min(seen, default=64) // 8)
        while not probe(low).fits:
            if low == 1 or _temporaries(seen[low]) is None:
                return BatchSearch(stage, None, probes)
            low = max(1, low // 8)
    above = [b for b, r in seen.items() if b > low and _temporaries(r) is not None]
    if not above:
        probe(2 * low)
    fits = seen[low]
    # What the temporaries may take: the chip's HBM (the compiler's own figure when it gave one)
    # less what does not grow with the batch.
    usable = next((r.available_hbm for r in seen.values() if r.available_hbm), None) or hbm_bytes
    room = usable - (fits.hbm["total"] - fits.hbm["temporaries"])
    estimate = None
    for _ in range(4):
        # The line through the fitting batch nearest the edge and its nearest other figure:
        # above it when there is one, else below it.
        figured = [b for b, r in seen.items() if b != low and _temporaries(r) is not None]
        other = min((b for b in figured if b > low), default=None) or max(figured)
        slope = (_temporaries(seen[other]) - _temporaries(seen[low])) / (other - low)
        if slope <= 0:
            return BatchSearch(stage, low, probes, estimate)
        target = int(low + (room - _temporaries(seen[low])) // slope)
        estimate = estimate or target
        # Below every batch that did not fit, by a tenth of the way back at least: the line
        # through a miss can land just under it again and again.
        failing = [b for b, r in seen.items() if not r.fits and b > low]
        target = min([target] + [low + int(0.9 * (b - low)) for b in failing])
        if target <= low:
            break
        if probe(target).fits:
            low = target
            if seen[target].hbm["total"] > 0.97 * usable:
                break
    return BatchSearch(stage, low, probes, estimate)


def _search_stages(cfg, shape, sl: Slice, reports: Sequence[ProgramReport], say) -> list[BatchSearch]:
    """Both stages run at one per-chip batch: the search is made on the stage that needs the most
    HBM at the configured batch (one that does not fit first), and the other stages are compiled
    at the batch it finds; one that does not fit there is searched in turn."""
    def need(r):
        return (0, r.hbm["total"]) if r.fits else (1, r.needed_temporaries or float("inf"))

    order = sorted(reports, key=need, reverse=True)
    searches, largest = [], None
    for r in order:
        compile_at = functools.partial(_probe, cfg, shape, sl, r.stage)
        known = {shape.per_chip_batch: r}
        if largest is not None:
            say(f"stage {r.stage}: compiling the per-chip batch of {largest} found for stage {order[0].stage}")
            known[largest] = compile_at(largest)
            if known[largest].fits:
                searches.append(BatchSearch(r.stage, largest, [_probe_record(b, k) for b, k in sorted(known.items())]))
                continue
        search = largest_batch(compile_at, sl.chip.hbm_bytes, r.stage, known, say)
        searches.append(search)
        largest = search.largest if largest is None or search.largest is None else min(largest, search.largest)
    return sorted(searches, key=lambda s: s.stage)


def _stage_estimates(cfg, shape, sl: Slice, reports: Sequence[ProgramReport]) -> list[dict]:
    out = []
    for r in reports:
        if r.stage is None or not r.compiled:
            continue
        steps = run_config.stage_steps(cfg, r.stage, shape.train_rows, shape.global_batch(sl))
        per_chip = r.examples / r.floor_seconds if r.floor_seconds else None
        out.append({"stage": r.stage, "steps": steps, "step_seconds_floor": r.floor_seconds,
                    "examples_per_second_per_chip": per_chip,
                    "examples_per_second_per_slice": per_chip and per_chip * sl.chips,
                    "stage_seconds_floor": r.floor_seconds * steps})
    return out


def make_plan(cfg, topology: str, *, groups: Sequence[str] = GROUPS, train_examples: int | None = None,
              global_batch_size: int | None = None, find_largest_batch: bool = False,
              serve_max_seq_length: int | None = None,
              say: Callable[[str], None] = lambda s: None) -> dict:
    """Compiles what a run of `cfg` on `topology` compiles -> the plan (JSON-able). A run that
    would not fit raises `PlanRefusal` after the plan is complete: `refusal` in the plan, and
    the plan itself as the exception's `plan`."""
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        raise InputError(f"--programs: {', '.join(unknown)}; expected some of {', '.join(GROUPS)}")
    sl = slice_devices(topology)
    shape = programs_lib.run_shape(cfg, sl, train_examples=train_examples, global_batch_size=global_batch_size)
    say(f"{sl.topology}: {sl.chips} chips of {sl.chip.device_kind} on {sl.hosts} host(s); model from "
        f"{shape.model_source}; per-chip batch {shape.per_chip_batch} x {shape.seq_len}, {shape.dtype}")
    candidates = []
    if "train" in groups:
        candidates += programs_lib.training_programs(cfg, shape, sl)
    if "predict" in groups:
        candidates += programs_lib.inference_programs(shape, sl)
    if "serve" in groups:
        candidates += programs_lib.serving_programs(shape, sl, serve_max_seq_length)
    reports = []
    for program in candidates:
        say(f"compiling {program.name} ({program.what})")
        reports.append(compile_program(program, sl.chip))
    train_reports = [r for r in reports if r.stage is not None]
    searches = []
    if train_reports and (find_largest_batch or any(not r.fits for r in train_reports)):
        searches = _search_stages(cfg, shape, sl, train_reports, say)
    plan = {
        "topology": sl.topology, "chip": dataclasses.asdict(sl.chip), "chips": sl.chips, "hosts": sl.hosts,
        "chips_per_host": sl.chips_per_host,
        "model": {"source": shape.model_source, "layers": shape.config.num_hidden_layers,
                  "hidden_size": shape.config.hidden_size, "parameters": _parameter_count(shape.config)},
        "task": shape.task, "max_seq_length": shape.seq_len, "per_chip_batch": shape.per_chip_batch,
        "global_batch": shape.global_batch(sl), "dtype": shape.dtype, "train_rows": shape.train_rows,
        "train_rows_source": shape.train_rows_source,
        "programs": [r.to_json() for r in reports],
        "training": _stage_estimates(cfg, shape, sl, train_reports),
        "largest_batch": [s.to_json() for s in searches],
        "largest_per_chip_batch": min((s.largest for s in searches if s.largest), default=None) if searches else None,
        "estimates": "every time and rate is a roofline floor from the TPU compiler's analysis and the chip's "
                     "public peak FLOP/s and HBM bandwidth: an estimate, never a measurement",
    }
    if plan["training"]:
        plan["run_seconds_floor"] = sum(s["stage_seconds_floor"] for s in plan["training"])
    plan["refusal"] = _refusal(shape, sl, train_reports, searches)
    if plan["refusal"]:
        raise PlanRefusal(plan["refusal"], plan)
    return plan


def _parameter_count(config) -> int:
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
    return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes)))


def _refusal(shape, sl: Slice, reports: Sequence[ProgramReport], searches: Sequence[BatchSearch]) -> str | None:
    for r in reports:
        if r.fits:
            continue
        if r.fits is None:
            return f"{r.name} on {sl.topology} did not compile: {r.error}"
        largest = min((s.largest for s in searches if s.largest), default=None)
        if r.hbm:
            need = f"needs {r.hbm['total'] / 2**30:.2f} GiB per chip"
        elif r.needed_temporaries:
            need = f"needs {r.needed_temporaries / 2**30:.2f} GiB of temporaries per chip (the TPU compiler's figure)"
        else:
            need = "does not compile within HBM"
        fix = (f"the largest per-chip batch that fits is {largest} (found by compiling): set "
               f"config.per_device_batch_size={largest}" if largest else
               "no per-chip batch fits: a smaller model or config.max_seq_length, or a chip with more HBM")
        usable = r.available_hbm or sl.chip.hbm_bytes
        return (f"{r.name} at config.per_device_batch_size={shape.per_chip_batch} {need}, more than "
                f"{sl.chip.generation}'s {usable / 2**30:.2f} GiB: {fix}")
    return None


def dry_run(cfg, topology: str, *, out: str | None = None, config_path: str | None = None,
            say: Callable[[str], None] = lambda s: None, **options) -> tuple[dict, str]:
    """`make_plan`, with the JSON written to `out` (checked before any compile; the plan is
    written when refused too) -> (plan, its table). A refusal is raised after the writing."""
    if out is not None:
        init = cfg.get("init_checkpoint", "") or None
        out = check_outputs({"--out": out}, {"--config": config_path,
                                             "config.init_checkpoint": init if init and os.path.exists(init) else None},
                            reads={"config.init_checkpoint": ["."]})["--out"]
    try:
        plan, refusal = make_plan(cfg, topology, say=say, **options), None
    except PlanRefusal as e:
        plan, refusal = e.plan, e
    if out is not None:
        atomic_write_text(out, json.dumps(plan, indent=2, sort_keys=True) + "\n")
    text = format_plan(plan)
    if refusal is not None:
        refusal.table = text
        raise refusal
    return plan, text
