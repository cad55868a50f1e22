"""The serving benchmark's pure parts: Poisson arrivals, per-rate statistics, capacity, targets."""

import numpy as np
import pytest

from benchmarks import serving as bench, loadgen
from benchmarks.loadgen import Outcome


def test_poisson_arrivals_are_open_loop_at_the_rate_and_bounded():
    times = loadgen.poisson_arrivals(200.0, 20.0, 10_000, seed=0)
    assert np.all(np.diff(times) > 0) and times[-1] < 20.0
    assert len(times) / 20.0 == pytest.approx(200.0, rel=0.05)
    gaps = np.diff(times)
    assert np.std(gaps) / np.mean(gaps) == pytest.approx(1.0, abs=0.05)  # exponential gaps
    assert len(loadgen.poisson_arrivals(200.0, 20.0, 50, seed=0)) == 50
    with pytest.raises(ValueError, match="must be positive"):
        loadgen.poisson_arrivals(0.0, 1.0, 10, seed=0)


def test_summary_counts_errors_accuracy_and_agreement_with_predict():
    labels = [1, 0, 1]
    reference = [(1, 2), (0, 6), (0, 1)]
    outcomes = [Outcome(0, 0.0, 0.010, 200, 1, 2), Outcome(1, 0.5, 0.030, 200, 0, 6),
                Outcome(2, 1.0, 0.020, 200, 0, 1), Outcome(0, 1.5, 0.5, 503, error="queue is full"),
                Outcome(1, 1.6, 30.0, 0, error="TimeoutError")]
    row = loadgen.summarize(outcomes, rate=3.0, duration_s=2.0, labels=labels, reference=reference)
    assert row["requests"] == 5 and row["errors"] == 2
    assert row["achieved_rps"] == pytest.approx(3 / 1.02, rel=1e-3)  # first send to last answer
    assert row["p50_ms"] == 20.0 and row["mean_exit_layer"] == 3.0
    assert row["accuracy"] == pytest.approx(2 / 3, abs=1e-4) and row["same_as_predict"] == 1.0
    assert any(k.startswith("503") for k in row["error_kinds"]) and any(k.startswith("0 ") for k in row["error_kinds"])


def test_capacity_is_the_highest_rate_within_the_slo_without_errors():
    rows = [{"offered_rps": 10, "p99_ms": 50, "errors": 0}, {"offered_rps": 20, "p99_ms": 240, "errors": 0},
            {"offered_rps": 30, "p99_ms": 200, "errors": 1}, {"offered_rps": 40, "p99_ms": 900, "errors": 0}]
    assert loadgen.capacity(rows, 250) == 20
    assert loadgen.capacity(rows, 40) is None


def test_targets_compare_capacities_and_the_median_at_sixty_percent():
    def rows(*points):
        return [{"offered_rps": r, "p50_ms": p50, "p99_ms": p99, "errors": 0, "mean_exit_layer": exit_,
                 "same_as_predict": 1.0} for r, p50, p99, exit_ in points]
    result = {"layers": 6, "modes": {
        "full_depth": {"capacity_rps": 100, "rows": rows((100, 50, 200, 6.0), (60.0, 40, 100, 6.0))},
        "early_exit": {"capacity_rps": 150, "rows": rows((150, 40, 240, 4.0), (60.0, 20, 60, 4.0))},
        "torch": {"capacity_rps": 40, "rows": rows((40, 100, 240, 6.0))},
        "onnxruntime": {"capacity_rps": 75, "rows": rows((75, 60, 240, 6.0))},
        "early_exit_unshadowed": {"capacity_rps": 160, "rows": rows((160, 40, 240, 4.0))}}}
    t = bench.targets(result)
    assert t["layer_saving"] == pytest.approx(1 / 3, abs=1e-4)
    assert t["early_exit_vs_full_depth"] == {"ratio": 1.5, "ideal": 1.5, "target": 1.275}
    assert t["early_exit_vs_torch"]["ratio"] == 3.75
    assert t["early_exit_vs_onnxruntime"] == {"ratio": 2.0, "target": 1.5}
    assert t["shadow_cost"] == {"share": 0.062, "target": 0.05}
    assert t["median_at_60_percent"]["ratio"] == 0.5 and t["median_at_60_percent"]["rate_rps"] == 60.0


def test_client_retries_a_pooled_connection_the_server_closed():
    """A keep-alive connection the server closes while it sits idle in the pool must not turn
    the next request into an error (the server never saw it)."""
    import asyncio

    async def scenario():
        connections = []

        async def handle(reader, writer):  # answers one request, then closes: a keep-alive timeout
            connections.append(writer)
            await reader.readuntil(b"\r\n\r\n")
            body = b'[{"label_id": 1, "exit_layer": 2}]'
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = loadgen._Client("127.0.0.1", port)
        first = await client.post("/predict", b"{}", timeout=5)
        await asyncio.sleep(0.2)  # the server has closed the pooled connection by now
        second = await client.post("/predict", b"{}", timeout=5)
        client.close()
        server.close()
        return first, second, len(connections)

    first, second, opened = asyncio.run(scenario())
    assert first[0] == second[0] == 200 and opened == 2


def test_the_report_names_no_model_path_outside_the_checkout(tmp_path):
    inside, outside = tmp_path / "repo" / "workdirs" / "m", tmp_path / "elsewhere" / "model"
    assert bench.model_label(str(inside), root=str(tmp_path / "repo")) == "workdirs/m"
    assert bench.model_label(str(outside), root=str(tmp_path / "repo")) == "MODEL_DIR"
    line = f"model: {outside} (6 layers); rule entropy, threshold 0.5 from {outside}/exit_policy.json"
    named = bench.name_model(line, str(outside), "workdirs/demo/train/model")
    assert str(tmp_path) not in named
    assert named == ("model: workdirs/demo/train/model (6 layers); rule entropy, threshold 0.5 from "
                     "workdirs/demo/train/model/exit_policy.json")
    # A longer path that merely starts with the model's is left alone.
    assert bench.name_model(f"--out {outside}-2/x", str(outside), "M") == f"--out {outside}-2/x"
    assert bench.server_args("early_exit", "m", 64, "deepest")[-2:] == ["--schedule", "deepest"]
    assert "--schedule" not in bench.server_args("torch", "m", 64, "deepest")
    onnx = bench.server_args("onnxruntime", "m", 64, "deepest")
    assert onnx[-2:] == ["--backend", "onnxruntime"] and "--schedule" not in onnx
    assert bench.server_args("early_exit_unshadowed", "m", 64)[-2:] == ["--shadow-share", "0"]


def test_capacity_over_repeats_gives_its_spread_interpolation_and_saturation():
    def row(rate, p99, achieved, repeat, errors=0):
        return {"offered_rps": rate, "p99_ms": p99, "achieved_rps": achieved, "errors": errors, "repeat": repeat}
    rows = [row(10, 50, 10, 0), row(20, 150, 20, 0), row(30, 350, 27, 0),
            row(10, 60, 10, 1), row(20, 300, 19, 1), row(30, 900, 25, 1, errors=2),
            row(10, 40, 10, 2), row(20, 200, 20, 2), row(30, 240, 29, 2)]
    assert loadgen.interpolated_capacity(rows[:3], 250) == 25.0   # p99 150 -> 350 crosses 250 halfway
    assert loadgen.interpolated_capacity(rows[3:6], 250) == round(10 + (250 - 60) / (300 - 60) * 10, 2)
    assert loadgen.interpolated_capacity(rows[6:], 250) == 30.0   # nothing measured above
    over = loadgen.capacity_over_repeats(rows, 250)
    assert over["repeats"] == 3
    assert over["capacity_rps"] == {"median": 20.0, "min": 10, "max": 30, "each": [20, 10, 30]}
    assert over["saturation_rps"]["each"] == [27, 25, 29]
    assert loadgen.capacity_over_repeats(rows[:3], 250)["capacity_rps"]["median"] == 20.0   # no `repeat`: one
