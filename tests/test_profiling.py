"""`profiling`: trace events joined with the optimized HLO, summed per category."""

import gzip
import json

import pytest

from benchmarks import profiling

HLO = """HloModule jit_step

%fused_computation.3 (param_0: f32[4096,1536], param_1: f32[384,1536]) -> f32[4096,384] {
  %param_0 = f32[4096,1536]{1,0} parameter(0)
  %param_1 = f32[384,1536]{1,0} parameter(1)
  ROOT %dot.1 = f32[4096,384]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={1}
}

ENTRY %main (p: f32[4096,1536]) -> f32[4096,384] {
  %ynn_fusion.3 = f32[4096,384]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_computation.3, metadata={op_name="jit(f)/transpose(jvp(DeeBert))/while/body/closed_call/layers.body/layers/intermediate/dot_general"}
  %broadcast_add_fusion.2 = u32[32,12,128,128]{3,2,1,0} fusion(%c), kind=kLoop, calls=%fused_computation.9, metadata={op_name="jit(f)/jvp(DeeBert)/layers/Dropout_0/jit(_bernoulli)/jit(_uniform)/add"}
  %wrapped_broadcast.1 = f32[6,32,128,1536]{3,2,1,0} fusion(%d), kind=kLoop, calls=%wrapped_broadcast_computation.1
  ROOT %add_fusion = f32[4096,384]{1,0} fusion(%e), kind=kLoop, calls=%fused_computation.12, metadata={op_name="jit(f)/jvp(DeeBert)/add"}
}
"""


def _trace(tmp_path, events):
    folder = tmp_path / "plugins" / "profile" / "run"
    folder.mkdir(parents=True)
    with gzip.open(folder / "host.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    return str(tmp_path)


def test_operations_are_joined_with_their_hlo_and_categorized(tmp_path):
    x = lambda name, dur: {"ph": "X", "name": name, "dur": dur}
    trace = _trace(tmp_path, [x("ynn_fusion.3", 3000), x("ynn_fusion.3", 1000), x("broadcast_add_fusion.2", 500),
                              x("wrapped_broadcast.1", 700), x("add_fusion", 100),
                              x("ThunkExecutor::Execute", 99999), {"ph": "i", "name": "marker"}])
    ops = profiling.op_table(trace, HLO, runs=2)
    assert [op["name"] for op in ops] == ["ynn_fusion.3", "wrapped_broadcast.1", "broadcast_add_fusion.2", "add_fusion"]
    matmul = ops[0]
    assert matmul["ms"] == 2.0 and matmul["calls"] == 1
    assert matmul["shape"] == "f32[4096,384]{1,0}"
    assert matmul["dot"] == "lhs_contracting_dims={1}, rhs_contracting_dims={1}"
    assert matmul["category"] == "matmul, backward"
    assert profiling.short_source(matmul["source"]) == "backward: layers/intermediate/dot_general"
    cats = profiling.by_category(ops)
    assert list(cats)[:3] == ["matmul, backward", "loop bookkeeping (stacked residuals, slices)", "dropout bits"]
    assert cats["matmul, backward"] == 2.0 and cats["dropout bits"] == 0.25 and cats["other"] == 0.05
    assert set(cats) == set(profiling.CATEGORIES)


def test_missing_trace_or_dump_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="trace.json.gz"):
        profiling.trace_durations(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="optimized HLO"):
        profiling.largest_hlo_dump(str(tmp_path))
    (tmp_path / "module_1.jit_a.cpu_after_optimizations.txt").write_text("small")
    (tmp_path / "module_2.jit_b.cpu_after_optimizations.txt").write_text("the larger one")
    assert profiling.largest_hlo_dump(str(tmp_path)) == "the larger one"


def test_torch_ops_are_categorized_forward_backward_and_optimizer():
    assert profiling.torch_category("aten::addmm", backward=False, optimizer=False) == "matmul, forward"
    assert profiling.torch_category("aten::mm", backward=True, optimizer=False) == "matmul, backward"
    assert profiling.torch_category("aten::bernoulli_", backward=False, optimizer=False) == "dropout"
    assert profiling.torch_category("aten::gelu_backward", backward=True, optimizer=False) == "gelu"
    assert profiling.torch_category("aten::native_layer_norm", backward=False, optimizer=False) == "layer norm"
    assert profiling.torch_category("aten::mul_", backward=False, optimizer=True) == "optimizer (clipping, AdamW)"
    assert profiling.torch_category("aten::copy_", backward=True, optimizer=False) == "other"

    class Event:
        def __init__(self, name, us, parent=None):
            self.name, self.self_cpu_time_total, self.cpu_parent = name, us, parent

    node = Event("autograd::engine::evaluate_function: AddmmBackward0", 10)
    opt = Event("Optimizer.step#AdamW.step", 5)
    events = [Event("aten::addmm", 3000), Event("aten::mm", 3000, Event("AddmmBackward0", 1, node)), node,
              Event("aten::mm", 1000, Event("AddmmBackward0", 1, node)), Event("aten::lerp_", 2000, opt), opt]
    ops = profiling.torch_op_table(events, runs=2)
    assert ops[0] == {"name": "aten::mm", "ms": 2.0, "calls": 1.0, "backward": True, "category": "matmul, backward"}
    cats = profiling.by_torch_category(ops)
    assert cats["matmul, forward"] == 1.5 and cats["optimizer (clipping, AdamW)"] == 1.0025
    assert set(cats) == set(profiling.TORCH_CATEGORIES)


def test_profile_step_torch_writes_categories(tmp_path, capsys):
    pytest.importorskip("torch")
    from train import profile_step
    out = tmp_path / "torch.json"
    assert profile_step.main(["--torch", "--batch-size", "2", "--seq-len", "8", "--runs", "1", "--threads", "1",
                              "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    cats = result["categories_ms"]
    assert result["variant"] == "torch_adamw" and set(cats) == set(profiling.TORCH_CATEGORIES)
    assert cats["matmul, forward"] > 0 and cats["matmul, backward"] > 0 and cats["optimizer (clipping, AdamW)"] > 0
    assert "torch_adamw: MiniLM-L6, batch 2, length 8" in capsys.readouterr().out


@pytest.mark.parametrize("threshold", [None, "0.5"])
def test_profile_predict_sums_the_operations_of_one_prediction(tmp_path, threshold):
    import subprocess
    import sys

    from tests.conftest import REPO
    out = tmp_path / "p.json"
    argv = ["--random-model", "tiny", "--seq-len", "8", "--runs", "3", "--threads", "1", "--out", str(out)]
    argv += ["--threshold", threshold] if threshold else []
    # Its own process: XLA reads the trace flags when JAX starts, which this one has done.
    done = subprocess.run([sys.executable, "-m", "train.profile_predict", *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    cats = result["categories_ms"]
    assert set(cats) == set(profiling.INFERENCE_CATEGORIES) and cats["matmul, forward"] > 0
    assert result["operations_ms"] == pytest.approx(sum(cats.values()))
    assert result["wall_ms"] > 0 and all(op["shape"] for op in result["operations"])
    assert ("early exit at entropy 0.5" if threshold else "full forward") in result["what"]
