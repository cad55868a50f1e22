"""Write RESULTS.md from demo/pipeline run directories (each holds run.json, results.json, bench.json).

    python -m train.report workdirs/results/sst2 workdirs/results/mrpc ... --out RESULTS.md
        [--rules workdirs/rules/sst2.json workdirs/rules/mrpc.json ...]

Every number in the file is read from those JSON files; each section names the command that
produced it. Plots are copied to research/results/, and the run's JSON files (run.json with the
exit policy, results.json, bench.json) to research/results/NAME/, so every number has its file. `--rules` adds a section "Exit rules side by side"
from `train.compare_rules` JSON files: per task, its table, its plot (drawn again from the JSON,
into research/results/) and its command.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys

from deebert_jax.core.fileutil import atomic_write_text, check_outputs, same_path
from benchmarks.results import REFERENCE_BERT_BASE, format_markdown_section, portable_paths, relative_paths
from deebert_jax.commands.cli import one_line

RULES_INTRO = (
    "The exit rules (entropy, max-prob, patience) at the same drop budgets, in points of the task metric. "
    "For each model, "
    "`train.compare_rules` computes every ramp's logits once and, for each rule and budget, chooses on "
    "the calibration examples the threshold with the largest layer saving whose drop stays within the "
    "budget (as `train.calibrate` does); the drop and saving are then measured on the held-out examples, "
    "which the choice never saw. \"refused\": no threshold of that rule saves layers within the budget on "
    "the calibration examples.")


def _rules_section(comparisons, plots: str, base: str) -> str:
    """"Exit rules side by side": the intro, then per comparison its block and a plot drawn from
    its JSON into `plots` (linked relative to `base`, the folder of the Markdown file)."""
    from research import rule_comparison
    out, names = ["## Exit rules side by side", "", RULES_INTRO, ""], set()
    for result in comparisons:
        name = stem = f"{result['task']}_rules"
        while name in names:   # two comparisons of one task get distinct plot files
            name = f"{stem}_{len(names)}"
        names.add(name)
        png = rule_comparison.write_plot(result, os.path.join(plots, f"{name}.png"))
        out.append(rule_comparison.format_markdown(result, plot=os.path.relpath(png, base), heading="###"))
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.report", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="*", help="run directories written by python -m train.demo")
    p.add_argument("--out", default="RESULTS.md")
    p.add_argument("--plots", default="research/results", help="where the PNGs are copied (relative to --out's folder)")
    p.add_argument("--preamble", default=None, help="a Markdown file to put first (context, what was tried)")
    p.add_argument("--rules", nargs="+", default=[], metavar="FILE.json",
                   help="train.compare_rules outputs: a section comparing the exit rules, one block per file")
    args = p.parse_args(argv)
    if not args.runs and not args.rules:
        p.error("give run directories, --rules FILE.json ..., or both")
    from deebert_jax.cpu.process import setup_process
    setup_process()   # process-wide settings, before JAX runs anything

    base = os.path.dirname(os.path.abspath(args.out))
    plots = os.path.join(base, args.plots)
    loaded = []
    for run in args.runs:   # every run read before anything is written
        try:
            with open(os.path.join(run, "run.json")) as f:
                meta = json.load(f)
            with open(meta["results"]) as f:
                results = json.load(f)
            with open(meta["bench"]) as f:
                bench = json.load(f)
            for src in (meta["results"], meta["bench"]):
                if not os.path.isfile(os.path.splitext(src)[0] + ".png"):
                    raise FileNotFoundError(f"no plot {os.path.splitext(src)[0] + '.png'}")
        except (OSError, KeyError, json.JSONDecodeError) as e:
            print(f"error: {run}: not a finished run ({e})", file=sys.stderr)
            return 1
        loaded.append((run, meta, results, bench))
    comparisons = []
    if args.rules:
        from research import rule_comparison   # jax and the model code: only when asked for
    for path in args.rules:
        try:
            comparisons.append(rule_comparison.load_comparison(path))
        except (OSError, ValueError) as e:
            print(f"error: {one_line(e)}", file=sys.stderr)
            return 1
    # Before anything is written: the Markdown and the plots it copies are none of the files read.
    try:
        inputs = {"--preamble": args.preamble, **{f"--rules {path}": path for path in args.rules}}
        for run, meta, _, _ in loaded:
            for src in (os.path.join(run, "run.json"), meta["results"], meta["bench"]):
                inputs[f"run {run}: {os.path.basename(src)}"] = src
                inputs[f"run {run}: {os.path.basename(os.path.splitext(src)[0])}.png"] = os.path.splitext(src)[0] + ".png"
        check_outputs({"--out": args.out, **_plot_outputs(loaded, plots)}, inputs)
    except (OSError, ValueError) as e:   # OutputPathError is a ValueError
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    os.makedirs(plots, exist_ok=True)
    sections = []
    for (run, meta, results, bench), name in zip(loaded, _plot_names(loaded)):
        pngs = {}
        for kind, src in (("tradeoff", meta["results"]), ("latency", meta["bench"])):
            src_png = os.path.splitext(src)[0] + ".png"
            dst = os.path.join(plots, f"{name}_{kind}.png")
            if not same_path(src_png, dst):   # a run already under --plots: its plot is in place
                shutil.copyfile(src_png, dst)
            pngs[kind] = os.path.relpath(dst, base)
        # The JSON behind every number of the section, kept beside the plots (paths made relative).
        json_dir = os.path.join(plots, name)
        os.makedirs(json_dir, exist_ok=True)
        for file_name, data in (("run.json", meta), ("results.json", results), ("bench.json", bench)):
            atomic_write_text(os.path.join(json_dir, file_name), json.dumps(portable_paths(data), indent=1) + "\n")
        pngs["json"] = os.path.relpath(json_dir, base)
        sections.append(format_markdown_section(meta, results, bench, pngs, label=os.path.normpath(run)))
    if comparisons:
        sections.append(_rules_section(comparisons, plots, base))
    head = ["# Results", "",
            "Generated by `" + relative_paths(shlex.join(["python", "-m", "train.report", *args.runs, "--out", args.out]
                                                         + (["--preamble", args.preamble] if args.preamble else [])
                                                         + (["--rules", *args.rules] if args.rules else [])))
            + "` from the runs' "
            "JSON files; nothing here is typed by hand" + (" except the summary (`--preamble`)" if args.preamble else "")
            + ". Reference column: the Hugging Face Flax GLUE example "
            "with bert-base-cased, 3 epochs (" + ", ".join(f"{k} {v}" for k, v in REFERENCE_BERT_BASE.items()) + ").", ""]
    if args.preamble:
        with open(args.preamble) as f:
            head += [f.read().strip(), ""]
    atomic_write_text(args.out, "\n".join(head + sections) + "\n")
    print(f"wrote {args.out}")
    return 0


def _plot_names(loaded) -> list[str]:
    """One name per run for its files under --plots (two runs called `demo` get distinct ones)."""
    names: list[str] = []
    for run, *_ in loaded:
        name = base_name = os.path.basename(os.path.normpath(run))
        while name in names:
            name = f"{base_name}_{len(names)}"
        names.append(name)
    return names


def _plot_outputs(loaded, plots: str) -> dict[str, str]:
    """What the report writes under --plots, by the flag and name: each run's two plots (unless
    already in place there) and its JSON files (unless they are the run's own, rewritten in place)."""
    outputs = {}
    for (run, meta, _, _), name in zip(loaded, _plot_names(loaded)):
        for kind, src in (("tradeoff", meta["results"]), ("latency", meta["bench"])):
            dst = os.path.join(plots, f"{name}_{kind}.png")
            if not same_path(os.path.splitext(src)[0] + ".png", dst):
                outputs[f"--plots ({name}_{kind}.png)"] = dst
        for file_name, src in (("run.json", os.path.join(run, "run.json")), ("results.json", meta["results"]),
                               ("bench.json", meta["bench"])):
            dst = os.path.join(plots, name, file_name)
            if not same_path(src, dst):
                outputs[f"--plots ({name}/{file_name})"] = dst
    return outputs


entry = main   # the console script and `python -m`: `main` prints its own errors


if __name__ == "__main__":
    sys.exit(entry())
