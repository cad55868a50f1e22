"""One server process: a `Service` from a model directory, a bound socket, uvicorn, and a drain.

Order: load the model (a missing directory fails here), bind the port (in use: an OSError naming
it, before any compiling), listen, compile every program in the background while `/health`
says 503 "starting", then print one line `ready: http://HOST:PORT ...`. SIGTERM or SIGINT: the
service refuses new requests (503), uvicorn stops accepting connections and waits for every
request in flight (at most `graceful_shutdown_s`: past it the requests still running are
cancelled), the engine answers what it holds, and the process exits 0. What one client may hold
(time per phase of a connection, the number of connections): `connections.ConnectionLimits`.
"""

from __future__ import annotations

import importlib.metadata
import os
import resource
import signal
import socket
import subprocess
import sys
from typing import Any, Callable, Mapping

import uvicorn

from deebert_jax.core.errors import InputError
from deebert_jax.serving.app import DEFAULT_MAX_QUEUE, Service, create_app
from deebert_jax.serving.connections import ConnectionLimits, guarded_protocol
from deebert_jax.serving.drift import DEFAULT_SHADOW_SHARE, ON_DRIFT, DriftCheck, drift_settings, full_depth_threshold
from deebert_jax.serving.requests import MAX_BODY_BYTES, MAX_INPUTS, length_classes
from deebert_jax.serving.scheduler import DEFAULT_ADMIT_BUDGET_S, DEFAULT_SCHEDULE, check_schedule
from deebert_jax.serving.tei import create_tei_app

# `--backend`'s choices. "jax" is the product's engine; any other is handed in by the caller as an
# engine factory (the serving benchmark's baselines, eager PyTorch and ONNX Runtime, live in
# benchmarks/, which the installed package never imports; `python -m train.serve` in a checkout
# hands them in).
BACKENDS = ("jax", "torch", "onnxruntime")
# `--api`'s choices: our own routes and records (`app.create_app`), or Text Embeddings
# Inference's for a classifier (`tei.create_tei_app`).
APIS = ("deebert", "tei")
# (config, params, lengths) -> (an engine behind `engine.Engine`'s interface, one line saying what it runs)
EngineFactory = Callable[[Any, Any, tuple[int, ...]], tuple[Any, str]]
BACKLOG = 2048
DEFAULT_GRACEFUL_SHUTDOWN_S = 25.0
FDS_BESIDES_CONNECTIONS = 256   # model files, the tokenizer, pipes, the listening socket, the runtime's own


def check_port(port: int) -> int:
    if not 0 <= port <= 65535:
        raise InputError(f"--port {port}: a TCP port is 0 to 65535 (0: any free port)")
    return port


def ensure_fd_room(max_connections: int, flag: str = "--max-connections") -> None:
    """Raises the soft RLIMIT_NOFILE so `max_connections` sockets fit beside the process's own
    files, or refuses in one line when the hard limit is too low."""
    need = max_connections + FDS_BESIDES_CONNECTIONS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        raise InputError(f"{flag} {max_connections}: needs {need} open files, the hard limit (ulimit -Hn) is "
                         f"{hard}; use at most {flag} {max(hard - FDS_BESIDES_CONNECTIONS, 1)}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def build_service(model_dir: str, *, threshold: float | None = None, rule: str | None = None,
                  max_seq_length: int | None = None, max_queue: int = DEFAULT_MAX_QUEUE, backend: str = "jax",
                  bucket_sizes: tuple[int, ...] | None = None, say: Callable[[str], None] = print,
                  schedule: str | None = None, admit_budget_s: float | None = None,
                  engine_factories: Mapping[str, EngineFactory] | None = None, shadow_share: float | None = None,
                  shadow_seed: int = 0, on_drift: str = "warn", length_spacing: str = "power-of-two") -> Service:
    """The model directory (`model_dir.open_model_dir`), the threshold (`ModelDir.threshold`: given, else exit_policy.json,
    else full depth; `say` reports which) and engine; nothing compiled yet. `bucket_sizes`: the
    engine's (default `exit_aware.default_bucket_sizes()`); `schedule`: the JAX engine's
    (`scheduler.SCHEDULES`, default `scheduler.DEFAULT_SCHEDULE`) and its `admit_budget_s`;
    `engine_factories`: the engine of each backend other than "jax" (`EngineFactory`);
    `shadow_share` (None: `drift.DEFAULT_SHADOW_SHARE` on the jax backend), `shadow_seed` and
    `on_drift`: the live check of the guarantee (`drift.DriftCheck`). `length_spacing`: the rows'
    padded lengths (`data.lengths.SPACINGS`; multiples of 8 pad less and compile about twice the
    programs)."""
    # JAX loads here, not at import: `deebert-serve` reads BACKENDS from this module before `setup_process`.
    from deebert_jax.inference.model_dir import open_model_dir

    if backend not in BACKENDS:
        raise InputError(f"backend {backend!r}; expected one of {BACKENDS}")
    factory = (engine_factories or {}).get(backend)
    if backend != "jax" and factory is None:
        raise InputError(f"backend {backend!r} is the serving benchmark's baseline, which is not installed: run "
                         f"`python -m train.serve --backend {backend}` from a checkout")
    if schedule is not None:
        check_schedule(schedule)
    if backend != "jax" and shadow_share:
        raise InputError(f"--shadow-share {shadow_share:g}: the {backend} baseline answers at full depth; "
                         "shadow rows check early exit (the jax backend)")
    if shadow_share is not None and not 0 <= shadow_share <= 1:
        raise InputError(f"--shadow-share {shadow_share!r}: a share of rows in [0, 1]")
    if on_drift not in ON_DRIFT:
        raise InputError(f"--on-drift {on_drift!r}; expected one of {', '.join(ON_DRIFT)}")
    from deebert_jax.inference.exit_policy import POLICY_FILE, load_exit_policy

    model = open_model_dir(model_dir)
    config, params = model.config, model.params
    # None: the length the model was trained at, else its longest input; a longer one is refused here.
    max_seq_length, why = model.max_seq_length(max_seq_length)
    lengths = length_classes(max_seq_length, length_spacing)
    L = config.num_hidden_layers
    info = {"model": os.path.basename(os.path.normpath(model_dir)), "layers": L, "lengths": list(lengths),
            "backend": backend}
    drift = None
    given_threshold = threshold
    if backend == "jax":
        from deebert_jax.serving.engine import Engine   # JAX: after setup_process, as above
        threshold, rule, note = model.threshold(threshold, rule, max_seq_length=max_seq_length)
        schedule = schedule or DEFAULT_SCHEDULE
        budget = DEFAULT_ADMIT_BUDGET_S if admit_budget_s is None else admit_budget_s
        full_depth = threshold == full_depth_threshold(rule, L)
        share = 0.0 if full_depth else (DEFAULT_SHADOW_SHARE if shadow_share is None else shadow_share)
        engine = Engine(config, params, lengths, threshold, rule, bucket_sizes=bucket_sizes, schedule=schedule,
                        admit_budget_s=budget, shadow_share=share, shadow_seed=shadow_seed)
        info.update(rule=rule, threshold=threshold, schedule=schedule, shadow_share=share)
        policy = None if given_threshold is not None else load_exit_policy(model_dir)
        if given_threshold is not None:
            source = "given (--threshold)"
        elif policy is not None and policy["rule"] == rule:
            source = POLICY_FILE
        else:
            source, policy = "the full depth (no exit policy for this rule)", None
        extra = {"threshold_source": source, "admit_budget_ms": budget * 1e3 if schedule == "arrivals" else None,
                 "exit_policy": None if policy is None else {
                     k: policy[k] for k in ("guarantee", "guarantee_scope", "max_drop", "metric_name", "confidence",
                                            "calibration_split", "calibration_size", "task", "chosen_at")
                     if k in policy}}
        note += f"; schedule {schedule}" + (f" (admission budget {budget * 1e3:g} ms)" if schedule == "arrivals" else "")
        if share > 0:
            drift_budget, confidence, grid, drift_note = drift_settings(model.policy(max_seq_length=max_seq_length), rule,
                                                                 threshold)
            drift = DriftCheck(rule=rule, threshold=threshold, num_layers=L, budget=drift_budget,
                               confidence=confidence, grid=grid, on_drift=on_drift, set_threshold=engine.set_threshold,
                               say=say)
            engine.on_shadow = drift.record
            note += f"; {share:.0%} of rows shadowed to full depth, checked against {drift_note} (--on-drift {on_drift})"
    else:
        engine, note = factory(config, params, lengths)
        info.update(rule=None, threshold=None)
        extra = {"threshold_source": "none: this backend runs the full depth", "exit_policy": None}
    say(f"model: {os.fspath(model_dir)} ({L} layers); {note}; max sequence length {max_seq_length}"
        + ("" if why == "given" else f" ({why})"))
    details = describe(info, extra, model.label_names, max_seq_length, max_queue,
                       getattr(engine, "pool_size", None), getattr(config, "model_type", None))
    return Service(engine, model.tokenizer, lengths, model.label_names, L, vocab_size=config.vocab_size,
                   max_queue=max_queue, info=info, details=details, drift=drift)


def version() -> str:
    """The installed deebert-jax's version, else the checkout's pyproject.toml's."""
    try:
        return importlib.metadata.version("deebert-jax")
    except importlib.metadata.PackageNotFoundError:
        pass
    pyproject = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                             "pyproject.toml")
    try:
        import tomllib
        with open(pyproject, "rb") as f:
            return tomllib.load(f)["project"]["version"]
    except (OSError, KeyError, ValueError):
        return "unknown"


def commit() -> str | None:
    """The git commit the code runs from, when it runs from a checkout (None otherwise)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out or None


def describe(info: dict, extra: dict, labels, max_seq_length: int, max_queue: int, pool_slots: int | None,
             model_type: str | None) -> dict:
    """`GET /info`: the model, its labels and lengths, the exit rule, threshold and where it came
    from (with the exit policy's guarantee and its scope), the schedule, the limits, the version."""
    import jax   # loaded by the engine already

    return {"model": info["model"], "model_type": model_type, "labels": list(labels), "layers": info["layers"],
            "max_input_length": max_seq_length, "lengths": info["lengths"], "backend": info["backend"],
            "platform": jax.default_backend(), "dtype": "float32",
            "rule": info.get("rule"), "threshold": info.get("threshold"), **extra,
            "schedule": info.get("schedule"),
            "limits": {"max_inputs": MAX_INPUTS, "max_body_bytes": MAX_BODY_BYTES, "max_queue": max_queue,
                       "pool_slots": pool_slots},
            "version": version(), "commit": commit()}


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket; a port in use (or a bad host) is an OSError naming HOST:PORT."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)  # connections made before uvicorn runs wait in the backlog
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, but a signal starts the service's drain and is not re-raised after the
    graceful shutdown (uvicorn re-raises it, which would end the process with the signal's status)."""

    def __init__(self, config: uvicorn.Config, service: Service):
        super().__init__(config)
        self.service = service

    def handle_exit(self, sig, frame) -> None:
        self.service.begin_drain()
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True


def serve(service: Service, sock: socket.socket, say: Callable[[str], None] = print, *,
          limits: ConnectionLimits | None = None,
          graceful_shutdown_s: float | None = DEFAULT_GRACEFUL_SHUTDOWN_S, api: str = "deebert") -> int:
    """Serves on `sock` until SIGTERM / SIGINT -> 0 once everything accepted is answered (within
    `graceful_shutdown_s`; None: no limit). `limits`: `ConnectionLimits()` by default. `api`:
    one of `APIS`."""
    if api not in APIS:
        raise InputError(f"api {api!r}; expected one of {APIS}")
    limits = limits or ConnectionLimits()
    host, port = sock.getsockname()[:2]
    url = f"http://{host}:{port}"

    routes = ("POST /predict, GET /health, GET /metrics" if api == "deebert" else
              "TEI API: POST /predict, POST /, GET /info, GET /health, GET /metrics, GET /docs")

    def announce(compiled: str) -> None:
        say(f"ready: {url} ({compiled}; {routes})")

    def failed() -> None:
        server.should_exit = True

    make_app = create_tei_app if api == "tei" else create_app
    app = make_app(service, on_startup=lambda: service.start_in_background(announce, failed),
                   on_shutdown=service.stop)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", http=guarded_protocol(limits),
                            timeout_keep_alive=limits.keep_alive_s, timeout_graceful_shutdown=graceful_shutdown_s)
    server = _DrainingServer(config, service)
    server.run(sockets=[sock])
    if service.error is not None:
        raise RuntimeError(f"compiling the model failed: {service.error!r}")
    if service.engine.error is not None:
        raise RuntimeError(f"the engine failed: {service.engine.error!r}")
    say("stopped: every accepted request was answered")
    return 0


def flush_print(line: str) -> None:
    print(line, flush=True)
    sys.stderr.flush()
