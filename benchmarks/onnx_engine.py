"""ONNX Runtime as a baseline: what a user serving BERT on a CPU deploys instead (as TEI and
optimum do). The eager PyTorch twin's full forward (the same weights) is exported to ONNX with
dynamic batch and sequence axes and run by an `InferenceSession`, each batch at its own length
(its longest row), full depth: ONNX Runtime has no early exit.
"""

from __future__ import annotations

import os
import warnings
from typing import Mapping

import numpy as np

from benchmarks.harness import BenchmarkError
from benchmarks.torch_engine import DynamicBatchingEngine

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OPSET = 17


def export_onnx(torch_model, path: str, seq_len: int) -> str:
    """The twin's `full_forward` ([B, S] int64 ids, mask, token types -> [B, K] logits) as ONNX at `path`."""
    import torch

    class FullForward(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.model.full_forward(input_ids, attention_mask, token_type_ids)

    example = tuple(torch.ones((2, seq_len), dtype=torch.long) for _ in INPUTS)
    axes = {name: {0: "batch", 1: "sequence"} for name in INPUTS}
    wrapper = FullForward(torch_model.cpu()).eval()
    with torch.inference_mode(), warnings.catch_warnings():
        # transformers' attention reads a shape as a Python bool; the trace keeps the masked path, as wanted.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # The TorchScript exporter: it needs no onnxscript, and its graph is the one optimum exports.
        torch.onnx.export(wrapper, example, path, input_names=list(INPUTS), output_names=["logits"],
                          dynamic_axes={**axes, "logits": {0: "batch"}}, opset_version=OPSET, dynamo=False,
                          training=torch.onnx.TrainingMode.EVAL)
    # The exporter leaves the module in training mode (dropout on): the twin is timed after this.
    torch_model.eval()
    return path


def session(path: str, threads: int):
    """An ONNX Runtime CPU session with every graph optimisation, `threads` intra-op threads."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise BenchmarkError("the onnxruntime backend needs onnxruntime and onnx: pip install -r requirements.txt "
                             f"({e})") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def own_length(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`batch` cut to its longest row (at least 1 token), int64, as a user's runtime would receive it."""
    length = max(1, int(np.asarray(batch["attention_mask"]).sum(-1).max()))
    return {k: np.ascontiguousarray(np.asarray(batch[k])[:, :length], dtype=np.int64) for k in INPUTS}


# float32 on both sides; ONNX Runtime fuses and reorders the sums, so the logits differ in the last bits.
AGREEMENT_ATOL = 1e-4


def onnx_twin(torch_model, directory: str, seq_len: int, threads: int, example: Mapping[str, np.ndarray]):
    """Exports the twin under `directory` and opens it -> the session, checked on `example`."""
    os.makedirs(directory, exist_ok=True)
    ort_session = session(export_onnx(torch_model, os.path.join(directory, "model.onnx"), seq_len), threads)
    check_agreement(torch_model, ort_session, example)
    return ort_session


def check_agreement(torch_model, ort_session, example: Mapping[str, np.ndarray]) -> float:
    """The largest logit gap between the session and the twin on `example` (a batch, cut to its
    own length); over AGREEMENT_ATOL it is not the same model: BenchmarkError."""
    import torch
    batch = own_length(example)
    with torch.inference_mode():
        expected = torch_model.full_forward(*(torch.from_numpy(batch[k]) for k in INPUTS)).float().cpu().numpy()
    (got,) = ort_session.run(None, batch)
    gap = float(np.abs(got - expected).max())
    if not gap <= AGREEMENT_ATOL:
        raise BenchmarkError(f"the ONNX export's logits differ from the PyTorch twin's by {gap:.2e} "
                             f"(> {AGREEMENT_ATOL:g}): not the same model")
    return gap


class OnnxEngine(DynamicBatchingEngine):
    thread_name = "onnxruntime-engine"


def build_engine(config, params, lengths, threads: int | None = None):
    """`serving.server.EngineFactory` for `--backend onnxruntime`: the eager twin of the same
    weights exported to ONNX (checked against it), in the same dynamic-batching engine as
    `--backend torch` -> (engine, what it runs)."""
    import tempfile
    from benchmarks.benchmarking import torch_twin
    from benchmarks.harness import available_cpus
    threads = threads or available_cpus()
    longest = max(lengths)
    with tempfile.TemporaryDirectory() as tmp:
        twin = torch_twin(config, params, os.path.join(tmp, "torch"))
        rng = np.random.default_rng(0)
        example = {"input_ids": rng.integers(0, config.vocab_size, size=(2, longest)),
                   "attention_mask": np.ones((2, longest), np.int64), "token_type_ids": np.zeros((2, longest), np.int64)}
        ort_session = onnx_twin(twin, os.path.join(tmp, "onnx"), longest, threads, example)
    engine = OnnxEngine(lambda arrays: ort_session.run(None, arrays)[0], config.num_hidden_layers, lengths)
    return engine, f"ONNX Runtime {_version()}, full depth, dynamic batching (no early exit), {threads} threads"


def _version() -> str:
    import onnxruntime as ort
    return ort.__version__
