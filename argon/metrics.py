"""Prometheus metrics for a manager or worker (``--metrics-port``; needs prometheus_client).

Figures are read from the server's own counters when Prometheus scrapes, so metrics
cost nothing on the task path except one latency observation per task. The endpoint
is served by gevent's WSGI server in the hub: no threads touch the server's state.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator
from typing import Any

import gevent.pywsgi

from argon.server import Server

try:
    from prometheus_client import CollectorRegistry, make_wsgi_app
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    HAVE_PROMETHEUS = True
except ImportError:  # optional dependency: only --metrics-port needs it
    HAVE_PROMETHEUS = False

#: Upper bounds (seconds) of the task latency histogram's buckets.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, math.inf)


class LatencyHistogram:
    """Counts of task latencies (arrival to reply) per bucket, plus their sum."""

    def __init__(self) -> None:
        self.counts = [0] * len(BUCKETS)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        """Record one task's latency."""
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds

    def cumulative(self) -> list[tuple[str, int]]:
        """``(upper bound, count of observations <= bound)`` pairs, as Prometheus wants."""
        rows, running = [], 0
        for bound, count in zip(BUCKETS, self.counts, strict=True):
            running += count
            rows.append(("+Inf" if math.isinf(bound) else repr(bound), running))
        return rows


class ServerCollector:
    """Turns a server's ``status()`` into Prometheus metric families at scrape time."""

    def __init__(self, server: Server, histogram: LatencyHistogram) -> None:
        self.server = server
        self.histogram = histogram

    def collect(self) -> Iterator[Any]:
        """Yield the metric families (called by prometheus_client on each scrape)."""
        status = self.server.status()
        role = status["role"]
        tasks = CounterMetricFamily("argon_tasks", "Tasks finished or refused, by outcome.", labels=["role", "outcome"])
        for outcome in ("completed", "failed", "rejected"):
            tasks.add_metric([role, outcome], status[outcome])
        yield tasks
        redelivered = CounterMetricFamily(
            "argon_redeliveries", "Tasks re-sent after their worker was lost.", labels=["role"]
        )
        redelivered.add_metric([role], status.get("redelivered", 0))
        yield redelivered
        for name, help_text, value in (
            ("argon_queue_depth", "Tasks waiting for a free process.", status["queued"]),
            ("argon_prefetched_tasks", "Tasks workers hold that have not started.", status.get("prefetched", 0)),
            ("argon_busy_processes", "Processes running a task.", status["busy"]),
            ("argon_capacity_processes", "Processes in all (a draining worker's: if busy).", status["capacity"]),
            ("argon_workers_connected", "Workers registered (a worker counts itself).", len(status["workers"])),
            ("argon_clients_connected", "Clients connected.", status["clients"]),
        ):
            gauge = GaugeMetricFamily(name, help_text, labels=["role"])
            gauge.add_metric([role], value)
            yield gauge
        latency = HistogramMetricFamily(
            "argon_task_latency_seconds", "Time from a task's arrival to its reply.", labels=["role"]
        )
        latency.add_metric([role], self.histogram.cumulative(), sum_value=self.histogram.total)
        yield latency


def serve_metrics(server: Server, host: str, port: int) -> gevent.pywsgi.WSGIServer:
    """Start serving ``/metrics`` for ``server`` and return the HTTP server (port 0: any).

    The server must record its latencies: build it with ``latency=LatencyHistogram()``.

    Raises:
        ImportError: prometheus_client is not installed.
        ValueError: The server records no latency histogram.
    """
    if not HAVE_PROMETHEUS:
        raise ImportError(
            "--metrics-port needs prometheus_client: pip install prometheus_client (or 'argon-tasks[metrics]')"
        )
    histogram = server.latency
    if not isinstance(histogram, LatencyHistogram):
        raise ValueError(f"{server.role} {server.name} was built without latency=LatencyHistogram()")
    registry = CollectorRegistry(auto_describe=True)
    registry.register(ServerCollector(server, histogram))  # type: ignore[arg-type]
    # Naming the host spares pywsgi a getfqdn(), which would start gevent's resolver threads.
    http = gevent.pywsgi.WSGIServer((host, port), make_wsgi_app(registry), log=None, environ={"SERVER_NAME": host})
    http.start()
    return http
