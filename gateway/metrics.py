"""Every Prometheus collector the gateway exports, declared in one place.

Labels are bounded: route, issuer and endpoint names come from the config; outcomes and reasons are fixed codes.
Never a path, a subject or a token.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

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


def exposition(registry: CollectorRegistry) -> bytes:
    """What /metrics serves: this process's registry, or the sum of every worker's in multiprocess mode."""
    if multiprocess():
        from prometheus_client import multiprocess as mp

        combined = CollectorRegistry()
        mp.MultiProcessCollector(combined)  # type: ignore[no-untyped-call]  # untyped in prometheus_client
        return generate_latest(combined)
    return generate_latest(registry)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
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


# Methods outside this set are counted as "other": a client must not be able to mint label values.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"})


class RouteMetrics:
    """One route's metric children, bound on first use and cached: `labels()` on every request costs more than
    the count itself. Lazily, so no series appears before it has something to say (no "allow" for unmatched)."""

    def __init__(self, metrics: Metrics, route: str) -> None:
        self.route = route
        self._metrics = metrics
        self._requests: dict[tuple[str, int], Any] = {}
        self._duration: Any = None
        self._upstream: Any = None
        self._allowed: Any = None

    def answered(self, method: str, status: int, seconds: float) -> None:
        child = self._requests.get((method, status))
        if child is None:
            label = method if method in KNOWN_METHODS else "other"
            child = self._requests[(method, status)] = self._metrics.http_requests.labels(
                self.route, label, str(status)
            )
        child.inc()
        if self._duration is None:
            self._duration = self._metrics.http_duration.labels(self.route)
        self._duration.observe(seconds)

    def upstream_answered(self, seconds: float) -> None:
        if self._upstream is None:
            self._upstream = self._metrics.upstream_duration.labels(self.route)
        self._upstream.observe(seconds)

    def allowed(self) -> None:
        if self._allowed is None:
            self._allowed = self._metrics.auth_decisions.labels(self.route, "allow", "ok")
        self._allowed.inc()

    def denied(self, outcome: str, reason: str) -> None:
        self._metrics.auth_decisions.labels(self.route, outcome, reason).inc()
