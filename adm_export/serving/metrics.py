"""Prometheus metrics of the service (prometheus-client), one registry per app.

A registry per app, not the process-global one, so that several apps in one process (tests, a
Ray replica beside Ray's own metrics) never clash over metric names.
"""

from __future__ import annotations

import collections
import threading
import time

from adm_export.errors import require

# Request latency: a short clip on a GPU takes well under a second, a long one on a CPU minutes.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
CLIPS_WINDOW_S = 60.0


class ServingMetrics:
    """The service's counters, gauges and histograms, and the Prometheus text they render to.

    Names (all prefixed ``adm_serve_``): ``requests_total{status}``, ``request_latency_seconds``
    (clip requests answered 200, arrival to response), ``queue_wait_seconds``, ``queue_depth``
    (waiting for a batch), ``in_flight`` (being sampled), ``batch_size``, ``batch_seconds``,
    ``clips_total``, ``clips_per_second`` (over the last minute), ``cancelled_total{reason}``,
    ``ready``.
    """

    def __init__(self, max_batch: int = 8):
        prom = require("prometheus_client", "serve", "adm-export serve's /metrics")
        self._prom = prom
        self.registry = prom.CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = prom.Counter("adm_serve_requests", "Clip requests by HTTP status.", ["status"], registry=r)
        self.latency = prom.Histogram("adm_serve_request_latency_seconds",
                                      "Arrival to response of clip requests answered 200.",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = prom.Histogram("adm_serve_queue_wait_seconds", "Arrival to the start of its batch.",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = prom.Gauge("adm_serve_queue_depth", "Requests waiting for a batch.", registry=r)
        self.in_flight = prom.Gauge("adm_serve_in_flight", "Requests being sampled.", registry=r)
        self.batch_size = prom.Histogram("adm_serve_batch_size", "Requests per U-Net batch.",
                                         buckets=tuple(range(1, max(1, max_batch) + 1)), registry=r)
        self.batch_seconds = prom.Histogram("adm_serve_batch_seconds", "Sampling time of one batch.",
                                            buckets=LATENCY_BUCKETS, registry=r)
        self.clips = prom.Counter("adm_serve_clips", "Clips generated.", registry=r)
        self.cancelled = prom.Counter("adm_serve_cancelled", "Requests whose work was dropped.", ["reason"],
                                      registry=r)
        self.ready = prom.Gauge("adm_serve_ready", "1 when the engines are loaded and warmed, else 0.", registry=r)
        self.clips_per_second = prom.Gauge("adm_serve_clips_per_second", "Clips per second over the last minute.",
                                           registry=r)
        self.clips_per_second.set_function(self._clips_rate)
        self._lock = threading.Lock()
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._started = time.monotonic()

    def clips_done(self, n: int) -> None:
        """Count ``n`` finished clips (for ``clips_total`` and the one-minute rate)."""
        if n <= 0:
            return
        self.clips.inc(n)
        with self._lock:
            self._recent.append((time.monotonic(), n))

    def _clips_rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - CLIPS_WINDOW_S:
                self._recent.popleft()
            total = sum(n for _, n in self._recent)
        span = min(CLIPS_WINDOW_S, max(now - self._started, 1e-3))
        return total / span

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return self._prom.generate_latest(self.registry), self._prom.CONTENT_TYPE_LATEST
