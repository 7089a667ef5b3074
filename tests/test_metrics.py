"""Batched metrics: what a route counts in plain numbers must read exactly as prometheus_client's own `inc` and
`observe` would have made it, in one process and in --workers (multiprocess) mode, where it is written out by
flushing."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.support import REPO_ROOT

# Values on bucket bounds (le is inclusive), between them, below the first and above the last (+Inf).
COMPARE = textwrap.dedent(
    """
    from prometheus_client import CollectorRegistry, generate_latest
    from gateway.metrics import Metrics, RouteMetrics, exposition, multiprocess

    VALUES = [0.0, 0.0001, 0.0005, 0.00050001, 0.001, 0.003, 0.25, 0.7, 30.0, 31.0, 1e9]
    metrics = Metrics()
    batched = RouteMetrics(metrics, "batched")
    for value in VALUES:
        batched.answered("GET", 200, value)
        batched.upstream_answered(value)
        batched.allowed()
    for value in VALUES:
        metrics.http_requests.labels("direct", "GET", "200").inc()
        metrics.http_duration.labels("direct").observe(value)
        metrics.upstream_duration.labels("direct").observe(value)
        metrics.auth_decisions.labels("direct", "allow", "ok").inc()
    text = exposition(metrics).decode()  # flushes: the registry's collection, or explicitly in multiprocess mode
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    direct = sorted(line.replace('"direct"', "ROUTE") for line in lines if '"direct"' in line)
    via_batch = sorted(line.replace('"batched"', "ROUTE") for line in lines if '"batched"' in line)
    assert direct and direct == via_batch, (direct, via_batch)
    assert any("_bucket" in line for line in direct)
    print("multiprocess" if multiprocess() else "single", len(direct))
    """
)


def _compare(env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-c", COMPARE], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_batched_counts_read_as_prometheus_clients_own(tmp_path: Path) -> None:
    out = _compare({"PATH": "/usr/bin:/bin"})
    assert out.startswith("single ")


def test_batched_counts_read_as_prometheus_clients_own_in_multiprocess_mode(tmp_path: Path) -> None:
    out = _compare({"PATH": "/usr/bin:/bin", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})
    assert out.startswith("multiprocess ")


def test_counts_since_the_last_flush_are_read_with_the_registry() -> None:
    from gateway.metrics import Metrics, RouteMetrics

    metrics = Metrics()
    route = RouteMetrics(metrics, "r")
    route.answered("GET", 200, 0.002)
    sample = metrics.registry.get_sample_value
    assert sample("gateway_http_requests_total", {"route": "r", "method": "GET", "code": "200"}) == 1
    route.answered("GET", 200, 0.002)
    route.answered("POST", 201, 0.002)
    assert sample("gateway_http_requests_total", {"route": "r", "method": "GET", "code": "200"}) == 2
    assert sample("gateway_http_request_duration_seconds_count", {"route": "r"}) == 3
    assert sample("gateway_http_request_duration_seconds_bucket", {"route": "r", "le": "0.001"}) == 0
    assert sample("gateway_http_request_duration_seconds_bucket", {"route": "r", "le": "0.0025"}) == 3
