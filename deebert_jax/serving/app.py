"""The ASGI app: `GET /health`, `POST /predict`, `GET /metrics` over a `Service` (Starlette); and
`POST /` (the Hugging Face Inference API's text classification), `GET /info`, `GET /openapi.json`
and `GET /docs`. `tei.create_tei_app` is the same service behind Text Embeddings Inference's API.

`/predict` answers, per input and in input order, the record `train.predict` writes (text,
text_pair, label, label_id, probabilities, exit_layer, truncated, score). `POST /` answers
`[[{"label", "score"}, ...], ...]`, one list per input, every label (or `parameters.top_k`) from
the most probable, its exit layers in the `x-exit-layer` header. Errors are `{"error": "..."}`:
400 for a malformed body (the field and index named), 413 for too many inputs or bytes (or more
than `--max-queue` inputs: a request that could never be queued), 503 with `Retry-After` while
starting, draining or when the queue is full, 500 if the engine failed or anything unexpected
happened (JSON, counted in /metrics, the traceback logged). A client that disconnects before its
answer has its rows not yet started dropped and is counted as status 499, not as answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from typing import Any, Awaitable, Callable, Sequence

import numpy as np
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from deebert_jax.inference.predict import format_predictions
from deebert_jax.serving import answers, bodies, openapi
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
                 max_inputs: int = req.MAX_INPUTS, info: dict[str, Any] | None = None,
                 details: dict[str, Any] | None = None, drift=None):
        self.engine, self.tokenizer = engine, tokenizer
        self.lengths, self.names, self.num_layers = tuple(lengths), list(label_names), num_layers
        self.vocab_size, self.max_queue, self.max_inputs = vocab_size, max_queue, max_inputs
        self.info = dict(info or {})          # what /health adds to "ready"
        self.details = dict(details or {})    # GET /info (`server.describe`)
        self.state = "starting"
        self.error: BaseException | None = None   # why warming up failed
        self.metrics = ServingMetrics(num_layers, engine.pending)
        self._admitted: dict[int, float] = {}   # engine key -> when its row entered a pool (until answered)
        engine.on_step = lambda rows, seconds: self.metrics.observe_step(rows)
        engine.on_admit = self._on_admit   # engines without the hook: queue time 0, all of it inference
        self.drift = drift   # `drift.DriftCheck` of the shadow rows, or None
        if drift is not None:
            self.metrics.watch_drift(drift.snapshot)

    def health(self) -> dict[str, Any]:
        """`/health` when ready: what is served, and the live check when there is one."""
        if self.drift is None:
            return {"status": "ready", **self.info}
        # Rows drawn for shadowing but not run: the lane's backlog was full (`engine.SHADOW_BACKLOG`).
        skipped = getattr(self.engine, "shadow_skipped", 0)
        return {"status": "ready", **self.info, "drift": {**self.drift.snapshot(), "shadow_skipped": skipped}}

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

    async def run(self, examples: list, *, truncate: bool = True, truncation_side: str = "right") -> "Outcome":
        """Tokenises, queues and awaits every row -> their logits, exit layers and timings, in input
        order. `truncate=False`: an input longer than the longest length is a RequestError instead."""
        start = time.perf_counter()
        rows = req.to_rows(self.tokenizer, examples, self.lengths, self.vocab_size, truncation_side)
        if not truncate:
            for i, row in enumerate(rows):
                if row.truncated:
                    field = "inputs" if len(rows) == 1 else f"inputs[{i}]"
                    raise req.RequestError(400, f'"{field}" has more than {max(self.lengths)} tokens, the maximum '
                                                'input length, and "truncate" is false', kind="too_long")
        tokenized = time.perf_counter()
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in rows]

        def answer(future):
            def callback(logits, exit_layer):
                if logits is not None:
                    self.metrics.observe_exit(exit_layer)
                done = time.perf_counter()
                loop.call_soon_threadsafe(lambda: future.done() or future.set_result((logits, exit_layer, done)))
            return callback

        keys = self.engine.submit(rows, [answer(f) for f in futures])
        try:
            results = await asyncio.gather(*futures)
        except asyncio.CancelledError:
            self.engine.cancel(keys)  # the client went away: rows not started cost nothing
            raise
        finally:
            admitted = [self._admitted.pop(key, None) for key in keys]
        if any(logits is None for logits, _, _ in results):
            raise RuntimeError(f"the engine failed: {self.engine.error!r}")
        queue = [(a or tokenized) - tokenized for a in admitted]
        return Outcome(logits=np.stack([np.asarray(r[0], np.float32) for r in results]),
                       exits=np.array([r[1] for r in results]), truncated=np.array([r.truncated for r in rows]),
                       tokens=[int(r.attention_mask.sum()) for r in rows], tokenization_s=tokenized - start,
                       queue_s=queue, inference_s=[r[2] - tokenized - q for r, q in zip(results, queue)])

    def _on_admit(self, keys) -> None:
        """Engine hook (its thread): rows entered a pool; their queue time ends now."""
        now = time.perf_counter()
        self._admitted.update((key, now) for key in keys)

    async def predict(self, examples: list) -> list[dict]:
        """Tokenises, queues and awaits every row -> the records, in input order."""
        outcome = await self.run(examples)
        probs = np.stack([softmax(logits) for logits in outcome.logits])
        return format_predictions(examples, probs, outcome.exits, self.names, outcome.truncated)


@dataclasses.dataclass
class Outcome:
    """What `Service.run` answers: logits [N, K] float32 of each row's exit ramp, exits [N]
    (1-based), truncated [N], tokens per row, and seconds spent tokenising (the request), waiting
    for a pool slot and inside the engine (per row)."""
    logits: np.ndarray
    exits: np.ndarray
    truncated: np.ndarray
    tokens: list[int]
    tokenization_s: float
    queue_s: list[float]
    inference_s: list[float]


def _error(status: int, message: str, kind: str | None = None, retry: bool = False) -> JSONResponse:
    """The default API's error: `{"error": message}` (`kind`, which check refused it, is for
    other APIs' error bodies: `tei.tei_error`)."""
    headers = {"Retry-After": str(RETRY_AFTER_S)} if retry else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


# (status, message, kind, retry) -> the error response of an API
ErrorResponder = Callable[..., Response]


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, stopping as soon as it passes `limit` bytes (413): memory stays bounded."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise req.RequestError(413, f"the body has {declared} bytes; at most {limit}", kind="body_size")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise req.RequestError(413, f"the body has more than {limit} bytes", kind="body_size")
        chunks.append(chunk)
    return b"".join(chunks)


async def _disconnected(request: Request) -> None:
    """Returns once the client has disconnected (the body is already read: the only message left)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def counted(service: Service, route: str, handler: Callable[[Request], Awaitable[Response]],
            error: ErrorResponder = _error) -> Callable[[Request], Awaitable[Response]]:
    """`handler` with every answer counted in `deebert_requests_total{status}` (and the latency of
    a 200), and any exception of ours a JSON 500 with its traceback in the log."""
    async def route_handler(request: Request) -> Response:
        start = time.perf_counter()
        try:
            response = await handler(request)
        except Exception as e:  # noqa: BLE001 - a bug of ours: a JSON 500, counted, its traceback logged
            log.exception("POST %s failed", route)
            response = error(500, f"internal error ({type(e).__name__}); the server log has the traceback", "bug")
        service.metrics.requests.labels(status=str(response.status_code)).inc()
        if response.status_code == 200:
            service.metrics.latency.observe(time.perf_counter() - start)
        return response
    return route_handler


async def run_request(service: Service, request: Request, parse: Callable[[bytes], tuple[list, Any]],
                      compute: Callable[[list, Any], Awaitable[Any]], respond: Callable[[Any, Any], Response],
                      error: ErrorResponder = _error) -> Response:
    """The flow every predict route shares: the service ready, the body read (bounded) and
    `parse`d -> (examples, options), room in the queue, `compute(examples, options)` while the
    client is watched (one that leaves has its rows not yet started dropped: 499), then
    `respond(result, options)`. Every refusal is `error(status, message, kind, retry)`."""
    if service.state != "ready":
        return error(503, f"the server is {service.state}", "unavailable", retry=service.state != "failed")
    try:
        examples, options = parse(await _read_body(request, req.MAX_BODY_BYTES))
    except req.RequestError as e:
        return error(e.status, str(e), e.kind)
    except ClientDisconnect:   # gone before its body was read: nothing queued, nobody to answer
        return Response(status_code=CLIENT_GONE)
    if len(examples) > service.max_queue:   # would get 503 Retry-After forever
        return error(413, f'"inputs" has {len(examples)} items; the queue holds at most {service.max_queue} '
                          "rows (--max-queue), so this request could never be queued: send fewer per request",
                     "batch_size")
    if service.engine.pending() + len(examples) > service.max_queue:
        return error(503, f"the queue is full ({service.max_queue} rows)", "overloaded", retry=True)
    work = asyncio.ensure_future(compute(examples, options))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not work.done():   # the client went away: its rows not yet started are dropped (Service.run)
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await work
        return Response(status_code=CLIENT_GONE)
    try:
        result = work.result()
    except RuntimeError as e:
        service.state = "failed"
        return error(500, str(e), "engine")
    except req.RequestError as e:
        return error(e.status, str(e), e.kind)
    return respond(result, options)


def exit_headers(outcome: Outcome) -> dict[str, str]:
    """The early-exit facts of an answer, beside its body: `x-exit-layer` (1-based, one per input,
    comma-separated in input order)."""
    return {"x-exit-layer": ",".join(str(int(layer)) for layer in outcome.exits)}


def lifespan_of(on_startup: Callable[[], None] | None, on_shutdown: Callable[[], None] | None):
    @contextlib.asynccontextmanager
    async def lifespan(app):
        if on_startup:
            on_startup()
        yield
        if on_shutdown:
            on_shutdown()
    return lifespan


def create_app(service: Service, on_startup: Callable[[], None] | None = None,
               on_shutdown: Callable[[], None] | None = None) -> Starlette:
    """The routes over `service`; `on_startup` / `on_shutdown` run in the app's lifespan."""

    async def health(request: Request) -> Response:
        if service.state != "ready":
            return JSONResponse({"status": service.state}, status_code=503,
                                headers={"Retry-After": str(RETRY_AFTER_S)})
        return JSONResponse(service.health())

    def parse_predict(body: bytes):
        return req.parse_body(body, service.max_inputs), None

    async def predict(request: Request) -> Response:
        return await run_request(service, request, parse_predict, lambda examples, _: service.predict(examples),
                                 lambda records, _: JSONResponse(records))

    def parse_hf(body: bytes):
        data = bodies.validate(bodies.HFBody, req.load_body(body))
        return bodies.hf_examples(data.inputs, service.max_inputs), bodies.scoring(data, len(service.names))

    def answer_hf(outcome: Outcome, scoring) -> Response:
        function, top_k = scoring
        lists = [answers.ranked(answers.scores(logits, function), service.names, top_k, score_first=False)
                 for logits in outcome.logits]
        return JSONResponse(lists, headers=exit_headers(outcome))

    async def inference_api(request: Request) -> Response:
        return await run_request(service, request, parse_hf, lambda examples, _: service.run(examples), answer_hf)

    async def info(request: Request) -> Response:
        return JSONResponse(service.details)

    async def metrics(request: Request) -> Response:
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    routes = [Route("/health", health, methods=["GET"]),
              Route("/predict", counted(service, "/predict", predict), methods=["POST"]),
              Route("/", counted(service, "/", inference_api), methods=["POST"]),
              Route("/info", info, methods=["GET"]), Route("/metrics", metrics, methods=["GET"]),
              *openapi.routes(openapi.deebert_document(service.details), "/openapi.json")]
    return Starlette(routes=routes, lifespan=lifespan_of(on_startup, on_shutdown))
