"""The default API's additions, checked by clients and validators we did not write: `POST /` in
the Hugging Face Inference API's shape (huggingface_hub's InferenceClient against a real
uvicorn), `score` in the records, `GET /info`, the OpenAPI document (openapi-spec-validator) and
its docs page, the metrics (prometheus_client's parser), and no field silently ignored."""

import asyncio
import contextlib
import json
import socket
import threading
import time

import numpy as np
import pytest
import uvicorn
from huggingface_hub import InferenceClient
from openapi_spec_validator import validate as validate_openapi
from prometheus_client.parser import text_string_to_metric_families
from test_exit_aware import random_params
from test_serve import CONFIG, SEQ, TEXTS, call, save_model

from deebert_jax.inference.exit_policy import write_exit_policy
from deebert_jax.serving.app import create_app
from deebert_jax.serving.server import build_service

LABELS = ("negative", "positive")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model = save_model(tmp_path_factory.mktemp("ckpt") / "model", CONFIG, random_params(CONFIG, 4), labels=LABELS)
    write_exit_policy(model, {"rule": "entropy", "threshold": 0.3, "max_seq_length": SEQ, "max_drop": 1.0,
                              "confidence": 0.95, "guarantee": "with probability at least 0.95, at most 1 point",
                              "guarantee_scope": ["examples drawn like the calibration split"]})
    return model


@pytest.fixture(scope="module")
def service(model_dir):
    service = build_service(str(model_dir), max_seq_length=SEQ, bucket_sizes=(4,), say=lambda line: None)
    service.start()
    yield service
    service.stop()


@pytest.fixture
def hub_online(monkeypatch):
    """huggingface_hub refuses every request while HF_HUB_OFFLINE is set (conftest sets it so that
    nothing reaches the hub); its InferenceClient here only talks to a loopback server."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@contextlib.contextmanager
def live(app):
    """`app` under a real uvicorn on a loopback port (a thread of this process) -> its URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def test_inference_client_gets_every_label_and_top_k(service, hub_online):
    app = create_app(service)
    records = call(app, "POST", "/predict", json={"inputs": TEXTS[:3]}).json()
    with live(app) as url:
        client = InferenceClient(model=url, timeout=30)
        for text, record in zip(TEXTS[:3], records):
            out = client.text_classification(text)
            assert [o.label for o in out] == sorted(LABELS, key=lambda n: -record["probabilities"][LABELS.index(n)])
            for o in out:
                assert o.score == pytest.approx(record["probabilities"][LABELS.index(o.label)], abs=1e-6)
            top = client.text_classification(text, top_k=1)
            assert len(top) == 1 and top[0].label == record["label"] and top[0].score == pytest.approx(record["score"])
            raw = client.text_classification(text, function_to_apply="none")
            logits = np.array([o.score for o in sorted(raw, key=lambda o: LABELS.index(o.label))])
            np.testing.assert_allclose(np.exp(logits) / np.exp(logits).sum(), record["probabilities"], atol=1e-6)


def test_root_answers_lists_of_labels_with_exit_layers_in_a_header(service):
    app = create_app(service)
    records = call(app, "POST", "/predict", json={"inputs": [TEXTS[0], ["the movie", "good"]]}).json()
    r = call(app, "POST", "/", json={"inputs": [TEXTS[0], {"text": "the movie", "text_pair": "good"}],
                                     "parameters": {"function_to_apply": "sigmoid"}})
    assert r.status_code == 200
    assert r.headers["x-exit-layer"] == ",".join(str(rec["exit_layer"]) for rec in records)
    lists = r.json()
    assert len(lists) == 2 and all(list(d) == ["label", "score"] for answer in lists for d in answer)
    for answer, record in zip(lists, records):
        assert [d["score"] for d in answer] == sorted([d["score"] for d in answer], reverse=True)
        assert answer[0]["label"] == record["label"] and 0 < answer[-1]["score"] < answer[0]["score"] < 1


def test_records_gain_score_and_keep_every_other_byte(service):
    r = call(create_app(service), "POST", "/predict", json={"inputs": [TEXTS[1], [TEXTS[0], TEXTS[2]]]})
    for record in r.json():
        assert list(record)[-1] == "score" and record["score"] == record["probabilities"][record["label_id"]]
    before = [{k: v for k, v in rec.items() if k != "score"} for rec in r.json()]   # the records as they were
    old = json.dumps(before, separators=(",", ":"))
    new = r.content.decode()
    for rec in r.json():
        old = old.replace(f',"truncated":{json.dumps(rec["truncated"])}}}',
                          f',"truncated":{json.dumps(rec["truncated"])},"score":{rec["score"]}}}', 1)
    assert new == old


@pytest.mark.parametrize("path, body, message", [
    ("/predict", {"inputs": "good", "top_k": 1}, 'unknown field "top_k": /predict takes "inputs"'),
    ("/predict", {"inputs": "good", "parameters": {}}, "(the Inference API's body, with parameters, goes to POST /)"),
    ("/", {"inputs": "good", "raw_scores": True}, 'unknown field "raw_scores": expected only "inputs", "parameters"'),
    ("/", {"inputs": "good", "parameters": {"top_k": 1, "truncation": "only_first"}},
     'unknown field "parameters.truncation": expected only "top_k", "function_to_apply"'),
    ("/", {"inputs": "good", "parameters": {"top_k": 0}}, '"parameters.top_k": Input should be greater than 0'),
    ("/", {"inputs": "good", "parameters": {"function_to_apply": "tanh"}}, '"parameters.function_to_apply": Input'),
    ("/", {"inputs": {"text": "good", "pair": "bad"}}, 'unknown field "inputs.pair"'),
    ("/", {"inputs": ["good", ""]}, '"inputs[1]" is empty'),
    ("/", {"inputs": 3}, '"inputs" must be a string, an object or a list, got int'),
])
def test_no_field_is_silently_ignored(service, path, body, message):
    r = call(create_app(service), "POST", path, json=body)
    assert r.status_code == 400 and message in r.json()["error"] and "\n" not in r.json()["error"], r.text


def test_info_says_where_the_threshold_came_from_and_what_it_guarantees(service):
    info = call(create_app(service), "GET", "/info").json()
    assert info["labels"] == list(LABELS) and info["layers"] == CONFIG.num_hidden_layers
    assert info["max_input_length"] == SEQ and info["rule"] == "entropy" and info["threshold"] == 0.3
    assert info["threshold_source"] == "exit_policy.json" and info["schedule"] == "arrivals"
    assert info["exit_policy"]["guarantee"].startswith("with probability at least 0.95")
    assert info["exit_policy"]["guarantee_scope"] == ["examples drawn like the calibration split"]
    assert info["limits"] == {"max_inputs": 64, "max_body_bytes": 1 << 20, "max_queue": 1024, "pool_slots": 256}
    assert info["version"] == "0.3.0"


def test_openapi_document_is_valid_and_the_docs_page_is_served(service):
    app = create_app(service)
    document = call(app, "GET", "/openapi.json").json()
    validate_openapi(document)
    assert {"/predict", "/", "/info", "/health", "/metrics"} <= set(document["paths"])
    assert "additionalProperties" in json.dumps(document["components"]["schemas"]["HFBody"])
    page = call(app, "GET", "/docs")
    assert page.status_code == 200 and "/openapi.json" in page.text
    for asset in ("swagger-ui.css", "swagger-ui-bundle.js"):
        assert call(app, "GET", f"/docs/static/{asset}").status_code == 200


def test_metrics_parse_with_prometheus_clients_parser(service):
    app = create_app(service)
    call(app, "POST", "/", json={"inputs": "good"})
    families = {f.name: f for f in text_string_to_metric_families(call(app, "GET", "/metrics").text)}
    assert families["deebert_requests"].type == "counter"
    assert any(s.labels == {"status": "200"} and s.value >= 1 for s in families["deebert_requests"].samples)
    assert families["deebert_request_latency_seconds"].type == "histogram"
    assert families["deebert_exit_layer"].type == "histogram"


def test_engine_hook_times_the_queue(service):
    async def go():
        return await service.run([("good", None), ("bad", None)])
    outcome = asyncio.run(go())
    assert len(outcome.queue_s) == 2 and all(q >= 0 for q in outcome.queue_s)
    assert all(i > 0 for i in outcome.inference_s) and outcome.tokenization_s > 0
    assert service._admitted == {}   # every admission time was taken back
