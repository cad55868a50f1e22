"""The OpenAPI 3.1 documents of both APIs, built from the pydantic models that validate the
requests (`bodies`) and the models below that describe the answers, and the docs page (Swagger
UI from the `swagger-ui-bundle` package, served from this process: no CDN, works offline).
"""

from __future__ import annotations

from typing import Literal, Sequence

from pydantic import BaseModel, ConfigDict
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from deebert_jax.serving import bodies

TEI_ERROR_TYPES = ("Unhealthy", "Backend", "Overloaded", "Validation", "Tokenizer", "Empty")   # router/src/lib.rs
DOCS_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>
<link rel="stylesheet" href="/docs/static/swagger-ui.css"></head><body><div id="ui"></div>
<script src="/docs/static/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({{url: "{url}", dom_id: "#ui"}});</script></body></html>"""


class Record(BaseModel):
    """One input's answer on `/predict` (the record `train.predict` writes)."""
    text: str
    text_pair: str | None = None
    label: str
    label_id: int
    probabilities: list[float]
    exit_layer: int
    truncated: bool
    score: float


class LabelScore(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label: str
    score: float


class Prediction(BaseModel):
    """TEI's `Prediction` (its keys in its order)."""
    model_config = ConfigDict(extra="forbid")
    score: float
    label: str


class Error(BaseModel):
    error: str


class TEIError(BaseModel):
    """TEI's `ErrorResponse`; `error_type` as its serde writes the `ErrorType` variants."""
    model_config = ConfigDict(extra="forbid")
    error: str
    error_type: Literal["Unhealthy", "Backend", "Overloaded", "Validation", "Tokenizer", "Empty"]


class ClassifierModel(BaseModel):
    id2label: dict[str, str]
    label2id: dict[str, int]


class ModelType(BaseModel):
    classifier: ClassifierModel


class TEIInfo(BaseModel):
    """TEI's `Info` (router/src/lib.rs), every field."""
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model_id: str
    model_sha: str | None
    model_dtype: str
    served_model_name: str
    model_type: ModelType
    max_concurrent_requests: int
    max_input_length: int
    max_batch_tokens: int
    max_batch_requests: int | None
    max_client_batch_size: int
    auto_truncate: bool
    tokenization_workers: int
    version: str
    sha: str | None
    docker_label: str | None


class Info(BaseModel):
    """`GET /info` of the default API (`server.describe`)."""
    model_config = ConfigDict(extra="allow", protected_namespaces=())
    model: str
    labels: list[str]
    layers: int
    max_input_length: int
    rule: str | None
    threshold: float | None
    threshold_source: str
    version: str


def _schemas(models: Sequence[type[BaseModel]]) -> tuple[dict, dict]:
    """-> ({model: its $ref}, components.schemas)."""
    refs, top = models_json_schema([(m, "validation") for m in models], ref_template="#/components/schemas/{model}")
    return {m: refs[(m, "validation")] for m in models}, top.get("$defs", {})


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _document(title: str, version: str, paths: dict, schemas: dict) -> dict:
    return {"openapi": "3.1.0", "info": {"title": title, "version": version,
                                          "license": {"name": "Apache 2.0", "identifier": "Apache-2.0"}},
            "paths": paths, "components": {"schemas": schemas}}


def _get(op: str, summary: str, ok: dict, **more) -> dict:
    return {"get": {"operationId": op, "summary": summary, "responses": {"200": ok, **more}}}


def deebert_document(details: dict) -> dict:
    """The default API: `/predict`, `/` (the Inference API's text classification), `/info`,
    `/health`, `/metrics`."""
    ref, schemas = _schemas([bodies.PredictBody, bodies.HFBody, Record, LabelScore, Error, Info])
    error = lambda d: _json(ref[Error], d)
    post = lambda op, summary, body, ok: {"post": {
        "operationId": op, "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {"schema": ref[body]}}},
        "responses": {"200": ok, "400": error("a malformed body, naming the field at fault"),
                      "413": error("too many inputs or bytes"), "503": error("starting, draining or the queue full"),
                      "500": error("the engine failed, or a bug")}}}
    paths = {
        "/predict": post("predict", "Early-exit predictions: one record per input, in input order", bodies.PredictBody,
                         _json({"type": "array", "items": ref[Record]}, "the records")),
        "/": post("text_classification", "The Hugging Face Inference API's text classification", bodies.HFBody,
                  _json({"type": "array", "items": {"type": "array", "items": ref[LabelScore]}},
                        "per input, its labels from the most probable; header x-exit-layer")),
        "/info": _get("info", "Info: the model, its labels, the exit rule and threshold, the limits", _json(ref[Info], "info")),
        "/health": _get("health", "Health", _json({"type": "object"}, "ready"), **{"503": _json({"type": "object"}, "not ready")}),
        "/metrics": _get("metrics", "Metrics (Prometheus text)", {"description": "Prometheus text format",
                                                       "content": {"text/plain": {"schema": {"type": "string"}}}}),
    }
    return _document("deebert-jax", str(details.get("version", "unknown")), paths, schemas)


def tei_document(version: str) -> dict:
    """`--api tei`: TEI's classifier routes (`/predict`, `/`, `/invocations`), `/info`, `/health`,
    `/metrics`, with TEI's request, answer and error shapes."""
    ref, schemas = _schemas([bodies.TEIBody, Prediction, TEIError, TEIInfo])
    error = lambda d: _json(ref[TEIError], d)
    answer = {"oneOf": [{"type": "array", "items": ref[Prediction]},
                        {"type": "array", "items": {"type": "array", "items": ref[Prediction]}}]}

    def post(op):
        return {"post": {
            "operationId": op, "summary": "Predictions: every label from the highest score (a batch: one list "
                                          "per input); headers x-exit-layer, x-compute-time, x-queue-time, ...",
            "requestBody": {"required": True, "content": {"application/json": {"schema": ref[bodies.TEIBody]}}},
            "responses": {"200": _json(answer, "Predictions"), "400": error("an empty text"),
                          "413": error("a body over the payload limit"),
                          "422": error("a malformed body, a batch too large, an input too long with truncate false"),
                          "424": error("the engine failed"), "429": error("the queue is full"),
                          "503": error("starting or draining")}}}
    paths = {"/predict": post("predict"), "/": post("predict_root"), "/invocations": post("invocations"),
             "/info": _get("info", "Info: TEI's Info for this model", _json(ref[TEIInfo], "Served model info")),
             "/health": _get("health", "Health", {"description": "Everything is working fine"},
                             **{"503": error("Text embeddings Inference is down")}),
             "/metrics": _get("metrics", "Metrics (Prometheus text)", {
                 "description": "Prometheus Metrics", "content": {"text/plain": {"schema": {"type": "string"}}}})}
    return _document("Text Embeddings Inference (deebert-jax)", version, paths, schemas)


def routes(document: dict, *paths: str) -> list:
    """The document at each of `paths`, and the docs page at /docs showing the first."""
    from swagger_ui_bundle import swagger_ui_path   # pyproject's `serve` extra

    async def schema(request: Request) -> JSONResponse:
        return JSONResponse(document)

    page = DOCS_PAGE.format(title=document["info"]["title"], url=paths[0])

    async def docs(request: Request) -> HTMLResponse:
        return HTMLResponse(page)
    return [*(Route(p, schema, methods=["GET"]) for p in paths), Route("/docs", docs, methods=["GET"]),
            Mount("/docs/static", app=StaticFiles(directory=str(swagger_ui_path)))]
