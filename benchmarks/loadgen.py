"""An open-loop load generator: requests sent at Poisson arrival times whatever the answers do
(closed-loop clients wait for answers and so hide the server's queueing), and their statistics.

The client is a minimal HTTP/1.1 keep-alive client on asyncio streams: on a 2-core machine the
generator shares the CPU with the server, and a full client library costs several times more
CPU per request. It talks to one `host:port`; every request is one POST of a JSON body.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
from typing import Sequence

from deebert_jax.core.errors import InputError

import numpy as np


@dataclasses.dataclass
class Outcome:
    """One request: which text, when it was sent (s from the start), latency (s), HTTP status
    (0: no answer) and the answer's label_id and exit_layer (None unless 200)."""
    index: int
    sent_s: float
    latency_s: float
    status: int
    label_id: int | None = None
    exit_layer: int | None = None
    error: str | None = None


class _Client:
    """Keep-alive connections to one host:port; a connection serves one request at a time."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self, path: str, body: bytes, timeout: float) -> tuple[int, bytes]:
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        while self._idle:
            # A pooled connection the server closed while idle (its keep-alive timeout) fails
            # before any answer: drop it and try the next, as HTTP clients do.
            conn = self._idle.pop()
            try:
                return await self._exchange(conn, head + body, timeout)
            except (ConnectionError, asyncio.IncompleteReadError) as e:
                if getattr(e, "partial", b""):
                    raise
        return await self._exchange(await asyncio.open_connection(self.host, self.port), head + body, timeout)

    async def _exchange(self, conn, request: bytes, timeout: float) -> tuple[int, bytes]:
        reader, writer = conn
        try:
            writer.write(request)
            status, payload, keep = await asyncio.wait_for(self._response(reader), timeout)
        except BaseException:
            writer.close()
            raise
        if keep:
            self._idle.append(conn)
        else:
            writer.close()
        return status, payload

    @staticmethod
    async def _response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
        headers = {k.strip().lower(): v.strip() for k, v in headers.items()}
        payload = await reader.readexactly(int(headers.get("content-length", "0")))
        return status, payload, headers.get("connection", "").lower() != "close"

    def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


def poisson_arrivals(rate: float, duration_s: float, max_requests: int, seed: int) -> np.ndarray:
    """Send times (s) of a Poisson process at `rate` per second over `duration_s`, at most `max_requests`."""
    if rate <= 0 or duration_s <= 0 or max_requests < 1:
        raise InputError(f"rate={rate}, duration_s={duration_s}, max_requests={max_requests}: must be positive")
    rng = np.random.default_rng(seed)
    n = min(max_requests, int(math.ceil(rate * duration_s * 1.5)) + 10)
    times = np.cumsum(rng.exponential(1.0 / rate, n))
    return times[times < duration_s][:max_requests]


async def open_loop(host: str, port: int, texts: Sequence[str], rate: float, duration_s: float, *,
                    max_requests: int = 5000, seed: int = 0, timeout_s: float = 30.0,
                    first_index: int = 0) -> list[Outcome]:
    """Sends one text per request (texts[(first_index + i) % len(texts)]) at Poisson times ->
    one Outcome per request, whatever happened to it."""
    client = _Client(host, port)
    arrivals = poisson_arrivals(rate, duration_s, max_requests, seed)
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def one(i: int, at: float) -> Outcome:
        await asyncio.sleep(max(0.0, start + at - loop.time()))
        index = (first_index + i) % len(texts)
        sent = loop.time()
        body = json.dumps({"inputs": texts[index]}).encode()
        try:
            status, payload = await client.post("/predict", body, timeout_s)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
            return Outcome(index, sent - start, loop.time() - sent, 0, error=type(e).__name__)
        latency = loop.time() - sent
        if status != 200:
            return Outcome(index, sent - start, latency, status, error=payload[:200].decode("utf-8", "replace"))
        record = json.loads(payload)[0]
        return Outcome(index, sent - start, latency, status, record["label_id"], record["exit_layer"])

    try:
        return list(await asyncio.gather(*(one(i, float(t)) for i, t in enumerate(arrivals))))
    finally:
        client.close()


def summarize(outcomes: Sequence[Outcome], rate: float, duration_s: float, labels: Sequence[int],
              reference: Sequence[tuple[int, int]] | None = None) -> dict:
    """Per offered rate: achieved throughput (answers per second from the first send to the last
    answer), p50/p90/p99 latency (ms, answered requests), errors, mean exit layer, accuracy
    against `labels` [text index] and, with `reference` [(label_id, exit_layer)] per text, the
    fraction of answers identical to it (train.predict's at the same threshold)."""
    ok = [o for o in outcomes if o.status == 200]
    errors = len(outcomes) - len(ok)
    span = max((o.sent_s + o.latency_s for o in ok), default=0.0) - min((o.sent_s for o in outcomes), default=0.0)
    lat = np.array([o.latency_s * 1e3 for o in ok]) if ok else np.array([math.nan])
    row = {
        "offered_rps": rate, "duration_s": duration_s, "requests": len(outcomes),
        "achieved_rps": round(len(ok) / span, 2) if ok and span > 0 else 0.0,
        "p50_ms": round(float(np.percentile(lat, 50)), 1), "p90_ms": round(float(np.percentile(lat, 90)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1), "errors": errors,
        "error_kinds": sorted({str(o.status) + (f" {o.error[:60]}" if o.error else "") for o in outcomes
                               if o.status != 200})[:5],
        "mean_exit_layer": round(float(np.mean([o.exit_layer for o in ok])), 3) if ok else None,
        "accuracy": round(float(np.mean([o.label_id == labels[o.index] for o in ok])), 4) if ok else None,
    }
    if reference is not None and ok:
        row["same_as_predict"] = round(float(np.mean([(o.label_id, o.exit_layer) == tuple(reference[o.index])
                                                      for o in ok])), 4)
    return row


def capacity(rows: Sequence[dict], slo_p99_ms: float) -> float | None:
    """The highest offered rate whose p99 is within the SLO with no errors (None if none is)."""
    good = [r["offered_rps"] for r in rows if r["errors"] == 0 and r["p99_ms"] <= slo_p99_ms]
    return max(good) if good else None


def _passes(row: dict, slo_p99_ms: float) -> bool:
    return row["errors"] == 0 and row["p99_ms"] <= slo_p99_ms


def interpolated_capacity(rows: Sequence[dict], slo_p99_ms: float) -> float | None:
    """Between the grid's capacity and the next offered rate that fails, the rate at which p99
    reaches the SLO, linearly interpolated (a failure by errors counts as p99 past any bound);
    the grid capacity itself when no higher rate was measured or it failed at once."""
    grid = capacity(rows, slo_p99_ms)
    if grid is None:
        return None
    at = next(r for r in rows if r["offered_rps"] == grid and _passes(r, slo_p99_ms))
    above = sorted((r for r in rows if r["offered_rps"] > grid), key=lambda r: r["offered_rps"])
    if not above or above[0]["errors"] or not math.isfinite(above[0]["p99_ms"]):
        return float(grid)
    nxt = above[0]
    rise = nxt["p99_ms"] - at["p99_ms"]
    if rise <= 0:
        return float(grid)
    share = (slo_p99_ms - at["p99_ms"]) / rise
    return round(grid + share * (nxt["offered_rps"] - grid), 2)


def saturation(rows: Sequence[dict]) -> float | None:
    """The most answers per second achieved at any offered rate (the server's throughput ceiling)."""
    return max((r["achieved_rps"] for r in rows), default=None)


def capacity_over_repeats(rows: Sequence[dict], slo_p99_ms: float) -> dict:
    """Each repeat of the sweep (rows' `repeat`, 0 if absent) on its own -> the median, lowest
    and highest of its grid capacity, interpolated capacity and saturation throughput."""
    repeats = sorted({r.get("repeat", 0) for r in rows})
    per = [[r for r in rows if r.get("repeat", 0) == k] for k in repeats]
    out = {"repeats": len(repeats)}
    for name, of in [("capacity_rps", lambda rs: capacity(rs, slo_p99_ms)),
                     ("interpolated_capacity_rps", lambda rs: interpolated_capacity(rs, slo_p99_ms)),
                     ("saturation_rps", saturation)]:
        values = [v for v in (of(rs) for rs in per) if v is not None]
        out[name] = ({"median": float(np.median(values)), "min": min(values), "max": max(values), "each": values}
                     if values else None)
    return out
