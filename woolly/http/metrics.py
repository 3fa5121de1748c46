"""Prometheus metrics: requests, latency, tokens, queue depth and slots in use (prometheus-client)."""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

ROUTES = ("/health", "/api/models", "/api/models/load", "/api/models/unload", "/api/generate", "/api/chat",
          "/api/tokenize", "/api/detokenize", "/api/embeddings", "/ws", "/v1/models", "/v1/completions",
          "/v1/chat/completions", "/v1/embeddings", "/metrics")


class Metrics:
    def __init__(self, pool):
        self.pool = pool   # woolly.engine.pool.ModelPool: gauges sum over its loaded models
        self.registry = CollectorRegistry()
        self.requests = Counter("woolly_requests", "HTTP requests", ["route", "status"], registry=self.registry)
        self.latency = Histogram("woolly_request_latency_seconds", "Request latency", ["route"],
                                 registry=self.registry,
                                 buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        tokens = Gauge("woolly_tokens_generated", "Tokens generated since start", registry=self.registry)
        tokens.set_function(lambda: self._sched_value("tokens_generated"))
        queue = Gauge("woolly_queue_depth", "Requests waiting for a slot", registry=self.registry)
        queue.set_function(lambda: self._sched_value("waiting"))
        slots = Gauge("woolly_slots_in_use", "Slots decoding now", registry=self.registry)
        slots.set_function(lambda: self._sched_value("active"))

    def _sched_value(self, name: str) -> float:
        return float(sum(getattr(e.load(), name) for _, e in self.pool.loaded()))

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        route = path if path in ROUTES else "other"   # bounded label values
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
