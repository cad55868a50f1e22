"""Serving an early-exit classifier over HTTP.

- `requests`: a predict body -> examples (400 / 413 errors naming the field), examples -> rows
  padded to a few lengths;
- `scheduler`: which rows run next (pure bookkeeping, no JAX);
- `engine`: the device worker: pools of rows, one jitted layer step per padded length, answers
  the moment a row exits (`torch_engine`: the eager PyTorch baseline behind the same interface);
- `metrics`: the Prometheus metrics;
- `app`: the ASGI app (`/health`, `/predict`, `/metrics`); `server`: one process (bind, warm up,
  serve, drain on SIGTERM / SIGINT);
- `loadgen`: the open-loop Poisson load generator and its statistics (`train.benchmark_serve`).
"""
