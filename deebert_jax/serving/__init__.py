"""Serving an early-exit classifier over HTTP.

- `requests`: a predict body -> examples (400 / 413 errors naming the field), examples -> rows
  padded to a few lengths;
- `scheduler`: which rows run next (pure bookkeeping, no JAX);
- `engine`: the device worker: pools of rows, one jitted layer step per padded length, answers
  the moment a row exits (`torch_engine`: the eager PyTorch baseline behind the same interface);
- `metrics`: the Prometheus metrics;
- `bodies`: the other request bodies (pydantic models, no unknown field) and their inputs;
  `answers`: logits -> the scored label lists of the Hugging Face APIs; `openapi`: the schema and docs page;
- `app`: the ASGI app (`/health`, `/predict`, `/`, `/info`, `/metrics`); `tei`: Text Embeddings
  Inference's routes over the same service (`--api tei`); `server`: one process (bind, warm up,
  serve, drain on SIGTERM / SIGINT);
- `loadgen`: the open-loop Poisson load generator and its statistics (`train.benchmark_serve`).
"""
