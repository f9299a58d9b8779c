"""Prometheus metrics of the running daemon, served over HTTP at metrics.listen (/metrics).

What it exports (all names prefixed `filterd_`):
  messages_total{action}              messages by the policy's action (accept, tag, spam,
                                      quarantine, reject, discard, tempfail)
  dispositions_total{disposition}     what the front end did (accept, reject, tempfail, discard)
  symbol_hits_total{symbol}           messages on which each symbol fired
  failures_total{failure}             whole-scan failures (deadline, internal_error)
  scan_seconds{phase}                 histogram of time per pipeline phase (Outcome.timings:
                                      pre, main, classify, composite, total)
  message_score                       histogram of verdict scores
  message_bytes                       histogram of message sizes
  component_up{component}             1 healthy, 0 failing: the health checks (filterd.health)
                                      marked for metrics (clamd, dns, stores, reinject...),
                                      probed at most every metrics.health_interval seconds
  quarantine_messages / quarantine_bytes   what the quarantine spool holds
  started_timestamp_seconds, build info via filterd_info{version}

Fed from filterd.service.AFTER_SCAN_HOOKS: the hook only updates in-memory counters (cheap,
never raises into the scan path); health probes and the quarantine walk run when scraped, in
the HTTP server's thread, cached for metrics.health_interval seconds.

Trusts: scrapers on metrics.listen (no authentication; keep it on loopback).
Reads: metrics.listen, metrics.health_interval, metrics.health_timeout, quarantine.dir.
Emits: no symbols.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, Info,
                               disable_created_metrics)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from filterd import __version__

log = logging.getLogger("filterd.metrics")

# Buckets for per-phase times: a clean local scan takes milliseconds, a network phase up to
# the check timeouts, the whole message up to scan.deadline.
PHASE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                 30.0, 60.0)
# no negative bucket: prometheus_client then drops _sum; negative scores land in le="0"
SCORE_BUCKETS = (0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 15.0, 20.0, 50.0, 100.0)
SIZE_BUCKETS = (1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216)


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int


def parse_listen(value: str) -> Endpoint | None:
    """'HOST:PORT' -> Endpoint; '' -> None (disabled). Raises ValueError on anything else."""
    if not value:
        return None
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"metrics.listen: {value!r} is not HOST:PORT")
    return Endpoint(host, int(port))


class _CachedProbes(Collector):
    """Gauges computed when scraped: component health and quarantine size, cached."""

    def __init__(self, settings: Any, interval: float,
                 quarantine_size: Callable[[], tuple[int, int]]):
        self.settings = settings
        self.interval = interval
        self.quarantine_size = quarantine_size
        self._lock = threading.Lock()
        self._health: dict[str, bool | None] = {}
        self._health_at = -1e18
        self._quarantine: tuple[int, int] = (0, 0)
        self._quarantine_at = -1e18

    def _refresh(self) -> None:
        from filterd import health
        now = time.monotonic()
        if now - self._health_at >= self.interval:
            results = health.run_checks(self.settings, only_metrics=True)
            self._health = {r.name: r.ok for r in results}
            self._health_at = now
        if now - self._quarantine_at >= self.interval:
            try:
                self._quarantine = self.quarantine_size()
            except OSError as exc:
                log.warning("cannot measure the quarantine: %s", exc)
            self._quarantine_at = now

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            self._refresh()
            up = GaugeMetricFamily("filterd_component_up",
                                   "1 when the component's health check passes, 0 when it fails "
                                   "(components not configured are left out)",
                                   labels=["component"])
            for name, ok in sorted(self._health.items()):
                if ok is not None:
                    up.add_metric([name], 1.0 if ok else 0.0)
            yield up
            count, size = self._quarantine
            yield GaugeMetricFamily("filterd_quarantine_messages",
                                    "Messages held in the quarantine", value=count)
            yield GaugeMetricFamily("filterd_quarantine_bytes",
                                    "Bytes of messages held in the quarantine", value=size)

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())  # computed at scrape time; nothing to register up front


def spool_size(directory: Path) -> tuple[int, int]:
    """(messages, bytes) of the .eml files under a quarantine spool directory."""
    count = size = 0
    if not directory.is_dir():
        return 0, 0
    for path in directory.rglob("*.eml"):
        try:
            size += path.stat().st_size
        except FileNotFoundError:  # released or expired while we walked
            continue
        count += 1
    return count, size


def quarantine_size_of(settings: Any) -> Callable[[], tuple[int, int]]:
    """How to measure the quarantine: the store's own stats() when it has one, else the spool."""
    def measure() -> tuple[int, int]:
        try:
            from filterd.quarantine import open_store
            store = open_store(settings)
        except Exception:  # a broken store config shows in component_up, not here
            store = None
        stats = getattr(store, "stats", None)
        if callable(stats):
            result = stats()
            if isinstance(result, dict) and "messages" in result:
                return int(result["messages"]), int(result.get("bytes", 0))
        return spool_size(settings.quarantine_dir)
    return measure


class Metrics:
    """The daemon's metrics: a registry of its own, fed by `observe(outcome, disposition)`."""

    def __init__(self, settings: Any, registry: CollectorRegistry | None = None):
        self.settings = settings
        disable_created_metrics()  # no *_created series: they double the output for nothing
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.messages = Counter("filterd_messages", "Messages scanned, by the policy's action",
                                ["action"], registry=r)
        self.dispositions = Counter("filterd_dispositions",
                                    "Messages by what the front end did with them",
                                    ["disposition"], registry=r)
        self.symbols = Counter("filterd_symbol_hits", "Messages on which a symbol fired",
                               ["symbol"], registry=r)
        self.failures = Counter("filterd_failures", "Whole-scan failures (deadline, internal "
                                "error) that the failures table turned into an action",
                                ["failure"], registry=r)
        self.phase_seconds = Histogram("filterd_scan_seconds",
                                       "Seconds per pipeline phase (total = the whole scan)",
                                       ["phase"], buckets=PHASE_BUCKETS, registry=r)
        self.score = Histogram("filterd_message_score", "Verdict scores",
                               buckets=SCORE_BUCKETS, registry=r)
        self.size = Histogram("filterd_message_bytes", "Message sizes in bytes",
                              buckets=SIZE_BUCKETS, registry=r)
        Gauge("filterd_started_timestamp_seconds", "When the daemon started (Unix time)",
              registry=r).set(time.time())
        Info("filterd", "filterd build", registry=r).info({"version": __version__})
        self.probes = _CachedProbes(settings, settings.metrics.health_interval,
                                    quarantine_size_of(settings))
        r.register(self.probes)
        self._server: Any = None
        self._thread: threading.Thread | None = None
        # (id(metric), label value) -> labelled child; the metrics live as long as self
        self._children: dict[tuple[int, str], Any] = {}

    # --- feeding ---------------------------------------------------------------------------
    def observe(self, outcome: Any, disposition: Any) -> None:
        """AFTER_SCAN_HOOKS entry: count one message. Cheap; never touches the network."""
        verdict = outcome.verdict
        child = self._child
        child(self.messages, verdict.action.value).inc()
        child(self.dispositions, disposition.action.value).inc()
        for name in {s.name for s in verdict.symbols}:
            child(self.symbols, name).inc()
        if outcome.failure:
            child(self.failures, outcome.failure).inc()
        for phase, seconds in outcome.timings.items():
            if phase == "parse" and not seconds:
                continue  # the scanner records no separate parse time yet
            child(self.phase_seconds, phase).observe(seconds)
        self.score.observe(verdict.score)
        self.size.observe(outcome.view.size)

    def _child(self, metric: Any, label: str) -> Any:
        """metric.labels(label), remembered: labels() validates and locks on every call, and
        one message touches a dozen series."""
        key = (id(metric), label)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(label)
        return found

    # --- serving ---------------------------------------------------------------------------
    def serve(self, endpoint: Endpoint) -> tuple[str, int]:
        """Start the HTTP endpoint in a thread; returns the bound (host, port)."""
        from prometheus_client import start_http_server
        server, thread = start_http_server(endpoint.port, addr=endpoint.host,
                                           registry=self.registry)
        self._server, self._thread = server, thread
        host, port = server.server_address[:2]
        return host, port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def start(settings: Any) -> Metrics | None:
    """Called by the daemon: build the metrics, hook them into the scan path, serve them.

    Returns None when metrics.listen is ''. A port that cannot be bound is logged as an
    error and the daemon runs on without metrics: mail flow matters more than graphs.
    """
    from filterd.service import AFTER_SCAN_HOOKS
    endpoint = parse_listen(settings.metrics.listen)
    if endpoint is None:
        return None
    metrics = Metrics(settings)
    try:
        host, port = metrics.serve(endpoint)
    except OSError as exc:
        log.error("metrics endpoint %s not started: %s", settings.metrics.listen, exc)
        return None
    AFTER_SCAN_HOOKS.append(metrics.observe)
    log.info("metrics on http://%s:%d/metrics", host, port)
    return metrics


def stop(metrics: Metrics | None) -> None:
    from filterd.service import AFTER_SCAN_HOOKS
    if metrics is None:
        return
    if metrics.observe in AFTER_SCAN_HOOKS:
        AFTER_SCAN_HOOKS.remove(metrics.observe)
    metrics.stop()
