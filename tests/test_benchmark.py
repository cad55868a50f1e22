"""The latency benchmark (schema, not speed) and the inference layout it times."""

import json
import os

import jax
import jax.numpy as jnp
import pytest

from benchmarks import benchmarking as bm
from benchmarks import harness
from benchmarks import report as bench_report
from deebert_jax.model import inference_step, modeling
from deebert_jax.core.config import tiny_config

CONFIG = tiny_config(num_hidden_layers=3)


@pytest.fixture(scope="module")
def params():
    return modeling.init_params(CONFIG, jax.random.PRNGKey(0))


# ----------------------------------------------------------------------------------------------
# The CLI end to end on a tiny random model: runs in seconds and checks the JSON, not the speed.

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from train.benchmark import main
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    rc = main(["--random-model", "tiny", "--task", "synthetic", "--probe-size", "128", "--batch-sizes", "1,2", "--thresholds", "0,0.7", "--runs", "3",
               "--warmup", "1", "--seq-len", "16", "--ablation", "--exit-aware", "--threads", "1", "--no-progress", "--out", str(out)])
    assert rc == 0
    return out, json.loads(out.read_text())


def test_cli_writes_valid_json_table_and_plot(tiny_run):
    out, result = tiny_run
    bench_report.validate(result)
    assert out.with_suffix(".md").read_text().count("\n| jax |") == 14
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"jax", "torch"} <= set(result["versions"])
    assert result["threads"]["torch"] >= 1 and result["matmul_gflops"]["jax"] > 0
    cells = {(r["backend"], r["mode"], r["batch_size"], r["threshold"]) for r in result["rows"]}
    assert cells == ({(b, m, bs, t) for b in ("jax", "torch") for bs in (1, 2)
                      for m, t in [("full", None), ("early_exit", 0.0), ("early_exit", 0.7)]}
                     | {("jax", m, bs, t) for bs in (1, 2) for m, t in [("full_stacked", None),
                                                                         ("early_exit_stacked", 0.0),
                                                                         ("exit_aware", 0.0), ("exit_aware", 0.7)]}
                     | {("onnxruntime", "full", bs, None) for bs in (1, 2)})   # on the CPU at fp32 by default
    assert all(r["seq_len"] == 16 and r["runs"] == 3 for r in result["rows"])
    assert result["inputs"].startswith("synthetic dev")
    assert {t["target"] for t in result["targets"]} >= {"P1", "P2", "P6"}
    assert result["precision"] == "fp32" and result["dtype"] == "float32"
    assert result["precision_settings"]["jax_default_matmul_precision"] == "highest"
    assert result["precision_settings"]["torch_float32_matmul_precision"] == "highest"
    assert "**precision** fp32 on both sides" in out.with_suffix(".md").read_text()
    assert result["attention"] == "default" and "**JAX attention** default" in out.with_suffix(".md").read_text()


def test_precision_names_and_the_older_dtype_flag():
    from benchmarks.precision import Precision, PrecisionError, resolve
    assert resolve(None) == Precision("fp32") and resolve(None, "bfloat16") == Precision("bf16")
    assert resolve("tf32", "float32").dtype == "float32" and resolve("bf16").dtype == "bfloat16"
    assert (Precision("tf32").jax_matmul_precision, Precision("tf32").torch_matmul_precision) == ("tensorfloat32", "high")
    with pytest.raises(PrecisionError, match="--dtype float32"):
        resolve("bf16", "float32")
    with pytest.raises(PrecisionError, match="'fp16'"):
        Precision("fp16")


def test_render_of_a_file_from_before_precision_existed(tiny_run, tmp_path):
    _, result = tiny_run
    older = {k: v for k, v in result.items() if k not in ("precision", "precision_settings", "attention")}
    (tmp_path / "cpu.json").write_text(json.dumps(older))
    bench_report.render(str(tmp_path / "cpu.json"))   # a CPU run: float32 is fp32, whatever the matmul precision flag
    assert json.loads((tmp_path / "cpu.json").read_text())["precision"] == "fp32"
    assert "**JAX attention** default" in (tmp_path / "cpu.md").read_text()   # before the choice existed
    gpu = dict(older, rows=[dict(r, device="gpu") for r in older["rows"]])
    (tmp_path / "gpu.json").write_text(json.dumps(gpu))
    with pytest.raises(harness.BenchmarkError, match="gpu.json: no 'precision' recorded and not a CPU run"):
        bench_report.render(str(tmp_path / "gpu.json"))


def test_cli_rows_report_exits_of_both_backends(tiny_run):
    _, result = tiny_run
    L = tiny_config().num_hidden_layers
    for r in result["rows"]:
        if r["threshold"] in (None, 0.0):
            assert r["mean_exit_layer"] == L  # threshold 0 never exits early
        else:
            # Two labels: entropy < ln 2 < 0.7, so every example leaves at the first ramp.
            assert r["mean_exit_layer"] == 1.0 and r["layer_saving"] == 0.5
            assert r["exit_histogram"] == [3 * r["batch_size"], 0]
        if r["backend"] == "jax":
            assert r["compile_s"] is not None and r["compile_s"] >= 0
        else:
            assert r["compile_s"] is None
        if r["backend"] == "jax" and r["mode"] == "early_exit":
            assert r["exit_agreement"] == 1.0  # same weights, same inputs, same exit layers


def test_cli_refuses_cudnn_attention_off_a_gpu_in_one_line(tmp_path, capsys):
    from train.benchmark import main
    out = tmp_path / "b.json"
    rc = main(["--random-model", "tiny", "--attention", "cudnn", "--runs", "1", "--out", str(out)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 1 and "Traceback" not in err and len(lines) == 1
    assert lines[0].startswith("error: attention='cudnn': cuDNN's fused attention needs an NVIDIA GPU, and JAX is "
                               "running on cpu"), lines
    assert os.listdir(tmp_path) == []   # refused before any work: nothing written


def test_attention_choice_reaches_every_jax_call(monkeypatch):
    """`--attention` goes to the full forward and to both predictors (stubs record what they get)."""
    from deebert_jax.inference import early_exit
    from deebert_jax.inference import exit_aware
    seen = []

    def forward(config, params, ids, mask, types, dtype, *, attention_impl="default"):
        seen.append(("full", attention_impl))
        return jnp.zeros(())

    def predictor(mode):
        def predict(*args, attention_impl="default", **kwargs):
            seen.append((mode, attention_impl))
            return early_exit.ExitResult(jnp.zeros((1, 2)), jnp.ones((1,), jnp.int32), jnp.int32(1))
        return predict

    monkeypatch.setattr(inference_step, "forward", forward)
    monkeypatch.setattr(early_exit, "early_exit_predict", predictor("early_exit"))
    monkeypatch.setattr(exit_aware, "exit_aware_predict", predictor("exit_aware"))
    batch = {k: jnp.ones((1, 4), jnp.int32) for k in ("input_ids", "attention_mask", "token_type_ids")}
    cells = bm._jax_cells(CONFIG, {}, [batch], [0.0], "entropy", jnp.float32, "cpu", stacked_params={},
                          exit_aware=True, attention="dot_product_attention")
    for cell in cells:
        cell.call(0)
    assert len(cells) == 5   # full, early_exit, exit_aware and the two on the stacked layout
    # (The full forward's stub records its trace: both layouts share one.)
    assert set(seen) == {(mode, "dot_product_attention") for mode in ("full", "early_exit", "exit_aware")}
    with pytest.raises(harness.BenchmarkError, match="attention='flash'"):
        bm.BenchmarkSpec(attention="flash").check()


def test_cli_rejects_bad_flags(tmp_path, capsys):
    from train.benchmark import main
    rc = main(["--random-model", "tiny", "--thresholds", "0,-1", "--runs", "2", "--out", str(tmp_path / "b.json")])
    assert rc == 1 and "threshold -1.0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--random-model", "gpt", "--out", str(tmp_path / "b.json")])


# ----------------------------------------------------------------------------------------------
# Harness pieces

def test_timing_statistics():
    t = harness.Timing([float(x) for x in range(1, 11)])
    assert t.median_ms == 5.5 and t.mean_ms == 5.5
    assert t.p90_ms == pytest.approx(9.1)
    calls = []
    stats = harness.time_calls(lambda: calls.append(1), runs=4, warmup=2)
    assert len(calls) == 6 and len(stats.times_ms) == 4


def test_interleaved_timer_takes_turns():
    order, rounds = [], []
    timings = harness.time_interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, rounds=3,
                                  warmup=2, cpu=True, on_round=rounds.append)
    assert order == ["a", "a", "b", "b"] + ["a", "b"] * 3 and rounds == [0, 1, 2]
    assert list(timings) == ["a", "b"]
    for t in timings.values():
        assert len(t.times_ms) == len(t.cpu_ms) == 3 and t.min_ms <= t.median_ms and t.min_cpu_ms >= 0
    assert harness.time_interleaved({"a": lambda: None}, rounds=2)["a"].cpu_ms is None


def test_cli_records_paths_relative_to_the_checkout(tmp_path, monkeypatch):
    from train.benchmark import main
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "bench" / "b.json"
    assert main(["--random-model", "tiny", "--backends", "jax", "--batch-sizes", "1", "--thresholds", "0",
                 "--runs", "1", "--warmup", "1", "--seq-len", "8", "--probe-size", "64", "--threads", "1",
                 "--no-progress", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["command"].endswith("--out bench/b.json")


def test_a_stopped_run_keeps_the_batch_sizes_it_timed(tmp_path, monkeypatch):
    """A run cut short (a time limit, a lost machine) leaves bench.json with what it timed, marked
    incomplete; the recorded command names XLA_FLAGS, which change what is measured."""
    from train.benchmark import main
    real, calls = harness.run_cells, []

    def stop_at_the_second_batch_size(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(bm, "run_cells", stop_at_the_second_batch_size)
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_hlo_as_text")   # read for the record only: JAX is running
    out = tmp_path / "b.json"
    with pytest.raises(KeyboardInterrupt):
        main(["--random-model", "tiny", "--backends", "jax", "--batch-sizes", "1,2", "--thresholds", "0",
              "--runs", "1", "--warmup", "1", "--seq-len", "8", "--probe-size", "64", "--threads", "1",
              "--no-progress", "--out", str(out)])
    result = json.loads(out.read_text())
    assert {r["batch_size"] for r in result["rows"]} == {1}
    assert result["incomplete"] == "batch sizes 1 of 1, 2 timed so far"
    settings, command = result["command"].split("python -m train.benchmark ")
    assert "XLA_FLAGS=--xla_dump_hlo_as_text " in settings and command.endswith(f"--out {out}")
    assert "**Incomplete**" in (tmp_path / "b.md").read_text()


def test_batches_cycle_through_the_pool():
    assert harness.batch_rows(5, 2, 0).tolist() == [0, 1]
    assert harness.batch_rows(5, 2, 2).tolist() == [4, 0]


def test_inputs_and_spec_are_checked():
    arrays = harness.random_inputs(CONFIG.vocab_size, 4, 8)
    assert harness.check_input_pool(arrays, CONFIG) == 4 and arrays["attention_mask"].all()
    with pytest.raises(harness.BenchmarkError, match="max_position_embeddings"):
        harness.check_input_pool(harness.random_inputs(CONFIG.vocab_size, 2, CONFIG.max_position_embeddings + 1), CONFIG)
    bad = dict(arrays, input_ids=arrays["input_ids"] + CONFIG.vocab_size)
    with pytest.raises(harness.BenchmarkError, match="token ids"):
        harness.check_input_pool(bad, CONFIG)
    with pytest.raises(harness.BenchmarkError, match="runs=0"):
        bm.BenchmarkSpec(runs=0).check()
    with pytest.raises(harness.BenchmarkError, match="backends"):
        bm.BenchmarkSpec(backends=("tf",)).check()


def _row(**kw):
    row = dict(backend="jax", mode="full", batch_size=1, seq_len=128, threshold=None, median_ms=10.0, p90_ms=12.0,
               mean_exit_layer=6.0, compile_s=1.0, layer_saving=0.0, wall_saving=0.0)
    row.update(kw)
    return row


def test_validate_names_the_key_at_fault():
    good = {"device": "cpu", "versions": {"jax": "x", "torch": "y"}, "precision": "fp32", "rows": [_row()]}
    bench_report.validate(good)
    bench_report.validate({**good, "attention": "cudnn"})   # without the key: an older file, which ran "default"
    for broken, key in [({**good, "rows": []}, "rows"),
                        ({k: v for k, v in good.items() if k != "precision"}, "precision"),
                        ({**good, "precision": "float32"}, "precision"),
                        ({**good, "attention": "flash"}, "attention"),
                        ({k: v for k, v in good.items() if k != "device"}, "device"),
                        ({**good, "rows": [_row(median_ms="fast")]}, "median_ms"),
                        ({**good, "rows": [_row(backend="tf")]}, "backend"),
                        ({**good, "rows": [_row(p90_ms=1.0)]}, "p90_ms"),
                        ({**good, "rows": [{k: v for k, v in _row().items() if k != "compile_s"}]}, "compile_s"),
                        ({**good, "rows": [_row(mode="early_exit")]}, "threshold")]:
        with pytest.raises(harness.BenchmarkError, match=key):
            bench_report.validate(broken)


def test_targets_are_computed_from_rows():
    rows = [_row(median_ms=6.0), _row(backend="torch", median_ms=10.0, compile_s=None),
            _row(mode="early_exit", threshold=0.0, median_ms=6.6, compile_s=12.0),
            _row(mode="early_exit", threshold=0.5, median_ms=3.0, mean_exit_layer=3.0, layer_saving=0.5,
                 wall_saving=0.48)]
    targets = {t["target"]: t for t in bench_report.check_targets({"rows": rows, "jax_platform": "cpu"})}
    assert targets["P1"]["value"] == 0.6 and targets["P1"]["met"]
    assert targets["P2"]["value"] == 1.1 and not targets["P2"]["met"]
    assert targets["P3"]["value"] == 0.96 and targets["P3"]["met"]
    assert targets["P6"]["value"] == 12.0 and not targets["P6"]["met"]


def test_typical_mean_weights_each_exit_depth_by_its_share():
    times = [10.0, 11.0, 1000.0, 30.0, 31.0, 29.0]   # one stalled run among the 1-layer runs
    layers = [1, 1, 1, 3, 3, 3]
    assert harness.typical_mean_ms(times, layers) == pytest.approx(0.5 * 11.0 + 0.5 * 30.0)
    assert harness.typical_mean_ms([5.0, 7.0], [2, 2]) == 6.0


def test_busy_machine_is_flagged():
    rows = [_row(median_ms=6.0), _row(backend="torch", median_ms=10.0, compile_s=None)]
    quiet = {"rows": rows, "cpu_cores": 2, "load_average_before": [1.5, 1, 1], "load_average_after": [1.9, 1, 1]}
    busy = {**quiet, "load_average_after": [7.9, 6, 6]}
    assert bench_report.contention_warning(quiet) is None
    assert "7.9 on 2 cores" in bench_report.contention_warning(busy)
    assert "note" not in bench_report.check_targets(quiet)[0] and "busy" in bench_report.check_targets(busy)[0]["note"]
    one_thread = {**busy, "threads": {"requested": 1}}
    assert "no barrier can stall" in bench_report.contention_warning(one_thread)
    assert "note" not in bench_report.check_targets(one_thread)[0]


def test_render_rederives_outputs(tiny_run, tmp_path):
    from train.benchmark import main
    out, result = tiny_run
    copy = tmp_path / "again.json"
    copy.write_text(json.dumps({**result, "targets": []}))
    assert main(["--render", str(copy)]) == 0
    assert json.loads(copy.read_text())["targets"] == result["targets"]
    assert (tmp_path / "again.md").read_text() == out.with_suffix(".md").read_text()


def test_profile_layer_times_every_piece(capsys):
    from train import profile_layer
    assert profile_layer.main(["--batch-size", "2", "--seq-len", "8", "--runs", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    timed = [line for line in lines[1:] if line.strip().split()[1] == "ms"]
    assert len(timed) == 13 and all(float(line.split()[0]) > 0 for line in timed)


# ----------------------------------------------------------------------------------------------
# The training-step benchmark: the same weights, device and precision on both sides (schema only).

def _step_result(**changes):
    result = {"model": "random tiny", "batch_size": 8, "seq_len": 16, "steps": 1, "device": "cpu x1 (x86_64, 2 cores)",
              "torch_device": "cpu", "precision": "bf16", "versions": {"jax": "x", "torch": "y"},
              "threads": {"xla_cpu": 1, "torch": 1}, "load_average_before": [0.1], "load_average_after": [0.2],
              "median_step_seconds": {"torch_adamw": 0.4, "jax_stage1": 0.2, "jax_stage2": 0.05},
              "min_step_seconds": {"torch_adamw": 0.4, "jax_stage1": 0.2, "jax_stage2": 0.05},
              "examples_per_second": {"torch_adamw": 20.0, "jax_stage1": 40.0, "jax_stage2": 160.0},
              "jax_stage1_vs_torch_examples_per_second": 2.0, "stage2_vs_stage1_step_time": 0.25}
    result.update(changes)
    return result


def test_benchmark_train_schema_names_the_key_at_fault():
    from benchmarks import train_step as step_benchmark
    step_benchmark.validate(_step_result())
    assert "precision bf16 on both sides" in step_benchmark.table(_step_result())
    for key in ("precision", "torch_device"):
        with pytest.raises(ValueError, match=key):
            step_benchmark.validate({k: v for k, v in _step_result().items() if k != key})
    with pytest.raises(ValueError, match="'precision'='float32'"):
        step_benchmark.validate(_step_result(precision="float32"))
    with pytest.raises(ValueError, match="median_step_seconds.jax_stage2=0"):
        step_benchmark.validate(_step_result(median_step_seconds={"torch_adamw": 0.4, "jax_stage1": 0.2,
                                                                  "jax_stage2": 0}))


@pytest.mark.slow   # about 25 s: `pytest -m slow`
def test_benchmark_train_records_its_precision_and_device(tmp_path):
    from benchmarks import train_step as step_benchmark
    from train.benchmark_train import main
    out = tmp_path / "bt.json"
    result = main(["--random-model", "tiny", "--precision", "tf32", "--batch-size", "8", "--seq-len", "16",
                   "--steps", "1", "--warmup", "1", "--out", str(out)])
    written = json.loads(out.read_text())
    step_benchmark.validate(written)
    assert written == json.loads(json.dumps(result))
    assert written["precision"] == "tf32" and written["precision_settings"]["torch_float32_matmul_precision"] == "high"
    assert written["model"] == "random tiny" and (written["jax_platform"], written["torch_device"]) == ("cpu", "cpu")
    assert set(written["median_step_seconds"]) == {"torch_adamw", "jax_stage1", "jax_stage2"}
    for key in ("precision", "torch_device"):
        with pytest.raises(ValueError, match=key):
            step_benchmark.validate({k: v for k, v in written.items() if k != key})
    with pytest.raises(ValueError, match="'precision'='float32'"):
        step_benchmark.validate(dict(written, precision="float32"))
