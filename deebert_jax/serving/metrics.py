"""The server's Prometheus metrics (`prometheus_client`, one registry per app)."""

from __future__ import annotations

import threading
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import Metric

CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServingMetrics:
    """Requests by status, request latency, queue depth, rows per layer step, exit layers and the
    layer saving (1 - mean exit layer / L over the rows answered). Safe from any thread."""

    def __init__(self, num_layers: int, queue_depth: Callable[[], int]):
        self.num_layers = num_layers
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("deebert_requests", "predict requests by HTTP status", ["status"], registry=r)
        self.latency = Histogram("deebert_request_latency_seconds", "predict latency, body read to answer",
                                 buckets=LATENCY_BUCKETS, registry=r)
        Gauge("deebert_queue_depth", "rows accepted and not yet answered (waiting or running)",
              registry=r).set_function(queue_depth)
        self.rows_per_step = Histogram("deebert_rows_per_layer_step", "rows run by one layer step",
                                       buckets=ROWS_BUCKETS, registry=r)
        self.exit_layer = Histogram("deebert_exit_layer", "exit layer of each answered row (1-based)",
                                    buckets=tuple(range(1, num_layers + 1)), registry=r)
        Gauge("deebert_layer_saving", "1 - mean exit layer / layers, over the rows answered",
              registry=r).set_function(self.layer_saving)
        self._lock = threading.Lock()
        self._rows = 0
        self._layers = 0

    def watch_drift(self, snapshot: Callable[[], dict]) -> None:
        """The live check's figures (`drift.DriftCheck.snapshot`), read at each scrape."""
        for name, key, what in [
                ("deebert_shadow_rows", "shadow_rows", "shadow rows compared with the full model"),
                ("deebert_shadow_disagreement", "observed", "disagreement rate of the shadow rows at the threshold now served"),
                ("deebert_drift_lower_bound", "lower", "anytime-valid lower bound on that rate"),
                ("deebert_drift_upper_bound", "upper", "anytime-valid upper bound on that rate"),
                ("deebert_drift_budget", "budget", "the disagreement budget (a rate)"),
                ("deebert_drift_alarm", "alarm", "1 once the lower bound rose above the budget"),
                ("deebert_threshold", "threshold", "the exit threshold now served")]:
            Gauge(name, what, registry=self.registry).set_function(
                lambda key=key: float(snapshot()[key] or 0.0))

    def observe_step(self, rows: int) -> None:
        self.rows_per_step.observe(rows)

    def observe_exit(self, layer: int) -> None:
        self.exit_layer.observe(layer)
        with self._lock:
            self._rows += 1
            self._layers += layer

    def layer_saving(self) -> float:
        with self._lock:
            return 0.0 if not self._rows else 1.0 - self._layers / (self._rows * self.num_layers)

    def render(self) -> bytes:
        return generate_latest(self.registry)


# TEI's histogram buckets for every `*_duration` (router/src/prometheus.rs: 1.5e-5 s x 1.5^i, 35 of them)
TEI_DURATION_BUCKETS = tuple(1e-5 * 1.5 ** i for i in range(1, 36))
TEI_COUNTERS = {"te_request_count": ("requests received, by method (single, batch)", ("method",)),
                "te_request_success": ("requests answered, by method", ("method",)),
                "te_request_failure": ("requests refused or failed, by err (validation, batch_size, "
                                       "tokenization, overloaded, inference)", ("err",)),
                "te_predict_count": ("inputs received", ()), "te_predict_success": ("inputs answered", ())}


class _TEICounters:
    """TEI's counters as its exporter (metrics_exporter_prometheus) writes them: the sample is
    the family's own name (`te_request_count{method="single"} 3`), with no `_total`, which
    prometheus_client's Counter would add. Collected as untyped, typed counter in `render`."""

    def __init__(self):
        self._lock = threading.Lock()
        self._values: dict[tuple[str, tuple], float] = {}

    def inc(self, name: str, value: float = 1.0, **labels) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + value

    def collect(self):
        with self._lock:
            values = dict(self._values)
        for name, (doc, _) in TEI_COUNTERS.items():
            family = Metric(name, doc, "unknown")
            for (n, labels), value in sorted(values.items()):
                if n == name:
                    family.add_sample(name, dict(labels), value)
            yield family


class TEIMetrics:
    """Text Embeddings Inference's metric names (router and core), beside `ServingMetrics`' in the
    same registry: the counters above, `te_request_duration` and its tokenization / queue /
    inference parts (seconds; a batch: the mean over its inputs, as TEI), `te_request_input_length`
    (tokens), `te_queue_size` (rows waiting or running) and `te_batch_next_size` (rows per layer step)."""

    def __init__(self, serving: ServingMetrics, queue_depth: Callable[[], int], max_input_length: int):
        r = serving.registry
        self.counters = _TEICounters()
        r.register(self.counters)
        self.duration = {part: Histogram(f"te_request{part}_duration", f"request{part.replace('_', ' ')} duration",
                                         buckets=TEI_DURATION_BUCKETS, registry=r)
                         for part in ("", "_tokenization", "_queue", "_inference")}
        self.input_length = Histogram("te_request_input_length", "tokens per input",
                                      buckets=tuple(2.0 ** i for i in range(20) if 2 ** i <= max_input_length),
                                      registry=r)
        Gauge("te_queue_size", "rows accepted and not yet answered", registry=r).set_function(queue_depth)
        self.batch_size = Histogram("te_batch_next_size", "rows run by one layer step",
                                    buckets=tuple(2.0 ** i for i in range(13)), registry=r)


def render_tei(registry: CollectorRegistry) -> bytes:
    """`generate_latest`, TEI's counters typed `counter` under their own names."""
    text = generate_latest(registry).decode()
    for name in TEI_COUNTERS:
        text = text.replace(f"# TYPE {name} untyped\n", f"# TYPE {name} counter\n")
    return text.encode()
