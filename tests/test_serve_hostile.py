"""The server against a hostile client: bodies that crashed the parser or the tokenizer, a bug of
ours, a request that can never be queued, a client that leaves, and (one real uvicorn on a
loopback port) connections that trickle, hold or crowd."""

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from conftest import REPO, wait_for_ready
from test_serve import CONFIG, call, save_model
from test_exit_aware import random_params

from deebert_jax.serving.app import create_app
from deebert_jax.serving.server import build_service

SEQ = 16
HOSTILE = [
    (b'{"inputs": ["a \\ud800 b"]}', 400, '"inputs[0]" is not valid Unicode: a lone surrogate U+D800 at character 2'),
    (b'{"inputs": "\\udfff"}', 400, '"inputs" is not valid Unicode'),
    (b"[" * 100_000, 400, "the body is not valid JSON (nested too deeply)"),
    (b'{"inputs": [' + b"9" * 5000 + b"]}", 400, '"inputs[0]" must be a string, got a 5000-digit number'),
    (b'{"inputs": ["good", ["a", -' + b"1" * 5000 + b"]]}", 400, '"inputs[1][1]" must be a string, got a 5000-digit'),
    # No field is silently ignored: an unknown one is refused by name, whatever it holds.
    (b'{"inputs": "good", "extra": ' + b"7" * 5000 + b"}", 400, 'unknown field "extra": /predict takes "inputs"'),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("ckpt") / "model", CONFIG, random_params(CONFIG, 4),
                      labels=("negative", "positive"))


@pytest.fixture(scope="module")
def service(model_dir):
    service = build_service(str(model_dir), threshold=0.3, max_seq_length=SEQ, bucket_sizes=(4,), max_queue=4,
                            say=lambda line: None)
    service.start()
    yield service
    service.stop()


@pytest.mark.parametrize("body, status, message", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_bodies_are_400_naming_the_field(service, body, status, message):
    app = create_app(service)
    before = call(app, "GET", "/metrics").text
    response = call(app, "POST", "/predict", content=body)
    assert response.status_code == status, response.text[:500]
    if message:
        assert message in response.json()["error"] and "\n" not in response.json()["error"]
    counted = lambda text: float(re.search(rf'deebert_requests_total{{status="{status}"}} (\S+)', text).group(1)
                                 if f'status="{status}"' in text else 0)
    assert counted(call(app, "GET", "/metrics").text) == counted(before) + 1
    assert service.engine.pending() == 0


def test_a_bug_is_a_json_500_counted_in_metrics(service, monkeypatch, caplog):
    app = create_app(service)

    async def broken(examples):
        raise KeyError("oops")
    monkeypatch.setattr(service, "predict", broken)
    response = call(app, "POST", "/predict", json={"inputs": "good"})
    assert response.status_code == 500 and response.json() == {
        "error": "internal error (KeyError); the server log has the traceback"}
    assert 'deebert_requests_total{status="500"} 1.0' in call(app, "GET", "/metrics").text
    assert "KeyError: 'oops'" in caplog.text
    assert service.state == "ready"


def test_a_request_larger_than_the_queue_is_413_not_503_forever(service):
    response = call(create_app(service), "POST", "/predict", json={"inputs": ["good"] * 10})
    assert response.status_code == 413 and "Retry-After" not in response.headers
    assert "the queue holds at most 4 rows (--max-queue)" in response.json()["error"]


def test_a_client_that_leaves_costs_nothing_and_is_not_counted_as_answered(model_dir):
    service = build_service(str(model_dir), threshold=0.3, max_seq_length=SEQ, bucket_sizes=(4,), say=lambda line: None)
    service.state = "ready"   # the engine is not running: rows stay queued until the client leaves
    app = create_app(service)
    sent = asyncio.Event()

    async def go():
        body = b'{"inputs": ["good", "bad", "the movie"]}'
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            if messages:
                return messages.pop()
            sent.set()
            await asyncio.sleep(0.2)   # the client goes away while its rows wait
            return {"type": "http.disconnect"}
        replies = []

        async def send(message):
            replies.append(message)
        scope = {"type": "http", "method": "POST", "path": "/predict", "headers": [(b"content-type", b"application/json")],
                 "query_string": b"", "http_version": "1.1", "scheme": "http", "server": ("t", 80), "client": ("c", 1),
                 "root_path": "", "raw_path": b"/predict"}
        task = asyncio.ensure_future(app(scope, receive, send))
        await sent.wait()
        await asyncio.sleep(0.05)
        assert service.engine.pending() == 3
        await task
        return replies
    replies = asyncio.run(go())
    assert service.engine.pending() == 0   # dropped, never run
    assert replies[0]["status"] == 499
    metrics = call(app, "GET", "/metrics").text
    assert 'deebert_requests_total{status="499"} 1.0' in metrics and 'status="200"' not in metrics
    assert "deebert_exit_layer_count 0.0" in metrics


# ----------------------------------------------------------------------------------------------
# One real server: trickled headers, a held body, a crowd of idle sockets, SIGTERM

def _connect(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    return s


def _closed_within(sock, seconds):
    """Whether the server closes `sock` within `seconds` (reads until EOF)."""
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
        return True
    except socket.timeout:
        return False
    except ConnectionResetError:
        return True


def test_one_client_cannot_hold_or_starve_the_server(model_dir):
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-m", "train.serve", "--checkpoint", str(model_dir), "--port", "0",
                             "--max-seq-length", str(SEQ), "--header-timeout", "1", "--body-timeout", "1",
                             "--keep-alive-timeout", "1", "--max-connections", "16",
                             "--graceful-shutdown-timeout", "3"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    held = []
    try:
        port = int(wait_for_ready(proc).rsplit(":", 1)[1])
        # Headers trickled a byte at a time: closed at the header deadline, not kept alive by the bytes.
        s = _connect(port)
        start = time.monotonic()
        try:
            for byte in b"POST /predict HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
                s.send(bytes([byte]))
                time.sleep(0.05)
            closed = _closed_within(s, 3)
        except (BrokenPipeError, ConnectionResetError):   # closed while it trickled
            closed = True
        assert closed and 0.9 < time.monotonic() - start < 4
        # A new connection that sends nothing: closed after the idle timeout.
        s = _connect(port)
        assert _closed_within(s, 3)
        # A crowd of idle sockets past --max-connections: /health still answers.
        held = [_connect(port) for _ in range(40)]
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
        for s in held:
            s.close()
        # One chunk of a chunked body, then silence: the body deadline closes it, and SIGTERM completes.
        s = _connect(port)
        s.send(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"inp\r\n")
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        assert proc.wait(timeout=20) == 0 and time.monotonic() - start < 10
        assert "stopped: every accepted request was answered" in proc.stdout.read()
        s.close()
    finally:
        for s in held:
            s.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
