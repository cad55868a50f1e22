"""`train.serve` and `deebert_jax.serving.app`: the routes and every error in-process (ASGI), the
CLI's errors, and one real server process drained by SIGTERM with requests in flight."""

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys

import httpx
import jax
import numpy as np
import pytest
from conftest import REPO, wait_for_ready
from test_exit_aware import random_params, safe_thresholds

from deebert_jax.data import glue as data
from deebert_jax.model import modeling
from deebert_jax.model import inference_step
from deebert_jax.inference import predict
from deebert_jax.weights.checkpoint import load_checkpoint, save_checkpoint, write_label_names
from deebert_jax.core.config import tiny_config
from deebert_jax.core.errors import InputError
from deebert_jax.inference.early_exit import entropy
from deebert_jax.serving import requests as req
from deebert_jax.serving.app import create_app
from deebert_jax.serving.server import build_service
from train import serve as serve_cli
from train.cli import run

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "movie", "film", "was", "is", "good", "bad",
         "very", "not", "a", "plot", "."]
CONFIG = tiny_config(vocab_size=len(WORDS), num_hidden_layers=3, initializer_range=0.5)
SEQ = 16
TEXTS = ["the movie was good", "a very bad film", "the plot is not good .", "good", "bad", "the film is very very good",
         "not a good plot", "the movie", "very bad . very bad . the plot was not good"]


def save_model(directory, config, params, labels=None):
    from transformers import BertTokenizerFast
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(WORDS)})

    def extra(tmp):
        tokenizer.save_pretrained(f"{tmp}/tokenizer")
        if labels:
            write_label_names(tmp, labels)
    return save_checkpoint(directory, config, params, write_extra=extra)


PAIRS = [("the movie was good", "the film was bad"), ("good", None)]
LONG = " ".join(["very good"] * 20)
EXAMPLES = [(t, None) for t in TEXTS] + PAIRS + [(LONG, None)]   # everything the routes test sends


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    params = random_params(CONFIG, 4)  # random, spread ramps, no slow init
    return save_model(tmp_path_factory.mktemp("ckpt") / "model", CONFIG, params, labels=("negative", "positive"))


@pytest.fixture(scope="module")
def threshold(model_dir):
    """An entropy threshold halfway between observed scores: exits at several layers, none of
    them within float rounding of it."""
    config, params = load_checkpoint(model_dir)
    arrays, _ = predict.encode(data.load_tokenizer(model_dir), [(t, None) for t in TEXTS], SEQ)
    ramp = inference_step.forward(config, params, arrays["input_ids"], arrays["attention_mask"], arrays["token_type_ids"])
    return safe_thresholds(entropy(ramp), np.random.default_rng(0), 1, (0.2, 0.7))[0]


@pytest.fixture(scope="module")
def service(model_dir, threshold):
    service = build_service(str(model_dir), threshold=threshold, max_seq_length=SEQ, bucket_sizes=(4,),
                            say=lambda line: None)
    service.start()
    yield service
    service.stop()


def call(app, method, path, **kwargs):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.request(method, path, **kwargs)
    return asyncio.run(go())


@pytest.fixture(scope="module")
def reference(model_dir, threshold):
    """`train.predict`'s records for EXAMPLES (one call: one compiled program) -> {example: record}."""
    config, params = load_checkpoint(model_dir)
    arrays, truncated = predict.encode(data.load_tokenizer(model_dir), EXAMPLES, SEQ)
    probs, exits, _ = predict.predict_arrays(config, params, arrays, threshold)
    records = predict.format_predictions(EXAMPLES, probs, exits, ["negative", "positive"], truncated)
    return dict(zip(EXAMPLES, records))


def assert_same_records(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert {k: v for k, v in g.items() if k != "probabilities"} == {k: v for k, v in w.items() if k != "probabilities"}
        np.testing.assert_allclose(g["probabilities"], w["probabilities"], atol=2e-6)


def test_predict_answers_what_train_predict_writes(service, reference, threshold):
    app = create_app(service)
    health = call(app, "GET", "/health")
    assert health.status_code == 200 and health.json()["status"] == "ready"
    assert health.json()["threshold"] == pytest.approx(threshold) and health.json()["lengths"] == [SEQ]
    assert health.json()["schedule"] == "arrivals"
    single = call(app, "POST", "/predict", json={"inputs": TEXTS[0]})
    assert single.status_code == 200
    assert_same_records(single.json(), [reference[(TEXTS[0], None)]])
    many = call(app, "POST", "/predict", json={"inputs": TEXTS}).json()
    want = [reference[(t, None)] for t in TEXTS]
    assert_same_records(many, want)
    assert len({r["exit_layer"] for r in want}) >= 2 and {r["label"] for r in want} == {"negative", "positive"}
    pairs = call(app, "POST", "/predict", json={"inputs": [[a, b] if b else [a] for a, b in PAIRS]}).json()
    assert_same_records(pairs, [reference[p] for p in PAIRS])
    long = call(app, "POST", "/predict", json={"inputs": [LONG]}).json()
    assert_same_records(long, [reference[(LONG, None)]])
    assert long[0]["truncated"] is True
    metrics = call(app, "GET", "/metrics").text
    for name in ('deebert_requests_total{status="200"} 4.0', "deebert_request_latency_seconds_count 4.0",
                 "deebert_queue_depth 0.0", "deebert_rows_per_layer_step_count", "deebert_layer_saving"):
        assert name in metrics, name
    assert f"deebert_exit_layer_count {len(EXAMPLES) + 1}.0" in metrics  # TEXTS[0] twice


BAD_BODIES = [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, 'with an "inputs" field'),
    (b'{"text": "good"}', 400, 'with an "inputs" field'),
    (b'{"inputs": 5}', 400, '"inputs" must be a string or a list, got int'),
    (b'{"inputs": ""}', 400, '"inputs" is empty'),
    (b'{"inputs": []}', 400, '"inputs" is an empty list'),
    (b'{"inputs": ["good", "  "]}', 400, '"inputs[1]" is empty'),
    (b'{"inputs": ["good", 3]}', 400, '"inputs[1]" must be a string, got int'),
    (b'{"inputs": [["a", "b", "c"]]}', 400, '"inputs[0]" has 3 texts'),
    (b'{"inputs": ["good", ["a", null]]}', 400, '"inputs[1][1]" is empty'),
    (b'{"inputs": [[]]}', 400, '"inputs[0]" has 0 texts'),
    (json.dumps({"inputs": ["good"] * (req.MAX_INPUTS + 1)}).encode(), 413, f"at most {req.MAX_INPUTS} per request"),
    (json.dumps({"inputs": "good " * (req.MAX_BODY_BYTES // 5)}).encode(), 413, f"at most {req.MAX_BODY_BYTES}"),
]


@pytest.mark.parametrize("body, status, message", BAD_BODIES)
def test_bad_requests_name_the_field_and_index(service, body, status, message):
    response = call(create_app(service), "POST", "/predict", content=body)
    assert response.status_code == status
    assert message in response.json()["error"] and "\n" not in response.json()["error"]
    assert service.engine.pending() == 0


def test_queue_full_starting_and_draining_are_503_with_retry_after(model_dir, threshold):
    service = build_service(str(model_dir), threshold=threshold, max_seq_length=SEQ, max_queue=2,
                            bucket_sizes=(4,), say=lambda line: None)
    app = create_app(service)
    for path, method in (("/health", "GET"), ("/predict", "POST")):
        r = call(app, method, path, json={"inputs": "good"})
        assert r.status_code == 503 and r.headers["Retry-After"] == "1", path  # still starting
    service.state = "ready"  # the engine is not running: accepted rows stay queued
    r = call(app, "POST", "/predict", json={"inputs": ["good", "bad", "good"]})   # could never be queued
    assert r.status_code == 413 and "the queue holds at most 2 rows" in r.json()["error"]

    async def abandoned():  # a client that goes away: its queued rows are dropped, not run
        task = asyncio.ensure_future(service.predict([("good", None), ("bad", None)]))
        await asyncio.sleep(0.05)
        assert service.engine.pending() == 2
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            r = await client.post("/predict", json={"inputs": "good"})   # fits the queue, once it has room
        assert r.status_code == 503 and "queue is full (2 rows)" in r.json()["error"] and r.headers["Retry-After"] == "1"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    asyncio.run(abandoned())
    assert service.engine.pending() == 0
    service.begin_drain()
    for path, method in (("/health", "GET"), ("/predict", "POST")):
        r = call(app, method, path, json={"inputs": "good"})
        assert r.status_code == 503 and r.json() in ({"status": "draining"}, {"error": "the server is draining"})
    assert 'deebert_requests_total{status="503"} 3.0' in call(app, "GET", "/metrics").text


def test_label_names_of_glue_tasks():
    assert data.label_names("SST-2") == ("negative", "positive")
    assert data.label_names("mnli") == ("entailment", "neutral", "contradiction")
    assert data.label_names("synthetic") == ()


def test_cli_missing_checkpoint_and_port_in_use_are_one_error_line(model_dir, tmp_path, capsys):
    assert run(serve_cli.main, ["--checkpoint", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "not a deebert-jax checkpoint" in err and "\n" not in err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert run(serve_cli.main, ["--checkpoint", str(model_dir), "--port", str(port),
                                    "--max-seq-length", str(SEQ)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot listen on 127.0.0.1:{port}") and "\n" not in err


def metric(text, name):
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(match.group(1))


def test_server_process_drains_on_sigterm_answering_every_request(tmp_path):
    # Wide enough that the requests below keep the server busy for a while on 2 cores.
    config = tiny_config(vocab_size=len(WORDS), hidden_size=256, intermediate_size=1024, num_hidden_layers=4)
    shapes = jax.eval_shape(lambda: modeling.init_params(config, jax.random.PRNGKey(0), SEQ))
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda s: rng.normal(0, 0.05, s.shape).astype(s.dtype), shapes)
    model = save_model(tmp_path / "model", config, params)
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "train.serve", "--checkpoint", str(model), "--port", "0",
                             "--max-seq-length", str(SEQ)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        url = wait_for_ready(proc, lines)
        assert "threshold 0: the full depth" in "".join(lines)  # no exit_policy.json
        n_requests, per_request = 24, 32
        texts = [TEXTS[i % len(TEXTS)] for i in range(per_request)]

        async def load():
            limits = httpx.Limits(max_connections=n_requests + 2)
            async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
                assert (await client.get("/health")).status_code == 200
                tasks = [asyncio.ensure_future(client.post("/predict", json={"inputs": texts}))
                         for _ in range(n_requests)]
                while True:  # until the server holds every row: answered or queued
                    text = (await client.get("/metrics")).text
                    pending, answered = metric(text, "deebert_queue_depth"), metric(text, "deebert_exit_layer_count")
                    if pending + answered == n_requests * per_request:
                        break
                    await asyncio.sleep(0.01)
                assert pending > 0  # requests are in flight when the signal comes
                proc.send_signal(signal.SIGTERM)
                return await asyncio.gather(*tasks)

        responses = asyncio.run(load())
        assert [r.status_code for r in responses] == [200] * n_requests
        assert all(len(r.json()) == per_request and r.json()[0]["exit_layer"] == 4 for r in responses)
        assert proc.wait(timeout=60) == 0
        assert "stopped: every accepted request was answered" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_shadow_rows_leave_answers_alone_and_the_live_check_acts(model_dir, reference, threshold):
    """Every row shadowed: the same records; the live check's figures in /health and /metrics;
    once its alarm fires with --on-drift full-depth, later rows answer at the last layer."""
    import time
    said = []
    service = build_service(str(model_dir), threshold=threshold, max_seq_length=SEQ, bucket_sizes=(4,),
                            say=said.append, shadow_share=1.0, on_drift="full-depth")
    model_line = next(line for line in said if line.startswith("model:"))
    assert "100% of rows shadowed to full depth" in model_line and model_line.endswith(f"max sequence length {SEQ}")
    service.start()
    try:
        app = create_app(service)
        assert_same_records(call(app, "POST", "/predict", json={"inputs": TEXTS}).json(),
                            [reference[(t, None)] for t in TEXTS])
        deadline = time.monotonic() + 60
        while service.drift.snapshot()["shadow_rows"] < len(TEXTS) and time.monotonic() < deadline:
            time.sleep(0.05)   # the lane runs while the engine is idle
        drift = call(app, "GET", "/health").json()["drift"]
        config, params = load_checkpoint(model_dir)
        arrays, _ = predict.encode(data.load_tokenizer(model_dir), [(t, None) for t in TEXTS], SEQ)
        full = np.argmax(predict.predict_arrays(config, params, arrays, 0.0)[0], -1)
        answered = [reference[(t, None)]["label_id"] for t in TEXTS]
        assert drift["shadow_rows"] == len(TEXTS) and drift["budget"] == 0.01
        assert drift["disagreements"] == sum(a != f for a, f in zip(answered, full))   # the lane ran to full depth
        assert drift["lower"] <= drift["observed"] <= drift["upper"]
        assert drift["alarm"] == (drift["lower"] > drift["budget"])
        assert drift["shadow_skipped"] == 0
        metrics = call(app, "GET", "/metrics").text
        assert metric(metrics, "deebert_shadow_rows") == len(TEXTS)
        assert metric(metrics, "deebert_drift_alarm") == float(drift["alarm"])
        while not service.drift.snapshot()["alarm"]:   # traffic that disagrees on every shadow row
            service.drift.record(1, 0, 1)
        assert any(line.startswith("drift: the disagreement's lower bound") for line in said)
        assert metric(call(app, "GET", "/metrics").text, "deebert_drift_alarm") == 1
        later = call(app, "POST", "/predict", json={"inputs": TEXTS}).json()
        assert {r["exit_layer"] for r in later} == {CONFIG.num_hidden_layers}
    finally:
        service.stop()


def test_rows_are_padded_to_multiples_of_8_when_asked(model_dir, threshold):
    from deebert_jax.serving.engine import Engine
    service = build_service(str(model_dir), threshold=threshold, max_seq_length=40, bucket_sizes=(4,),
                            say=lambda line: None, length_spacing="multiple-of-8")
    assert isinstance(service.engine, Engine) and service.engine.lengths == (16, 24, 32, 40)
    with pytest.raises(InputError, match="length spacing 'eights'"):
        build_service(str(model_dir), threshold=threshold, max_seq_length=40, say=lambda line: None,
                      length_spacing="eights")
