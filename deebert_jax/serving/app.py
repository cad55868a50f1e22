"""The ASGI app: `GET /health`, `POST /predict`, `GET /metrics` over a `Service` (Starlette).

`/predict` answers, per input and in input order, the record `train.predict` writes (text,
text_pair, label, label_id, probabilities, exit_layer, truncated). Errors are `{"error": "..."}`:
400 for a malformed body (the field and index named), 413 for too many inputs or bytes (or more
than `--max-queue` inputs: a request that could never be queued), 503 with `Retry-After` while
starting, draining or when the queue is full, 500 if the engine failed or anything unexpected
happened (JSON, counted in /metrics, the traceback logged). A client that disconnects before its
answer has its rows not yet started dropped and is counted as status 499, not as answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from deebert_jax.inference.predict import format_predictions
from deebert_jax.serving import requests as req
from deebert_jax.serving.metrics import CONTENT_TYPE, ServingMetrics

log = logging.getLogger("deebert_jax.serving")
RETRY_AFTER_S = 1
CLIENT_GONE = 499   # the status counted for a client that disconnected before its answer (nginx's)
DEFAULT_MAX_QUEUE = 1024   # rows accepted and not yet answered; past it, 503


def softmax(logits: np.ndarray) -> np.ndarray:
    """[K] logits -> probabilities (float32, as `predict.predict_arrays` gives them)."""
    z = np.asarray(logits, np.float32)
    e = np.exp(z - z.max())
    return e / e.sum()


class Service:
    """What the routes serve: an engine (`engine.Engine` or `torch_engine.TorchEngine`), the
    tokenizer, the padded lengths, the label names and the state (starting, ready, draining, failed)."""

    def __init__(self, engine, tokenizer, lengths: Sequence[int], label_names: Sequence[str], num_layers: int, *,
                 vocab_size: int | None = None, max_queue: int = DEFAULT_MAX_QUEUE,
                 max_inputs: int = req.MAX_INPUTS, info: dict[str, Any] | None = None, drift=None):
        self.engine, self.tokenizer = engine, tokenizer
        self.lengths, self.names, self.num_layers = tuple(lengths), list(label_names), num_layers
        self.vocab_size, self.max_queue, self.max_inputs = vocab_size, max_queue, max_inputs
        self.info = dict(info or {})
        self.state = "starting"
        self.error: BaseException | None = None   # why warming up failed
        self.metrics = ServingMetrics(num_layers, engine.pending)
        engine.on_step = lambda rows, seconds: self.metrics.observe_step(rows)
        self.drift = drift   # `drift.DriftCheck` of the shadow rows, or None
        if drift is not None:
            self.metrics.watch_drift(drift.snapshot)

    def health(self) -> dict[str, Any]:
        """`/health` when ready: what is served, and the live check when there is one."""
        return {"status": "ready", **self.info, **({"drift": self.drift.snapshot()} if self.drift else {})}

    def start(self, announce: Callable[[str], None] | None = None) -> float:
        """Compiles every program, starts the engine, marks the service ready -> seconds taken."""
        try:
            seconds = self.engine.warm_up()
            self.engine.start()
        except BaseException as e:
            self.state, self.error = "failed", e
            raise
        if self.state == "starting":
            self.state = "ready"
        if announce:
            announce(f"compiled in {seconds:.1f} s")
        return seconds

    def start_in_background(self, announce: Callable[[str], None] | None = None,
                            on_failure: Callable[[], None] | None = None) -> threading.Thread:
        """`start` on a thread (the server listens meanwhile); `on_failure()` if it raises."""
        def run():
            try:
                self.start(announce)
            except BaseException:  # noqa: BLE001 - kept in self.error, reported by the server
                if on_failure:
                    on_failure()
        thread = threading.Thread(target=run, name="deebert-warm-up", daemon=True)
        thread.start()
        return thread

    def begin_drain(self) -> None:
        """New predict requests get 503 from now on; those accepted are still answered."""
        self.state = "draining"

    def stop(self) -> None:
        """Answers every accepted row, then stops the engine."""
        self.engine.stop()

    async def predict(self, examples: list) -> list[dict]:
        """Tokenises, queues and awaits every row -> the records, in input order."""
        rows = req.to_rows(self.tokenizer, examples, self.lengths, self.vocab_size)
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in rows]

        def answer(future):
            def callback(logits, exit_layer):
                if logits is not None:
                    self.metrics.observe_exit(exit_layer)
                loop.call_soon_threadsafe(lambda: future.done() or future.set_result((logits, exit_layer)))
            return callback

        keys = self.engine.submit(rows, [answer(f) for f in futures])
        try:
            answers = await asyncio.gather(*futures)
        except asyncio.CancelledError:
            self.engine.cancel(keys)  # the client went away: rows not started cost nothing
            raise
        if any(logits is None for logits, _ in answers):
            raise RuntimeError(f"the engine failed: {self.engine.error!r}")
        probs = np.stack([softmax(logits) for logits, _ in answers])
        exits = np.array([layer for _, layer in answers])
        return format_predictions(examples, probs, exits, self.names, np.array([r.truncated for r in rows]))


def _error(status: int, message: str, retry: bool = False) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if retry else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, stopping as soon as it passes `limit` bytes (413): memory stays bounded."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise req.RequestError(413, f"the body has {declared} bytes; at most {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise req.RequestError(413, f"the body has more than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _disconnected(request: Request) -> None:
    """Returns once the client has disconnected (the body is already read: the only message left)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def create_app(service: Service, on_startup: Callable[[], None] | None = None,
               on_shutdown: Callable[[], None] | None = None) -> Starlette:
    """The routes over `service`; `on_startup` / `on_shutdown` run in the app's lifespan."""

    async def health(request: Request) -> Response:
        if service.state != "ready":
            return JSONResponse({"status": service.state}, status_code=503,
                                headers={"Retry-After": str(RETRY_AFTER_S)})
        return JSONResponse(service.health())

    async def predict(request: Request) -> Response:
        start = time.perf_counter()
        try:
            response = await _predict(request)
        except Exception as e:  # noqa: BLE001 - a bug of ours: a JSON 500, counted, its traceback logged
            log.exception("POST /predict failed")
            response = _error(500, f"internal error ({type(e).__name__}); the server log has the traceback")
        service.metrics.requests.labels(status=str(response.status_code)).inc()
        if response.status_code == 200:
            service.metrics.latency.observe(time.perf_counter() - start)
        return response

    async def _predict(request: Request) -> Response:
        if service.state != "ready":
            return _error(503, f"the server is {service.state}", retry=service.state != "failed")
        try:
            examples = req.parse_body(await _read_body(request, req.MAX_BODY_BYTES), service.max_inputs)
        except req.RequestError as e:
            return _error(e.status, str(e))
        except ClientDisconnect:   # gone before its body was read: nothing queued, nobody to answer
            return Response(status_code=CLIENT_GONE)
        if len(examples) > service.max_queue:   # would get 503 Retry-After forever
            return _error(413, f'"inputs" has {len(examples)} items; the queue holds at most {service.max_queue} '
                               "rows (--max-queue), so this request could never be queued: send fewer per request")
        if service.engine.pending() + len(examples) > service.max_queue:
            return _error(503, f"the queue is full ({service.max_queue} rows)", retry=True)
        work = asyncio.ensure_future(service.predict(examples))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not work.done():   # the client went away: its rows not yet started are dropped (Service.predict)
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
            return Response(status_code=CLIENT_GONE)
        try:
            records = work.result()
        except RuntimeError as e:
            service.state = "failed"
            return _error(500, str(e))
        except req.RequestError as e:
            return _error(e.status, str(e))
        return JSONResponse(records)

    async def metrics(request: Request) -> Response:
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if on_startup:
            on_startup()
        yield
        if on_shutdown:
            on_shutdown()

    routes = [Route("/health", health, methods=["GET"]), Route("/predict", predict, methods=["POST"]),
              Route("/metrics", metrics, methods=["GET"])]
    return Starlette(routes=routes, lifespan=lifespan)
