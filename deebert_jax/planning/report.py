"""One compiled program's figures, read off the TPU compiler's output.

Memory from `memory_analysis()` (per chip: arguments, outputs, temporaries, generated code, less
the outputs aliased to donated inputs); FLOPs from `cost_analysis()`, whose loop bodies count
once, scaled by their trip counts as read off the program's jaxpr (`costs`), and the matmuls'
counted there exactly; collectives from the optimized HLO. The time floor is a roofline from the
chip's public peak and bandwidth: the matmul FLOPs at the bf16 peak (float32 matmuls may take
several bf16 passes, so a float32 floor is the more optimistic) or the arguments and outputs at
the HBM bandwidth, whichever is longer. No step can be faster; a real one is slower. An
estimate from the compiler's analysis, never a measurement.
"""

from __future__ import annotations

import dataclasses
import re
import time

from deebert_jax.planning import costs as costs_lib
from deebert_jax.planning.chips import ChipSpec
from deebert_jax.planning.programs import Program

_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_COLLECTIVE = re.compile(r"^\s*(?:ROOT\s+)?%\S+\s+=\s+(?P<shape>.*?)\s+(?P<op>" + "|".join(_COLLECTIVES)
                         + r")(?:-start)?\(", re.MULTILINE)
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|f8e\w+)\[([\d,]*)\]")
_ITEM_BYTES = {"pred": 1, "bf16": 2}
# Custom calls a CPU build of a program may hold (LAPACK, ducc FFTs, XLA:CPU's own); none belongs
# in a TPU program.
CPU_CUSTOM_CALL = re.compile(r"lapack|ducc|xla_cpu|cpu_|__cpu|onednn|mkl", re.IGNORECASE)


def _array_bytes(text: str) -> int:
    total = 0
    for dtype, dims in _ARRAY.findall(text):
        size = 1
        for d in filter(None, dims.split(",")):
            size *= int(d)
        total += size * _ITEM_BYTES.get(dtype, max(1, int(re.sub(r"\D", "", dtype) or 8) // 8))
    return total


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """{kind: {"count", "bytes"}} of the collectives in optimized HLO text (bytes: their results)."""
    found: dict[str, dict[str, int]] = {}
    for m in _COLLECTIVE.finditer(hlo_text):
        entry = found.setdefault(m["op"], {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += _array_bytes(m["shape"])
    return found


def custom_calls(hlo_text: str) -> list[str]:
    return sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo_text)))


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return (text[:400] + "...") if len(text) > 400 else (text or type(e).__name__)


_UNITS = {"": 1, "B": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def _bytes_named(label: str, text: str) -> float | None:
    """'... required for HLO temporaries (99.31G) ...' -> bytes (the TPU compiler's out-of-memory message)."""
    m = re.search(label + r"\s*\((\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\)", text)
    return float(m[1]) * _UNITS[m[2]] if m else None


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}


@dataclasses.dataclass
class ProgramReport:
    name: str
    what: str
    compiled: bool
    error: str | None = None
    compile_seconds: float = 0.0
    hbm: dict | None = None             # bytes per chip
    fits: bool | None = None
    matmul_flops: float | None = None   # per chip per call, loops counted by their trip counts
    analytic_matmul_flops: float | None = None
    flops: float | None = None          # XLA's count, loops scaled by their trip counts
    traffic_floor_bytes: float | None = None   # what must cross HBM at least: arguments read, outputs written
    xla_flops_loops_once: float | None = None
    xla_bytes_loops_once: float | None = None
    collectives: dict | None = None
    custom_calls: list | None = None
    cpu_custom_calls: list | None = None
    floor_seconds: float | None = None  # estimate: max(matmul FLOPs / peak, traffic floor / bandwidth)
    bound: str | None = None            # "compute" or "memory", whichever sets the floor
    needed_temporaries: float | None = None    # the compiler's figure when it ran out of HBM
    available_hbm: float | None = None         # ... and what it had to give
    examples: int = 0
    full_depth: bool = False
    stage: int | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def compile_program(program: Program, chip: ChipSpec) -> ProgramReport:
    """Compiles `program` with the TPU compiler -> its report; a compiler error is reported, not raised."""
    report = ProgramReport(program.name, program.what, compiled=False, examples=program.examples,
                           full_depth=program.full_depth, stage=program.stage,
                           analytic_matmul_flops=program.analytic_matmul_flops)
    start = time.perf_counter()
    try:
        compiled = program.lower().compile()
    except Exception as e:   # noqa: BLE001 - the compiler's errors are untyped; they are the report
        report.compile_seconds = time.perf_counter() - start
        report.error = _one_line(e)
        report.fits = False if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower() else None
        report.needed_temporaries = _bytes_named(r"required for HLO temporaries", str(e))
        report.available_hbm = _bytes_named(r"available HBM", str(e))
        return report
    report.compile_seconds = time.perf_counter() - start
    report.compiled = True
    memory = compiled.memory_analysis()
    hbm = {"arguments": memory.argument_size_in_bytes, "outputs": memory.output_size_in_bytes,
           "temporaries": memory.temp_size_in_bytes, "aliased": memory.alias_size_in_bytes,
           "generated_code": memory.generated_code_size_in_bytes}
    hbm["total"] = hbm["arguments"] + hbm["outputs"] - hbm["aliased"] + hbm["temporaries"] + hbm["generated_code"]
    hbm["chip"] = chip.hbm_bytes
    report.hbm, report.fits = hbm, hbm["total"] <= chip.hbm_bytes
    text = compiled.as_text()
    report.collectives = collectives(text)
    report.custom_calls = custom_calls(text)
    report.cpu_custom_calls = [c for c in report.custom_calls if CPU_CUSTOM_CALL.search(c)]
    cost = _cost(compiled)
    jaxpr = program.trace()
    counted = costs_lib.jaxpr_costs(jaxpr, program.dynamic_trips)
    once = costs_lib.jaxpr_costs(jaxpr, loops_once=True)
    report.matmul_flops = counted.matmul_flops
    report.xla_flops_loops_once = float(cost.get("flops", 0.0))
    report.xla_bytes_loops_once = float(cost.get("bytes accessed", 0.0))
    report.flops = costs_lib.scale(report.xla_flops_loops_once, counted.flops, once.flops)
    # XLA's bytes accessed count every in-place update of a stacked [L, ...] buffer whole, so
    # they are no floor: the floor's traffic is what any program must move, its arguments and outputs.
    report.traffic_floor_bytes = float(hbm["arguments"] + hbm["outputs"])
    compute = counted.matmul_flops / chip.peak_bf16_flops
    memory_time = report.traffic_floor_bytes / chip.hbm_bytes_per_s
    report.floor_seconds = max(compute, memory_time)
    report.bound = "compute" if compute >= memory_time else "memory"
    return report
