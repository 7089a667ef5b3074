"""`gateway run --workers N`: N processes on one port, /metrics summed over them whichever answers, a killed worker
restarted, SIGHUP and SIGTERM reaching every worker. Real processes, a real Redis, a real upstream."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.redis_support import free_port
from tests.support import GatewayProcess, Upstream, gateway_process

WORKERS = 2


def _config(upstream: Upstream, redis_url: str, prefix: str, port: int, admin: int) -> str:
    return f"""
listen: {{host: 127.0.0.1, port: {port}}}
admin: {{host: 127.0.0.1, port: {admin}}}
store: {{redis_url: "{redis_url}", key_prefix: "{prefix}"}}
routes:
  - name: open
    match: {{path_prefix: /}}
    upstream: {{url: "{upstream.url}"}}
    auth: {{mode: none}}
"""


async def _get_on_new_connections(url: str, count: int) -> list[int]:
    """`count` requests, each on a connection of its own: SO_REUSEPORT spreads connections, not requests."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        statuses = []
        for _ in range(count):
            async with session.get(f"{url}/items") as resp:
                await resp.read()
                statuses.append(resp.status)
        return statuses


async def _answered(gw: GatewayProcess, scraper: aiohttp.ClientSession | None = None) -> float:
    """The total of answered requests on /metrics; on a new connection unless a (kept-alive) scraper is given."""
    if scraper is not None:
        return await gw.metric(scraper, "gateway_http_requests_total", route="open", method="GET", code="200")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        return await _answered(gw, session)


async def _until_answered(gw: GatewayProcess, scraper: aiohttp.ClientSession, expected: float) -> None:
    """Poll over one kept-alive connection, so one worker answers every scrape and the others' counts can only
    arrive by their own flush, every second (wait 10 s at most)."""
    deadline = time.monotonic() + 10.0
    while (seen := await _answered(gw, scraper)) != expected:
        assert seen < expected, f"/metrics counts {seen} requests, {expected} were sent"
        assert time.monotonic() < deadline, f"/metrics shows {seen} of {expected} requests after 10 s"
        await asyncio.sleep(0.1)


def _listening(entry: dict[str, Any]) -> bool:
    return entry.get("msg") == "gateway listening"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_workers_share_the_port_and_metrics_restart_and_get_every_signal(
    upstream: Upstream, tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    port, admin = free_port(), free_port()
    text = _config(upstream, redis_url, key_prefix, port, admin)
    metrics_dir = tmp_path / "metrics"  # given, so it outlives the supervisor (which removes a directory it made)
    metrics_dir.mkdir()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    scraper = aiohttp.ClientSession()  # one kept-alive connection to /metrics
    async with scraper, gateway_process(text, tmp_path, env=env, args=("--workers", str(WORKERS))) as gw:
        started = await gw.wait_for_logs(_listening, WORKERS)
        pids = {int(entry["pid"]) for entry in started}
        assert len(pids) == WORKERS and gw.pid not in pids
        assert {int(entry["proxy_port"]) for entry in started} == {port}
        # A second supervisor on the same ports would join them (SO_REUSEPORT) and split traffic and scrapes.
        second = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "gateway", "run", "--config", str(gw.config_path), "--workers", "2"],
            capture_output=True, text=True, timeout=60, env={**os.environ, **env},
        )  # fmt: skip
        assert second.returncode == 1 and f"127.0.0.1:{port} is in use" in second.stderr, second.stderr

        assert await _get_on_new_connections(gw.url, 40) == [200] * 40
        await _until_answered(gw, scraper, 40)
        for _ in range(6):  # whichever worker answers the scrape shows the sum over all of them
            assert await _answered(gw) == 40

        gw.signal(signal.SIGHUP)  # to the supervisor: every worker reloads
        reloaded = await gw.wait_for_logs(lambda e: e.get("msg") == "config reloaded", WORKERS)
        assert {int(entry["pid"]) for entry in reloaded} == pids

        victim = min(pids)
        os.kill(victim, signal.SIGKILL)
        exited = await gw.wait_for_log(lambda e: e.get("msg") == "worker exited; restarting")
        assert (exited["pid"], exited["code"]) == (victim, -signal.SIGKILL)
        replacement = int((await gw.wait_for_logs(_listening, WORKERS + 1))[-1]["pid"])
        assert replacement not in pids
        survivors = pids - {victim} | {replacement}
        assert await _get_on_new_connections(gw.url, 20) == [200] * 20
        await _until_answered(gw, scraper, 60)  # the killed worker's counts stay in the total

        # Counted after the last scrape: written out as each worker stops, if not by its timer before.
        assert await _get_on_new_connections(gw.url, 10) == [200] * 10
        gw.signal(signal.SIGTERM)
        assert await gw.wait_exit() == 0
        stopped = {int(entry["pid"]) for entry in gw.logs() if entry.get("msg") == "stopped"}
        assert stopped == survivors  # each drained and stopped; none was left behind
        assert not any(_alive(pid) for pid in survivors)
    assert _total_in(metrics_dir) == 70


def _total_in(directory: Path) -> float:
    """gateway_http_requests_total{route="open"} summed over the files the workers left behind."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, str(directory))  # type: ignore[no-untyped-call]
    value = registry.get_sample_value("gateway_http_requests_total", {"route": "open", "method": "GET", "code": "200"})
    return 0.0 if value is None else value


def test_the_default_worker_count_is_the_cpus_this_process_may_use(tmp_path: Path) -> None:
    """Affinity, less a cgroup v2 quota: os.cpu_count() is the host's, 16 workers in a pod limited to one CPU."""
    from gateway.workers import usable_cpus

    original = os.sched_getaffinity(0)
    affinity = len(original)
    cpu_max = tmp_path / "cpu.max"
    for quota, expected in (("max 100000", affinity), ("25000 100000", 1), ("150000 100000", min(affinity, 2))):
        cpu_max.write_text(quota + "\n")
        assert usable_cpus(str(cpu_max)) == expected, quota
    assert usable_cpus(str(tmp_path / "absent")) == affinity
    os.sched_setaffinity(0, {min(original)})
    try:
        assert usable_cpus(str(tmp_path / "absent")) == 1
    finally:
        os.sched_setaffinity(0, original)


def test_a_worker_that_ran_a_while_before_dying_starts_the_restart_backoff_over(tmp_path: Path) -> None:
    """The backoff is for crash loops: seven deaths spread over days made every later restart wait 10 s."""
    from gateway.workers import Supervisor

    class Exiting(Supervisor):
        """Workers that exit at once (a real process each), started `ran` seconds ago as far as the clock knows."""

        ran = 0.0

        def _spawn(self, slot: int, env: dict[str, str]) -> None:
            self.procs[slot] = subprocess.Popen([sys.executable, "-c", "pass"])
            self._spawned[slot] = time.monotonic() - self.ran

    supervisor = Exiting(str(tmp_path / "unused.yaml"), 1, 1.0)
    supervisor.metrics_dir = str(tmp_path)
    supervisor._restarts[0] = (6, 0.0)  # six quick deaths before
    supervisor._spawn(0, {})
    supervisor.procs[0].wait()
    supervisor._supervise({})
    assert supervisor._restarts[0][0] == 7, "one more quick death: the backoff grows"
    supervisor.procs[0].wait()
    supervisor._restarts[0] = (7, 0.0)
    supervisor.ran = 60.0
    supervisor._spawn(0, {})
    supervisor.procs[0].wait()
    supervisor._supervise({})
    assert supervisor._restarts[0][0] == 1, "a worker up for a minute was not crash-looping"


async def test_a_worker_is_not_restarted_from_a_config_file_that_does_not_load(
    upstream: Upstream, tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    """A bad edit the reload refused, then a worker's death: starting it from the file would only crash it again
    and again. It waits for a fix; the SIGHUP that follows the fix starts it."""
    port, admin = free_port(), free_port()
    async with gateway_process(
        _config(upstream, redis_url, key_prefix, port, admin), tmp_path, args=("--workers", "2")
    ) as gw:
        pids = {int(entry["pid"]) for entry in await gw.wait_for_logs(_listening, 2)}
        good = gw.config_path.read_text()
        gw.config_path.write_text(good + "bogus_field: 1\n")
        victim = min(pids)
        os.kill(victim, signal.SIGKILL)
        waiting = await gw.wait_for_log(lambda e: e.get("msg", "").startswith("worker not restarted"))
        assert "bogus_field" in waiting["error"]
        assert [e for e in gw.logs() if e.get("msg") == "gateway listening" and int(e["pid"]) not in pids] == []
        gw.config_path.write_text(good)
        gw.signal(signal.SIGHUP)
        replacement = await gw.wait_for_logs(_listening, 3)
        assert int(replacement[-1]["pid"]) not in pids
        assert await _get_on_new_connections(gw.url, 10) == [200] * 10
