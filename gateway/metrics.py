"""Every Prometheus collector the gateway exports, declared in one place.

Labels are bounded: route, issuer and endpoint names come from the config; outcomes and reasons are fixed codes.
Never a path, a subject or a token.
"""

from __future__ import annotations

import asyncio
import logging
import os
from bisect import bisect_left
from collections.abc import Iterable
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

# The *_created series double every counter's output and no dashboard uses them.
disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus_client

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


def multiprocess() -> bool:
    """True in `--workers N` mode: values go to shared files and gauges cannot compute themselves at scrape."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


log = logging.getLogger(__name__)

# In --workers mode every worker writes what it counted to the shared files this often, and when it stops.
FLUSH_INTERVAL = 1.0


def exposition(metrics: Metrics) -> bytes:
    """What /metrics serves: this process's registry, or the sum of every worker's in multiprocess mode."""
    if multiprocess():
        from prometheus_client import multiprocess as mp

        metrics.flush()
        combined = CollectorRegistry()
        mp.MultiProcessCollector(combined)  # type: ignore[no-untyped-call]  # untyped in prometheus_client
        return generate_latest(combined)
    return generate_latest(metrics.registry)


class BatchedCounter:
    """A counter child incremented in a plain int and added to prometheus_client's value at flush.

    prometheus_client takes a lock per increment (and in multiprocess mode writes a shared file): ~0.6 µs, and a
    proxied request counts five or six things. This costs ~0.1 µs."""

    __slots__ = ("_child", "pending")

    def __init__(self, child: Any) -> None:
        self._child = child
        self.pending = 0

    def inc(self) -> None:
        self.pending += 1

    def flush(self) -> None:
        if self.pending:
            pending, self.pending = self.pending, 0
            self._child.inc(pending)


class BatchedHistogram:
    """A histogram child observed into plain per-bucket counts, added to prometheus_client's values at flush
    (an `observe` there costs ~1.2 µs: a lock per value and a Python loop over the buckets).

    Flushing writes the child's bucket and sum values directly: prometheus_client has no bulk observe. Its layout
    (`_upper_bounds`, `_buckets`, `_sum`, one value per bucket, not cumulative) is pinned by a test against
    `observe` itself, in both single- and multiprocess mode."""

    __slots__ = ("_child", "_bounds", "_counts", "_sum")

    def __init__(self, child: Any) -> None:
        self._child = child
        self._bounds: list[float] = list(child._upper_bounds)
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0

    def observe(self, seconds: float) -> None:
        # The first bucket whose upper bound is >= the value, as prometheus_client's `amount <= bound`.
        self._counts[bisect_left(self._bounds, seconds)] += 1
        self._sum += seconds

    def flush(self) -> None:
        counts = self._counts
        if not any(counts):
            return
        self._counts = [0] * len(counts)
        total, self._sum = self._sum, 0.0
        for bucket, count in zip(self._child._buckets, counts, strict=True):
            if count:
                bucket.inc(count)
        self._child._sum.inc(total)


_B = TypeVar("_B", BatchedCounter, BatchedHistogram)


class _FlushFirst(Collector):
    """Registered before every other collector: whatever reads the registry (an exposition, get_sample_value)
    sees the batched counts first."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        self._metrics.flush()
        return ()


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        # By the child's id: prometheus_client keeps every child for good, and a reload binds the same ones again.
        self._batched: dict[int, BatchedCounter | BatchedHistogram] = {}
        r = self.registry
        r.register(_FlushFirst(self))
        self.http_requests = Counter(
            "gateway_http_requests_total", "Requests answered, by route, method and status code.",
            ["route", "method", "code"], registry=r,
        )  # fmt: skip
        self.http_duration = Histogram(
            "gateway_http_request_duration_seconds", "Time from request received to response sent, by route.",
            ["route"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.auth_decisions = Counter(
            "gateway_auth_decisions_total", "Token decisions by route, outcome (allow|deny|error) and reason.",
            ["route", "outcome", "reason"], registry=r,
        )  # fmt: skip
        self.upstream_duration = Histogram(
            "gateway_upstream_request_duration_seconds", "Time for the upstream to answer with headers, by route.",
            ["route"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.jwks_refreshes = Counter(
            "gateway_jwks_refreshes_total", "JWKS fetches by issuer and outcome (success|failure).",
            ["issuer", "outcome"], registry=r,
        )  # fmt: skip
        self.jwks_keys = Gauge(
            "gateway_jwks_keys",
            "Usable signing keys currently held per issuer.",
            ["issuer"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.token_cache = Counter(
            "gateway_token_cache_requests_total", "Verified-token cache look-ups by result (hit|miss).",
            ["result"], registry=r,
        )  # fmt: skip
        self.config_reloads = Counter(
            "gateway_config_reloads_total", "Config reloads (SIGHUP) by outcome (success|failure).",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.introspection_requests = Counter(
            "gateway_introspection_requests_total",
            "Introspection calls by endpoint and outcome (active|inactive|error|timeout|breaker_open|invalid).",
            ["endpoint", "outcome"], registry=r,
        )  # fmt: skip
        self.introspection_cache = Counter(
            "gateway_introspection_cache_requests_total", "Introspection cache look-ups by result (hit|miss).",
            ["result"], registry=r,
        )  # fmt: skip
        self.introspection_duration = Histogram(
            "gateway_introspection_duration_seconds", "Time of one introspection call, by endpoint.",
            ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.introspection_breaker = Gauge(
            "gateway_introspection_breaker_open", "1 while the endpoint's circuit breaker is open, else 0.",
            ["endpoint"], registry=r, multiprocess_mode="livemax",
        )  # fmt: skip
        self.revocation_checks = Counter(
            "gateway_revocation_checks_total",
            "Revocation checks by result (ok|revoked|stale_closed|stale_open|no_jti).",
            ["result"], registry=r,
        )  # fmt: skip
        self.revoked_tokens = Gauge(
            "gateway_revoked_tokens",
            "Revoked token IDs held in this instance's revocation mirror.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.revocation_mirror_age = Gauge(
            "gateway_revocation_mirror_age_seconds",
            "Seconds since the revocation mirror was last confirmed current with the store.", registry=r,
            multiprocess_mode="livemax",
        )  # fmt: skip
        self.store_up = Gauge(
            "gateway_store_up", "1 while the store (Redis) is reachable, else 0.", registry=r,
            multiprocess_mode="livemin",
        )  # fmt: skip

    def counter(self, child: Any) -> BatchedCounter:
        """The batched view of a counter child (a `.labels(...)` result or a label-less counter)."""
        return self._bind(child, BatchedCounter)

    def histogram(self, child: Any) -> BatchedHistogram:
        """The batched view of a histogram child."""
        return self._bind(child, BatchedHistogram)

    def _bind(self, child: Any, kind: type[_B]) -> _B:
        batched = self._batched.get(id(child))
        if batched is None:
            batched = self._batched[id(child)] = kind(child)
        assert isinstance(batched, kind)  # noqa: S101 - one child is one kind of metric
        return batched

    def flush(self) -> None:
        """Hand every batched count to prometheus_client (in multiprocess mode: to the shared files)."""
        for batched in list(self._batched.values()):
            batched.flush()

    async def run_flusher(self, interval: float = FLUSH_INTERVAL) -> None:
        """In multiprocess mode another worker may answer the scrape: write this one's counts out regularly."""
        try:
            while True:
                await asyncio.sleep(interval)
                try:
                    self.flush()
                except Exception:  # e.g. OSError from the shared files: say so, and keep flushing
                    log.exception("writing metrics to the multiprocess directory failed")
        finally:
            self.flush()


# Methods outside this set are counted as "other": a client must not be able to mint label values.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"})


class RouteMetrics:
    """One route's metric children, bound on first use and batched: `labels()` on every request costs more than
    the count itself. Lazily, so no series appears before it has something to say (no "allow" for unmatched)."""

    def __init__(self, metrics: Metrics, route: str) -> None:
        self.route = route
        self._metrics = metrics
        self._requests: dict[tuple[str, int], BatchedCounter] = {}
        self._duration: BatchedHistogram | None = None
        self._upstream: BatchedHistogram | None = None
        self._allowed: BatchedCounter | None = None

    def answered(self, method: str, status: int, seconds: float) -> None:
        counter = self._requests.get((method, status))
        if counter is None:
            label = method if method in KNOWN_METHODS else "other"
            child = self._metrics.http_requests.labels(self.route, label, str(status))
            counter = self._requests[(method, status)] = self._metrics.counter(child)
        counter.inc()
        if self._duration is None:
            self._duration = self._metrics.histogram(self._metrics.http_duration.labels(self.route))
        self._duration.observe(seconds)

    def upstream_answered(self, seconds: float) -> None:
        if self._upstream is None:
            self._upstream = self._metrics.histogram(self._metrics.upstream_duration.labels(self.route))
        self._upstream.observe(seconds)

    def allowed(self) -> None:
        if self._allowed is None:
            self._allowed = self._metrics.counter(self._metrics.auth_decisions.labels(self.route, "allow", "ok"))
        self._allowed.inc()

    def denied(self, outcome: str, reason: str) -> None:
        self._metrics.auth_decisions.labels(self.route, outcome, reason).inc()
