"""`python -m train.serve` in a checkout: `deebert_jax.commands.serve` (installed as `deebert-serve`),
plus `--backend torch` and `--backend onnxruntime`, the serving benchmark's baselines, which are
not installed."""
from train import stand_in


def _torch_engine(config, params, lengths):
    from benchmarks.torch_engine import build_engine   # torch loads only for --backend torch
    return build_engine(config, params, lengths)


def _onnx_engine(config, params, lengths):
    from benchmarks.onnx_engine import build_engine   # torch and onnxruntime load only for this backend
    return build_engine(config, params, lengths)


stand_in(__name__, "deebert_jax.commands.serve", engine_factories={"torch": _torch_engine,
                                                                    "onnxruntime": _onnx_engine})
