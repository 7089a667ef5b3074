"""One measured run, the interleaved rounds, the fixed-rate latency run and the soak."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

from bench import openloop, wrk
from bench.report import MB, Run
from bench.servers import TargetError, TargetSkipped
from bench.system import (
    DRIVER_CORE,
    REPO,
    SERVER_CORE,
    CpuSnapshot,
    core_busy_seconds,
    core_idle_seconds,
    cpu_seconds,
    pinned,
    rss_bytes,
)
from bench.targets import Bench, Running, Target, launch


class RssSampler:
    """Peak RSS of a process tree, sampled twice a second from the driver core while load runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = rss_bytes(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            self.peak = max(self.peak, rss_bytes(self.pid))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes(self.pid))


def _url(running: Running) -> str:
    return f"http://127.0.0.1:{running.port}/"


def _warm_up(target: Target, bench: Bench, running: Running, seconds: float) -> None:
    if seconds > 0:
        wrk.run(_url(running), bench.scripts[target.warmup_tokens], seconds, bench.connections)


def measure(target: Target, bench: Bench, round_no: int, seconds: float, warmup: float) -> Run:
    """Start the target, warm it up, then one wrk run with CPU time and RSS taken around it."""
    with launch(target, bench) as running:
        pid = running.process.pid
        rss_idle = rss_bytes(pid)
        _warm_up(target, bench, running, warmup)
        with RssSampler(pid) as sampler:
            before = CpuSnapshot.take(pid, bench.upstream_pid)
            result = wrk.run(_url(running), bench.scripts[target.tokens], seconds, bench.connections)
            after = CpuSnapshot.take(pid, bench.upstream_pid)
        if running.process.popen.poll() is not None:
            raise TargetError(f"exited during the run:\n{running.process.log_tail()}")
    # Warm sets wrap by design; only for a cold set does a wrap mean repeated tokens.
    wraps = result.wraps if target.tokens.endswith("-cold") else 0
    return run_record(target.name, round_no, result, before, after, rss_idle, sampler.peak, wraps)


def run_record(
    name: str,
    round_no: int,
    result: wrk.WrkResult,
    before: CpuSnapshot,
    after: CpuSnapshot,
    rss_idle: int,
    rss_load: int,
    token_wraps: int = 0,
    cpu_used: float | None = None,
    cpu_together: float | None = None,
) -> Run:
    """One measured run. `cpu_used`: the server's CPU if not before→after of one server; `cpu_together`: what every
    server sharing core 0 used (side-by-side runs), so that only the rest counts as noise."""
    used = after.server - before.server if cpu_used is None else cpu_used
    # Whatever else ran on either core during the run, as a share of that core: noise.
    others = (after.server_core - before.server_core) - (used if cpu_together is None else cpu_together)
    others_driver = (after.driver_core - before.driver_core) - (after.driver - before.driver)
    return Run(
        target=name,
        round=round_no,
        requests=result.requests,
        seconds=result.seconds,
        rps=result.rps,
        p50_ms=result.p50_ms,
        p99_ms=result.p99_ms,
        cpu_us_per_request=used / result.requests * 1e6 if result.requests else 0.0,
        busy=used / result.seconds,
        others=max(0.0, others) / result.seconds,
        others_driver=max(0.0, others_driver) / result.seconds,
        rss_idle=rss_idle,
        rss_load=rss_load,
        non_2xx=result.non_2xx,
        socket_errors=result.socket_errors,
        token_wraps=token_wraps,
    )


def rounds(
    targets: list[Target], bench: Bench, count: int, seconds: float, warmup: float
) -> tuple[dict[str, list[Run]], dict[str, str]]:
    """Every target once per round; each round starts one further along, so no target is always first."""
    runs: dict[str, list[Run]] = {t.name: [] for t in targets}
    problems: dict[str, str] = {}
    for round_no in range(count):
        shift = round_no % len(targets)
        for target in targets[shift:] + targets[:shift]:
            if target.name in problems:
                continue
            print(f"bench: round {round_no + 1}/{count} {target.name} ...", end=" ", flush=True)
            try:
                run = measure(target, bench, round_no, seconds, warmup)
            except (TargetError, RuntimeError, OSError, subprocess.SubprocessError) as exc:
                kind = "SKIPPED" if isinstance(exc, TargetSkipped) else "FAILED"
                problems[target.name] = f"{kind}: {exc}"
                print(kind, flush=True)
                print(f"  {exc}".replace("\n", "\n  "), flush=True)
                continue
            runs[target.name].append(run)
            print(
                f"{run.rps:,.0f} req/s, p99 {run.p99_ms:.2f} ms, {run.cpu_us_per_request:.0f} µs CPU/req, "
                f"core 0 {run.busy:.0%} busy; others took {run.others:.0%} of core 0, {run.others_driver:.0%} of core 1",
                flush=True,
            )
    return {name: r for name, r in runs.items() if r}, problems


def head_to_head(first: Target, second: Target, bench: Bench, seconds: float, warmup: float) -> dict[str, float]:
    """Both targets on the server core at once, each under its own wrk on the driver core.

    While both are saturated the scheduler gives each about half the core, so each one's CPU time per request is
    taken in the same seconds, under the same slow spells of the VM: their ratio holds still where the ratio of
    two separate runs moves by tens of percent. Both start afresh (a cold target's tokens are unseen)."""
    with launch(first, bench) as a, launch(second, bench) as b:
        _warm_up(first, bench, a, warmup)
        _warm_up(second, bench, b, warmup)
        before = [cpu_seconds(a.process.pid), cpu_seconds(b.process.pid)]
        core_before, idle_before = core_busy_seconds(SERVER_CORE), core_idle_seconds(SERVER_CORE)
        with ThreadPoolExecutor(2) as pool:
            loads = [
                pool.submit(wrk.run, _url(running), bench.scripts[target.tokens], seconds, bench.connections)
                for target, running in ((first, a), (second, b))
            ]
            results = [load.result() for load in loads]
        after = [cpu_seconds(a.process.pid), cpu_seconds(b.process.pid)]
        core = core_busy_seconds(SERVER_CORE) - core_before
        idle = core_idle_seconds(SERVER_CORE) - idle_before
        for target, running in ((first, a), (second, b)):
            if running.process.popen.poll() is not None:
                raise TargetError(f"{target.name} exited during the run:\n{running.process.log_tail()}")
    for target, result in zip((first, second), results, strict=True):
        if (
            not result.requests
            or result.non_2xx
            or result.socket_errors
            or (target.tokens.endswith("-cold") and result.wraps)
        ):
            raise RuntimeError(
                f"{target.name}: {result.non_2xx} non-2xx, {result.socket_errors} socket errors, "
                f"{result.wraps} token wraps: not a valid run"
            )
    cpu = [(after[i] - before[i]) * 1e6 / results[i].requests for i in range(2)]
    share = [(after[i] - before[i]) / results[i].seconds for i in range(2)]
    seconds = max(result.seconds for result in results)
    return {
        # Whether the pair kept the server core busy (an idle core means one waited, not ran), and what else ran.
        "idle": idle / seconds,
        "others": max(0.0, core - sum(after[i] - before[i] for i in range(2))) / seconds,
        "first_rps": results[0].rps,
        "second_rps": results[1].rps,
        "first_cpu_us": cpu[0],
        "second_cpu_us": cpu[1],
        "first_share": share[0],
        "second_share": share[1],
    }


def _openloop(running: Running, bench: Bench, tokens: Path, rate: float, seconds: float) -> subprocess.Popen[str]:
    argv = openloop.argv(openloop.build(bench.workdir), running.port, rate, seconds, tokens)
    return subprocess.Popen(pinned(DRIVER_CORE, argv), cwd=REPO, stdout=subprocess.PIPE, text=True)


def _openloop_result(client: subprocess.Popen[str], seconds: float) -> dict[str, float]:
    try:
        out, _ = client.communicate(timeout=seconds + 60)
    except BaseException:
        client.kill()
        client.wait()
        raise
    if client.returncode != 0 or not out.strip():
        raise RuntimeError(f"open-loop client failed (exit {client.returncode})")
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


def fixed_rate(target: Target, bench: Bench, max_rps: float, seconds: float, warmup: float) -> dict[str, float]:
    """Latency with requests offered at half the target's measured maximum."""
    rate = max_rps / 2
    with launch(target, bench) as running:
        _warm_up(target, bench, running, warmup)
        before = CpuSnapshot.take(running.process.pid, bench.upstream_pid)
        client = _openloop(running, bench, bench.token_files[target.tokens], rate, seconds)
        result = _openloop_result(client, seconds)
        after = CpuSnapshot.take(running.process.pid, bench.upstream_pid)
    others = (after.server_core - before.server_core) - (after.server - before.server)
    others_driver = (after.driver_core - before.driver_core) - (after.driver - before.driver)
    return {
        **result,
        "max_rps": max_rps,
        "others": max(0.0, others) / seconds,
        "others_driver": max(0.0, others_driver) / seconds,
    }


def soak(target: Target, bench: Bench, seconds: float, probe: float) -> None:
    """Minutes of steady load at half the maximum, printing the RSS every minute."""
    with launch(target, bench) as running:
        pid = running.process.pid
        print(f"soak: {target.name} idle RSS {rss_bytes(pid) / MB:.1f} MB", flush=True)
        max_rps = wrk.run(_url(running), bench.scripts[target.tokens], probe, bench.connections).rps
        rate = max_rps / 2
        print(f"soak: max {max_rps:,.0f} req/s; {seconds / 60:.0f} min at {rate:,.0f} req/s", flush=True)
        cpu_before = cpu_seconds(pid)
        started = time.monotonic()
        client = _openloop(running, bench, bench.token_files[target.tokens], rate, seconds)
        minute = 1
        while client.poll() is None and minute * 60 <= seconds:
            time.sleep(max(0.0, started + minute * 60 - time.monotonic()))
            print(f"soak: minute {minute}: RSS {rss_bytes(pid) / MB:.1f} MB", flush=True)
            minute += 1
        result = _openloop_result(client, seconds)
        cpu_us = (cpu_seconds(pid) - cpu_before) / max(1.0, result["completed"]) * 1e6
    print(
        f"soak: done: {result['completed']:,.0f} requests, p50 {result['p50_ms']:.2f} ms, "
        f"p99 {result['p99_ms']:.2f} ms, lost {result['errors']:.0f}, non-2xx {result['non_2xx']:.0f}, "
        f"{cpu_us:.0f} µs CPU/req",
        flush=True,
    )
