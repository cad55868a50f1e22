"""Serve a deebert-jax classifier over HTTP with continuous exit-aware batching.

    python -m train.serve --checkpoint DIR [--host 127.0.0.1] [--port 8080] [--threshold X]
        [--rule entropy|max_prob|patience] [--max-seq-length N] [--max-queue N]
        [--schedule arrivals|deepest|shallowest] [--admit-budget-ms 50]
        [--graceful-shutdown-timeout 25] [--header-timeout 10] [--body-timeout 20]
        [--keep-alive-timeout 5] [--max-connections 2048] [--api deebert|tei]

POST /predict {"inputs": "text" | ["t1", ...] | [["text", "pair"], ...]} answers, per input, the
record `train.predict` writes; GET /health, GET /metrics (Prometheus). Without `--threshold`:
DIR/exit_policy.json, else the full depth. Prints one `ready: URL` line once every program is
compiled; SIGTERM / SIGINT answers everything in flight and exits 0. `--backend torch` serves
the eager PyTorch twin at full depth (the benchmark's baseline). Also POST / (the Hugging Face
Inference API's text classification), GET /info, GET /openapi.json, GET /docs. `--api tei`
serves Text Embeddings Inference's API for a classifier instead (docs/serving.md, "Coming from TEI").
"""

from __future__ import annotations

import argparse
import functools
import sys

from deebert_jax.commands.cli import number, positive_int, run
from deebert_jax.core.optional import check_installed

# pyproject's `serve` extra
SERVE_PACKAGES = ("starlette", "uvicorn", "h11", "prometheus_client", "pydantic", "swagger_ui_bundle")


def parse_args(argv):
    check_installed(SERVE_PACKAGES, "serve", "deebert-serve")   # the flags' defaults come from the server's modules
    from deebert_jax.data.lengths import SPACINGS
    from deebert_jax.inference.early_exit import EXIT_RULES
    from deebert_jax.serving.app import DEFAULT_MAX_QUEUE
    from deebert_jax.serving.scheduler import DEFAULT_ADMIT_BUDGET_S, DEFAULT_SCHEDULE, SCHEDULES
    from deebert_jax.serving import server
    from deebert_jax.serving.connections import ConnectionLimits
    from deebert_jax.serving.server import APIS, BACKENDS, DEFAULT_GRACEFUL_SHUTDOWN_S
    from deebert_jax.serving.drift import DEFAULT_SHADOW_SHARE, ON_DRIFT

    limits = ConnectionLimits()

    parser = argparse.ArgumentParser(prog="python -m train.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="deebert-jax model directory with its tokenizer/")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--threshold", type=float, default=None,
                        help="default: DIR/exit_policy.json, else the full depth")
    parser.add_argument("--rule", default=None, choices=sorted(EXIT_RULES),
                        help="default: the exit policy's rule, else entropy")
    parser.add_argument("--max-seq-length", type=positive_int, default=None,
                        help="longer inputs are truncated; default: the length the model was trained at, else the "
                             "longest its positions cover (at most the tokenizer's model_max_length)")
    parser.add_argument("--length-spacing", default="power-of-two", choices=SPACINGS,
                        help="the lengths rows are padded to: 16, 32, 64, ... or 16, 24, 32, 40, ... (multiple-of-8: "
                             "less padding, about twice the programs to compile before the server is ready)")
    parser.add_argument("--max-queue", type=positive_int, default=DEFAULT_MAX_QUEUE,
                        help="rows accepted and not yet answered; past it, 503 with Retry-After")
    parser.add_argument("--api", default="deebert", choices=APIS,
                        help="deebert: our routes and records (/predict, and / in the Hugging Face Inference "
                             "API's shape); tei: a drop-in for a Text Embeddings Inference classifier "
                             "(its routes, request fields, answers, errors, /info and metric names)")
    parser.add_argument("--backend", default="jax", choices=BACKENDS,
                        help="torch: eager PyTorch at full depth with dynamic batching; onnxruntime: the same "
                             "weights through ONNX Runtime (baselines, from a checkout)")
    parser.add_argument("--schedule", default=DEFAULT_SCHEDULE, choices=SCHEDULES,
                        help="which group of rows runs next (docs/serving.md): arrivals (new rows start at "
                             "once, then the deepest group), deepest (the old order) or shallowest")
    parser.add_argument("--admit-budget-ms", type=float, default=DEFAULT_ADMIT_BUDGET_S * 1e3,
                        help="arrivals: new rows wait while the oldest row in flight is older than this "
                             "(inf: never wait)")
    seconds = number(lambda v: 0 < v < float("inf"), "must be a positive number of seconds")
    parser.add_argument("--graceful-shutdown-timeout", type=seconds, default=DEFAULT_GRACEFUL_SHUTDOWN_S,
                        help="after SIGTERM, seconds to finish the requests in flight before cancelling them "
                             f"(default {DEFAULT_GRACEFUL_SHUTDOWN_S:g}: a full default queue drains in about 10 s "
                             "on a 2-core CPU, and it stays under the 30 s a supervisor such as Kubernetes "
                             "waits before SIGKILL)")
    parser.add_argument("--header-timeout", type=seconds, default=limits.header_timeout_s,
                        help="seconds a client has to send a request's headers once it starts "
                             f"(default {limits.header_timeout_s:g}: headers are a few hundred bytes)")
    parser.add_argument("--body-timeout", type=seconds, default=limits.body_timeout_s,
                        help="seconds a client has to send the whole body once the headers are in "
                             f"(default {limits.body_timeout_s:g}: a 1 MiB body, the largest taken, at 64 kB/s)")
    parser.add_argument("--keep-alive-timeout", type=seconds, default=limits.keep_alive_s,
                        help="seconds an idle connection (new, or between requests) is kept "
                             f"(default {limits.keep_alive_s:g}, uvicorn's own)")
    parser.add_argument("--max-connections", type=positive_int, default=limits.max_connections,
                        help="open connections at most; past it the oldest idle one is closed, else 503 "
                             f"(default {limits.max_connections}: twice the default --max-queue, so every "
                             "queued row can have its own connection with room for /health and /metrics)")
    share = number(lambda v: 0 <= v <= 1, "must be a share of rows in [0, 1]")
    parser.add_argument("--shadow-share", type=share, default=None,
                        help="rows also run to the last layer after their answer, to check the exit policy's "
                             f"guarantee on live traffic (default {DEFAULT_SHADOW_SHARE:g}: at twice a 1-point budget "
                             "the alarm comes within about 55,000 requests, for under 2%% more layer steps; 0: off; "
                             "the jax backend at an early-exit threshold only)")
    parser.add_argument("--shadow-seed", type=int, default=0, help="the seed that draws the shadow rows")
    parser.add_argument("--on-drift", default="warn", choices=ON_DRIFT,
                        help="when the live bound shows the budget broken: warn (log and alert), full-depth (answer "
                             "at full depth from then on) or safer (the policy's next safer threshold, checked anew)")
    args = parser.parse_args(argv)
    try:
        server.check_port(args.port)
    except ValueError as e:
        parser.error(str(e))
    return args


def main(argv=None, engine_factories=None) -> int:
    """`engine_factories`: `serving.server.build_service`'s, the engines of backends other than jax."""
    args = parse_args(argv)
    from deebert_jax.cpu.process import setup_serving_process
    setup_serving_process()   # process-wide settings, before JAX runs anything
    from deebert_jax.serving import server

    from deebert_jax.serving.connections import ConnectionLimits

    say = server.flush_print
    server.ensure_fd_room(args.max_connections)   # before the model is read
    limits = ConnectionLimits(header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout,
                              keep_alive_s=args.keep_alive_timeout, max_connections=args.max_connections)
    service = server.build_service(args.checkpoint, threshold=args.threshold, rule=args.rule,
                                   max_seq_length=args.max_seq_length, max_queue=args.max_queue,
                                   backend=args.backend, say=say, schedule=args.schedule,
                                   admit_budget_s=args.admit_budget_ms / 1e3, engine_factories=engine_factories,
                                   shadow_share=args.shadow_share, shadow_seed=args.shadow_seed,
                                   on_drift=args.on_drift, length_spacing=args.length_spacing)
    sock = server.bind(args.host, args.port)
    say(f"listening on http://{args.host}:{args.port}; compiling before taking requests")
    return server.serve(service, sock, say, limits=limits, graceful_shutdown_s=args.graceful_shutdown_timeout,
                        api=args.api)


def entry(argv=None, engine_factories=None) -> int:
    """The command as the console script and `python -m` run it -> its exit status."""
    return run(functools.partial(main, engine_factories=engine_factories), argv)


if __name__ == "__main__":
    sys.exit(entry())
