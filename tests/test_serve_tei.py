"""`train.serve --api tei`: Text Embeddings Inference's API for a classifier, checked against TEI's
own published schema (tests/data/tei_openapi_predict.json, from its docs/openapi.json, made
strict: no key TEI does not define), TEI's documented curl examples, huggingface_hub's
InferenceClient on a real uvicorn, prometheus_client's parser and openapi-spec-validator."""

import copy
import json
import pathlib
from typing import Literal

import numpy as np
import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.inference._generated.types import TextClassificationOutputElement
from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import validate as validate_openapi
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, ConfigDict, TypeAdapter
from test_serve import LONG, SEQ, TEXTS, call
from test_serve_api import LABELS, hub_online, live, model_dir, service  # noqa: F401 - fixtures

from deebert_jax.data import glue as data
from deebert_jax.serving import requests as req
from deebert_jax.serving.app import create_app
from deebert_jax.serving.server import build_service
from deebert_jax.serving.tei import create_tei_app

TEI_SCHEMAS = json.loads((pathlib.Path(__file__).parent / "data" / "tei_openapi_predict.json").read_text())


def strict(schema):
    """TEI's schemas with `additionalProperties: false` on every object that lists properties."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
    walk(schema)
    return schema


STRICT_COMPONENTS = strict(TEI_SCHEMAS["components"])


def check_tei(instance, name):
    """`instance` is valid for TEI's schema `name`, with no key beyond TEI's (OpenAPI 3.0 rules)."""
    OAS30Validator({"$ref": f"#/components/schemas/{name}", "components": STRICT_COMPONENTS}).validate(instance)


class Prediction(BaseModel):   # TEI's router/src/http/types.rs, as a strict parser would read it
    model_config = ConfigDict(extra="forbid", strict=True)
    score: float
    label: str


class ErrorResponse(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    error: str
    error_type: Literal["Unhealthy", "Backend", "Overloaded", "Validation", "Tokenizer", "Empty"]


PREDICT_RESPONSE = TypeAdapter(list[Prediction] | list[list[Prediction]])


@pytest.fixture(scope="module")
def tei(service):
    return create_tei_app(service)


def softmax(z):
    e = np.exp(np.asarray(z, np.float64) - np.max(z))
    return e / e.sum()


def test_tei_curl_examples_answer_as_tei(tei, service):
    """docs/source/en/quick_tour.md: one text, and a batch of [text] lists."""
    ours = create_app(service)
    one = call(tei, "POST", "/predict", json={"inputs": "I like you."})
    assert one.status_code == 200
    check_tei(one.json(), "PredictResponse")
    PREDICT_RESPONSE.validate_python(one.json())
    record = call(ours, "POST", "/predict", json={"inputs": "I like you."}).json()[0]
    assert [list(d) for d in one.json()] == [["score", "label"]] * len(LABELS)   # serde's field order
    assert one.json()[0]["label"] == record["label"] and len(one.json()) == len(LABELS)
    assert [d["score"] for d in one.json()] == sorted((d["score"] for d in one.json()), reverse=True)
    for d in one.json():
        assert d["score"] == pytest.approx(record["probabilities"][LABELS.index(d["label"])], abs=1e-6)
    assert one.headers["x-exit-layer"] == str(record["exit_layer"])
    for header in ("x-compute-time", "x-total-time", "x-tokenization-time", "x-queue-time", "x-inference-time",
                   "x-compute-tokens", "x-compute-characters"):
        assert one.headers[header].isdigit(), header
    assert one.headers["x-compute-characters"] == str(len("I like you."))
    batch = call(tei, "POST", "/predict", json={"inputs": [["I like you."], ["I hate pineapples"]]})
    check_tei(batch.json(), "PredictResponse")
    assert len(batch.json()) == 2 and all(len(b) == len(LABELS) for b in batch.json())
    assert batch.json()[0] == one.json() and len(batch.headers["x-exit-layer"].split(",")) == 2


def test_inputs_in_teis_three_shapes(tei, service):
    ours = create_app(service)
    pair = call(tei, "POST", "/", json={"inputs": ["the movie", "was good"]}).json()   # one pair, not two texts
    want = call(ours, "POST", "/predict", json={"inputs": [["the movie", "was good"]]}).json()[0]
    assert isinstance(pair[0], dict) and pair[0]["label"] == want["label"]
    assert pair[0]["score"] == pytest.approx(max(want["probabilities"]), abs=1e-6)
    assert call(tei, "POST", "/invocations", json={"inputs": ["good"]}).json() == \
        call(tei, "POST", "/predict", json={"inputs": "good"}).json()
    mixed = call(tei, "POST", "/predict", json={"inputs": [["good"], ["the movie", "was good"]]}).json()
    assert mixed[1] == pair and len(mixed) == 2


def test_raw_scores_and_truncate_are_honoured(tei, service):
    probs = call(tei, "POST", "/predict", json={"inputs": TEXTS[2]}).json()
    raw = call(tei, "POST", "/predict", json={"inputs": TEXTS[2], "raw_scores": True}).json()
    by_label = lambda answer: [next(d["score"] for d in answer if d["label"] == n) for n in LABELS]
    np.testing.assert_allclose(softmax(by_label(raw)), by_label(probs), atol=1e-6)
    assert not np.allclose(by_label(raw), by_label(probs))
    long = " ".join(["very good"] * 200)   # 400 words: past the 16-token maximum
    assert call(tei, "POST", "/predict", json={"inputs": long}).status_code == 200   # TEI's --auto-truncate
    r = call(tei, "POST", "/predict", json={"inputs": long, "truncate": False})
    assert r.status_code == 422 and r.json()["error_type"] == "Validation"
    assert r.json()["error"].startswith(f'"inputs" has more than {SEQ} tokens')
    r = call(tei, "POST", "/predict", json={"inputs": [["good"], [long]], "truncate": False})
    assert r.status_code == 422 and r.json()["error"].startswith('"inputs[1]" has more than')
    assert call(tei, "POST", "/predict", json={"inputs": LONG, "truncation_direction": "left"}).status_code == 200


def test_left_truncation_keeps_the_end(model_dir):
    tokenizer = data.load_tokenizer(model_dir)
    text = "the movie " * 20 + "was bad"
    right, left = (req.to_rows(tokenizer, [(text, None)], (SEQ,), truncation_side=side)[0] for side in ("right", "left"))
    ids = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]
    assert right.truncated and left.truncated
    assert list(left.input_ids[-3:-1]) == ids("was bad") and list(right.input_ids[1:3]) == ids("the movie")
    assert tokenizer.truncation_side == "right"   # put back


@pytest.mark.parametrize("body, status, error_type, message", [
    ({"inputs": ""}, 400, "Empty", '"inputs" is empty'),
    ({"inputs": [["good"], [" "]]}, 400, "Empty", '"inputs[1][0]" is empty'),
    ({"inputs": "good", "normalize": True}, 422, "Validation", 'unknown field "normalize"'),
    ({"inputs": "good", "raw_scores": "yes"}, 422, "Validation", '"raw_scores": Input should be a valid boolean'),
    ({"inputs": "good", "truncation_direction": "up"}, 422, "Validation", '"truncation_direction"'),
    ({"inputs": ["a", "b", "c"]}, 422, "Validation", '"inputs" has 3 strings'),
    ({"inputs": [["a"], "b"]}, 422, "Validation", '"inputs[1]" must be a list'),
    ({"inputs": []}, 422, "Validation", '"inputs" is an empty list'),
    ({"inputs": [["good"]] * 65}, 422, "Validation", "at most 64 per request"),
    ({"inputs": "good", "raw_scores": True, "parameters": {"function_to_apply": "softmax"}}, 422, "Validation",
     '"raw_scores" is true but "parameters.function_to_apply" is "softmax"'),
    ({"text": "good"}, 422, "Validation", 'with an "inputs" field'),
])
def test_errors_are_teis(tei, body, status, error_type, message):
    r = call(tei, "POST", "/predict", json=body)
    assert r.status_code == status and r.json()["error_type"] == error_type, r.text
    assert message in r.json()["error"] and "\n" not in r.json()["error"]
    check_tei(r.json(), "ErrorResponse")
    ErrorResponse.model_validate(r.json())


def test_overload_starting_payload_and_other_routes_are_teis(model_dir):
    service = build_service(str(model_dir), max_seq_length=SEQ, max_queue=2, bucket_sizes=(4,), say=lambda line: None)
    app = create_tei_app(service)
    for method, path in (("GET", "/health"), ("POST", "/predict")):
        r = call(app, method, path, json={"inputs": "good"})   # still starting
        assert r.status_code == 503 and r.json()["error_type"] == "Unhealthy" and r.headers["Retry-After"] == "1"
    service.state = "ready"   # the engine is not running: accepted rows stay queued
    assert call(app, "GET", "/health").content == b"" and call(app, "GET", "/").status_code == 200
    r = call(app, "POST", "/predict", json={"inputs": [["good"]] * 3})
    assert r.status_code == 422 and "batch size 3 > maximum allowed batch size 2" in r.json()["error"]
    assert call(app, "GET", "/info").json()["max_client_batch_size"] == 2
    r = call(app, "POST", "/predict", content=json.dumps({"inputs": "good " * (req.MAX_BODY_BYTES // 5)}))
    assert r.status_code == 413 and r.json()["error_type"] == "Validation"
    r = call(app, "POST", "/embed", json={"inputs": "good"})
    assert r.status_code == 424 and r.json()["error_type"] == "Backend"
    service.engine.submit(req.to_rows(service.tokenizer, [("good", None), ("bad", None)], service.lengths),
                          [lambda *a: None] * 2)
    r = call(app, "POST", "/predict", json={"inputs": "good"})
    assert r.status_code == 429 and r.json() == {"error": "the queue is full (2 rows)", "error_type": "Overloaded"}
    service.engine.stop()


def test_info_is_teis_info(tei, service):
    info = call(tei, "GET", "/info").json()
    check_tei(info, "Info")
    assert info["model_type"] == {"classifier": {"id2label": {"0": "negative", "1": "positive"},
                                                 "label2id": {"negative": 0, "positive": 1}}}
    assert info["max_input_length"] == SEQ and info["auto_truncate"] is True and info["max_client_batch_size"] == 64
    ours = call(tei, "GET", "/deebert/info").json()
    assert ours["threshold_source"] == "exit_policy.json" and ours["rule"] == "entropy"


def test_metrics_have_teis_names(tei):
    call(tei, "POST", "/predict", json={"inputs": "good"})
    call(tei, "POST", "/predict", json={"inputs": [["good"], ["bad"]]})
    call(tei, "POST", "/predict", json={"inputs": ""})
    text = call(tei, "GET", "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    # TEI's exporter writes `te_request_count{method="single"} 3` under `# TYPE te_request_count counter`;
    # prometheus_client's parser reads that as the counter family te_request_count.
    for name, labels in (("te_request_count", {"method": "single"}), ("te_request_count", {"method": "batch"}),
                         ("te_request_success", {"method": "batch"}), ("te_request_failure", {"err": "validation"}),
                         ("te_predict_count", {}), ("te_predict_success", {})):
        assert families[name].type == "counter", name
        assert any(s.labels == labels and s.value >= 1 for s in families[name].samples), (name, labels)
        assert f"\n{name}{{" in text or f"\n{name} " in text, name   # the sample named as TEI names it
    for name in ("te_request_duration", "te_request_queue_duration", "te_request_inference_duration",
                 "te_request_tokenization_duration", "te_request_input_length", "te_batch_next_size"):
        assert samples[(f"{name}_count", ())] >= 1, name
    assert ("te_queue_size", ()) in samples and ("deebert_layer_saving", ()) in samples
    assert "# TYPE te_request_count counter\n" in text and "te_request_count_total" not in text


def test_openapi_document_is_valid(tei):
    document = call(tei, "GET", "/api-doc/openapi.json").json()
    validate_openapi(document)
    assert {"/predict", "/", "/invocations", "/info", "/health", "/metrics"} <= set(document["paths"])
    assert call(tei, "GET", "/openapi.json").json() == document
    assert "/api-doc/openapi.json" in call(tei, "GET", "/docs").text


def test_inference_client_against_the_tei_api(tei, hub_online):
    """huggingface_hub reads the answer of `POST /` as a list of lists and keeps the first; TEI
    answers a single text with one flat list, so against TEI (and us) the client returns the top
    label alone. `top_k` (which TEI drops) is honoured here."""
    want = call(tei, "POST", "/predict", json={"inputs": TEXTS[0]}).json()
    with live(tei) as url:
        client = InferenceClient(model=url, timeout=30)
        out = client.text_classification(TEXTS[0])
        assert isinstance(out, TextClassificationOutputElement)
        assert out.label == want[0]["label"] and out.score == want[0]["score"]
        assert client.text_classification(TEXTS[0], top_k=2).label == want[0]["label"]
