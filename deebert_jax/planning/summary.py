"""A plan (`planning.plan.make_plan`) as the terminal table `train.plan` prints."""

from __future__ import annotations

GIB = 2 ** 30


def _gib(n) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _collectives(found: dict | None) -> str:
    if not found:
        return "-"
    return ", ".join(f"{k} x{v['count']} ({v['bytes'] / 2**20:.1f} MiB)" for k, v in sorted(found.items()))


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]


def format_plan(plan: dict) -> str:
    chip = plan["chip"]
    out = [f"{plan['topology']}: {plan['chips']} x {chip['device_kind']} ({chip['hbm_bytes'] / GIB:.0f} GiB HBM, "
           f"{chip['peak_bf16_flops'] / 1e12:.0f} TFLOP/s bf16, {chip['hbm_bytes_per_s'] / 1e9:.0f} GB/s) on "
           f"{plan['hosts']} host(s), {plan['chips_per_host']} chips each",
           f"model: {plan['model']['source']}, {plan['model']['layers']} layers, width {plan['model']['hidden_size']}, "
           f"{plan['model']['parameters'] / 1e6:.1f}M parameters; task {plan['task']}, {plan['train_rows']} training "
           f"rows ({plan['train_rows_source']}); per-chip batch {plan['per_chip_batch']} (global "
           f"{plan['global_batch']}) x {plan['max_seq_length']}, {plan['dtype']}", ""]
    rows = []
    for p in plan["programs"]:
        if not p["compiled"]:
            rows.append([p["name"], "no: " + (p["error"] or "")[:120], "", "", "", "", "", "", "", f"{p['compile_seconds']:.1f}"])
            continue
        hbm = p["hbm"]
        check = "" if p["analytic_matmul_flops"] is None else \
            f" ({p['analytic_matmul_flops'] / 1e12:.4g} by hand)"
        depth = " at full depth" if p["full_depth"] else ""
        rows.append([p["name"], "yes" if p["fits"] else "yes, over HBM", _gib(hbm["total"]), _gib(hbm["arguments"]),
                     _gib(hbm["temporaries"]), f"{p['matmul_flops'] / 1e12:.4g}{check}{depth}",
                     f"{p['traffic_floor_bytes'] / 1e9:.3g}", _collectives(p["collectives"]),
                     f"{_duration(p['floor_seconds'])} ({p['bound']})", f"{p['compile_seconds']:.1f}"])
    out += _table(["program", "compiled", "HBM/chip GiB", "arguments", "temporaries", "matmul TFLOP/chip",
                   "GB moved (at least)", "collectives", "floor (estimate)", "compile s"], rows)
    if plan["training"]:
        out += ["", "training on the slice (estimates: roofline floors from the compiler's analysis, not measurements):"]
        out += _table(["stage", "steps", "step floor", "examples/s per chip", "examples/s per slice", "stage floor"],
                      [[s["stage"], s["steps"], _duration(s["step_seconds_floor"]),
                        f"{s['examples_per_second_per_chip']:.0f}", f"{s['examples_per_second_per_slice']:.0f}",
                        _duration(s["stage_seconds_floor"])] for s in plan["training"]])
        out.append(f"the configured run: at least {_duration(plan['run_seconds_floor'])} of training steps "
                   "(estimate; evaluation, checkpoints and input not included)")
    for s in plan["largest_batch"]:
        tried = ", ".join(f"{p['batch']}: {_gib(p['hbm_total'])} GiB{'' if p['fits'] else ' (does not fit)'}"
                          for p in s["probes"])
        out.append(f"stage {s['stage']}: largest per-chip batch that fits: {s['largest'] or 'none'} "
                   f"(compiled {tried})")
    if plan.get("largest_per_chip_batch"):
        out.append(f"the run's largest per-chip batch (both stages): {plan['largest_per_chip_batch']}")
    if plan.get("refusal"):
        out += ["", f"refused: {plan['refusal']}"]
    return "\n".join(out)
