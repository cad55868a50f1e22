"""`train.serve --api tei`: the service behind Text Embeddings Inference's HTTP API for a
classifier (its router's `http/server.rs` and `http/types.rs`, v1.9), so a TEI client needs no change.

Routes: `POST /predict`, `POST /` and `POST /invocations` (TEI's `PredictRequest` -> its
`PredictResponse`: `[{"score", "label"}, ...]`, every label from the highest score, or
`[[...], ...]` for a batch); `GET /health`, `GET /` and `GET /ping` (200, empty; 503
`{"error", "error_type": "Unhealthy"}`); `GET /info` (TEI's `Info`); `GET /metrics` (TEI's
`te_*` names beside ours); `GET /api-doc/openapi.json` (and `/openapi.json`) and `GET /docs`.
TEI's embedding, rerank and similarity routes answer as TEI answers them for a classifier: 424
`Backend`. Errors are TEI's `{"error", "error_type"}`: 400 `Empty`, 413 (payload) and 422
`Validation`, 424 `Backend`, 429 `Overloaded`, 503 `Unhealthy`.

The early-exit facts ride in headers, never in the body (a strict TEI parser sees only TEI's
keys): `x-exit-layer` (per input, comma-separated, input order). TEI's timing headers are set
as TEI sets them: `x-compute-time` and `x-total-time` (ms, the request), `x-tokenization-time`,
`x-queue-time` and `x-inference-time` (ms; a batch: the mean over its inputs),
`x-compute-characters`, `x-compute-tokens`, `x-compute-type` (the JAX platform).
"""

from __future__ import annotations

import time
from typing import Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from deebert_jax.serving import answers, bodies, openapi
from deebert_jax.serving import requests as req
from deebert_jax.serving.app import (RETRY_AFTER_S, Outcome, Service, counted, exit_headers, lifespan_of,
                                     run_request)
from deebert_jax.serving.metrics import CONTENT_TYPE, TEIMetrics, render_tei

# Our refusals (`app.run_request`'s kinds) -> TEI's (status, error_type, te_request_failure err).
TEI_ERRORS = {"empty": (400, "Empty", "validation"), "batch_size": (422, "Validation", "batch_size"),
              "body_size": (413, "Validation", "validation"), "too_long": (422, "Validation", "validation"),
              "overloaded": (429, "Overloaded", "overloaded"), "unavailable": (503, "Unhealthy", None),
              "engine": (424, "Backend", "inference"), "bug": (500, "Backend", "inference"),
              "model_type": (424, "Backend", "model_type")}
NOT_A_CLASSIFIER_ROUTE = ("/embed", "/embed_all", "/embed_sparse", "/rerank", "/similarity", "/embeddings",
                          "/v1/embeddings")


def tei_info(service: Service) -> dict:
    """TEI's `Info` for this service (`openapi.TEIInfo`, every field)."""
    d = service.details
    names = service.names
    return {"model_id": d["model"], "model_sha": None, "model_dtype": d.get("dtype", "float32"),
            "served_model_name": d["model"],
            "model_type": {"classifier": {"id2label": {str(i): n for i, n in enumerate(names)},
                                          "label2id": {n: i for i, n in enumerate(names)}}},
            "max_concurrent_requests": service.max_queue, "max_input_length": max(service.lengths),
            "max_batch_tokens": d["limits"]["pool_slots"] * max(service.lengths),
            "max_batch_requests": d["limits"]["pool_slots"],
            "max_client_batch_size": min(service.max_inputs, service.max_queue), "auto_truncate": True,
            "tokenization_workers": 1, "version": d["version"], "sha": d.get("commit"), "docker_label": None}


def create_tei_app(service: Service, on_startup: Callable[[], None] | None = None,
                   on_shutdown: Callable[[], None] | None = None) -> Starlette:
    """TEI's routes over `service`; `on_startup` / `on_shutdown` run in the app's lifespan."""
    metrics = TEIMetrics(service.metrics, service.engine.pending, max(service.lengths))
    batch_limit = min(service.max_inputs, service.max_queue)
    observe_step = service.engine.on_step

    def on_step(rows, seconds):
        observe_step(rows, seconds)
        metrics.batch_size.observe(rows)
    service.engine.on_step = on_step

    def error(status: int, message: str, kind: str | None = None, retry: bool = False) -> Response:
        status, error_type, err = TEI_ERRORS.get(kind, (422 if status == 400 else status, "Validation", "validation"))
        if err:
            metrics.counters.inc("te_request_failure", err=err)
        headers = {"Retry-After": str(RETRY_AFTER_S)} if retry else None
        return JSONResponse({"error": message, "error_type": error_type}, status_code=status, headers=headers)

    def parse(body: bytes):
        data = bodies.validate(bodies.TEIBody, req.load_body(body))
        examples, batched = bodies.tei_examples(data.inputs, service.max_inputs)
        metrics.counters.inc("te_request_count", method="batch" if batched else "single")
        if batched and len(examples) > batch_limit:
            raise req.RequestError(422, f"batch size {len(examples)} > maximum allowed batch size {batch_limit}",
                                   kind="batch_size")
        metrics.counters.inc("te_predict_count", len(examples))
        characters = sum(len(text) + len(pair or "") for text, pair in examples)
        return examples, (data, batched, bodies.scoring(data, len(service.names)), time.perf_counter(), characters)

    def compute(examples, options):
        data = options[0]
        return service.run(examples, truncate=data.truncate is not False,
                           truncation_side=data.truncation_direction.lower())

    def respond(outcome: Outcome, options) -> Response:
        data, batched, (function, top_k), start, characters = options
        try:
            lists = [answers.ranked(answers.scores(logits, function), service.names, top_k)
                     for logits in outcome.logits]
        except RuntimeError as e:   # a NaN score: TEI's backend error
            return error(424, str(e), "engine")
        n = len(lists)
        total = time.perf_counter() - start
        queue, inference = sum(outcome.queue_s) / n, sum(outcome.inference_s) / n
        for part, seconds in (("", total), ("_tokenization", outcome.tokenization_s), ("_queue", queue),
                              ("_inference", inference)):
            metrics.duration[part].observe(seconds)
        for tokens in outcome.tokens:
            metrics.input_length.observe(tokens)
        metrics.counters.inc("te_request_success", method="batch" if batched else "single")
        metrics.counters.inc("te_predict_success", n)
        ms = lambda seconds: str(int(seconds * 1e3))
        headers = {"x-compute-type": service.details.get("platform", "cpu"), "x-compute-time": ms(total),
                   "x-compute-characters": str(characters),
                   "x-compute-tokens": str(sum(outcome.tokens)), "x-total-time": ms(total),
                   "x-tokenization-time": ms(outcome.tokenization_s), "x-queue-time": ms(queue),
                   "x-inference-time": ms(inference), **exit_headers(outcome)}
        return JSONResponse(lists if batched else lists[0], headers=headers)

    async def predict(request: Request) -> Response:
        return await run_request(service, request, parse, compute, respond, error)

    async def health(request: Request) -> Response:
        if service.state != "ready":
            return error(503, f"unhealthy: the server is {service.state}", "unavailable", retry=True)
        return Response(status_code=200)

    async def info(request: Request) -> Response:
        return JSONResponse(tei_info(service))

    async def deebert_info(request: Request) -> Response:
        return JSONResponse(service.details)

    async def not_a_classifier(request: Request) -> Response:
        return error(424, f"Backend error: {request.url.path} needs an embedding or reranker model; this one is "
                          "a sequence classifier: POST /predict", "model_type")

    async def metrics_route(request: Request) -> Response:
        return Response(render_tei(service.metrics.registry), media_type=CONTENT_TYPE)

    handler = counted(service, "/predict", predict, error)
    routes = [*(Route(path, handler, methods=["POST"]) for path in ("/predict", "/", "/invocations")),
              *(Route(path, health, methods=["GET"]) for path in ("/health", "/", "/ping")),
              Route("/info", info, methods=["GET"]), Route("/deebert/info", deebert_info, methods=["GET"]),
              Route("/metrics", metrics_route, methods=["GET"]),
              *(Route(path, not_a_classifier, methods=["POST"]) for path in NOT_A_CLASSIFIER_ROUTE),
              *openapi.routes(openapi.tei_document(service.details.get("version", "unknown")),
                              "/api-doc/openapi.json", "/openapi.json")]
    return Starlette(routes=routes, lifespan=lifespan_of(on_startup, on_shutdown))
