"""Issue 3: how fast a revocation reaches every gateway, what the check costs per request, and its memory.

    python -m bench.propagation            # 400 trials, 6 rounds × 10 s, 3 memory pairs (about 8 minutes)
    python -m bench.propagation --quick    # 100 trials, 4 rounds × 3 s, 1 memory pair (about 3 minutes)
    python -m bench.propagation --only propagation --resync-interval 1h

1. Propagation: 4 separate gateway processes (`--workers 1` each, own ports, all on core 0) share one Redis
   whose `revoked:jti` holds 100,000 entries. Per trial a fresh long-lived RS256 token is accepted by all 4,
   revoked through gateway #1's admin API, then polled back-to-back on all 4 at once (one keep-alive connection
   each, from core 1) until each answers 401. Propagation = from the admin POST returning to the arrival of the
   last of the 4 first-401s: an upper bound, within one prober round trip (printed as the resolution). Every
   other trial polls already while the POST is under way, which brackets when the revocation really landed.
2. Throughput: the same route with `revocation: always` and `revocation: never`, 100,000 entries loaded either
   way, wrk on core 1 and the gateway on core 0 as in `python -m bench`: one after the other, and side by side
   (both on core 0 at once, so that drift of the machine hits both alike); plus the check itself, timed in-process.
3. Memory: RSS of a gateway whose mirror holds the 100,000 entries minus one with an empty set.

The helpers (harness, gateway start, measured wrk runs, /metrics) are shared with bench/introspection.py.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import secrets
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import yaml
from cryptography.hazmat.primitives import serialization

from bench import wrk
from bench.gateway_server import REDIS_URL, _wait_ready, gateway_command, gateway_config, revoked_set
from bench.report import MB, Run, _grid
from bench.runner import RssSampler, run_record
from bench.servers import UPSTREAM_BODY, TargetError, start_nginx
from bench.system import (
    DRIVER_CORE,
    SERVER_CORE,
    CpuSnapshot,
    Process,
    can_pin,
    ensure_packages,
    free_port,
    pinned,
    rss_bytes,
    spawn,
)
from bench.targets import _get
from bench.tokens import TOKEN_TTL, WARM_TOKENS, KeyPair, claims, ensure_keys, first_token, sign, token_file

GATEWAYS = 4
ADMIN_TOKEN = "bench-admin-" + secrets.token_hex(8)
POLL_DEADLINE = 2.0  # a gateway that still accepts a revoked token after this long fails the trial
RUN_BUDGET = 900.0  # seconds: the propagation trials stop here whatever --trials says


# --- Shared with bench/introspection.py -------------------------------------------------------------------------


@dataclass
class Harness:
    """What every measurement here shares: scratch directory, keys, the upstream nginx on the driver core."""

    workdir: Path
    keys: dict[str, KeyPair]
    upstream: Process
    upstream_port: int
    scripts: dict[Path, Path] = field(default_factory=dict)

    def script(self, tokens: Path) -> Path:
        """The wrk script that cycles the tokens of `tokens`."""
        if tokens not in self.scripts:
            self.scripts[tokens] = wrk.write_script(self.workdir, tokens)
        return self.scripts[tokens]


@contextmanager
def harness() -> Iterator[Harness]:
    """Pin this process to the driver core, start the upstream nginx there, stop everything on the way out."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind like Ctrl-C so every server is stopped
    ensure_packages()
    if can_pin():
        os.sched_setaffinity(0, {DRIVER_CORE})
    else:
        print("bench: WARNING: cores 0 and 1 are not both available; running unpinned", flush=True)
    keys = ensure_keys()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        workdir = Path(tmp)
        upstream, upstream_port = start_nginx(workdir, DRIVER_CORE)
        try:
            yield Harness(workdir, keys, upstream, upstream_port)
        finally:
            upstream.stop()


@dataclass
class Gateway:
    process: Process
    port: int
    admin: int
    ready: float = 0.0  # perf_counter() when /readyz first said ready: the mirror's first full sync is done

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def stop(self) -> None:
        self.process.stop()


def base_config(h: Harness) -> dict[str, Any]:
    """The suite's own gateway config (bench/gateway_server.py: issuer `bench`, route `bench` on /), as a dict."""
    config: dict[str, Any] = yaml.safe_load(gateway_config(0, 0, h.upstream_port, h.keys, "jwt", None, True))
    return config


def start_gateway(
    h: Harness, config: dict[str, Any], core: int = SERVER_CORE, env: dict[str, str] | None = None
) -> Gateway:
    """`gateway run --config FILE --workers 1` on `core`, on fresh ports; returns once /readyz says ready."""
    port, admin = free_port(), free_port()
    config = {**config, "listen": {"host": "127.0.0.1", "port": port}, "admin": {"host": "127.0.0.1", "port": admin}}
    path = h.workdir / f"gateway-{port}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    argv = [*gateway_command(), "run", "--config", str(path), "--workers", "1"]
    process = spawn("gateway", pinned(core, argv), h.workdir / f"gateway-{port}.log", env={**os.environ, **(env or {})})
    try:
        _wait_ready(process, admin)
        if can_pin() and os.sched_getaffinity(process.pid) != {core}:
            raise TargetError(f"gateway not pinned to core {core}: {sorted(os.sched_getaffinity(process.pid))}")
    except BaseException:
        process.stop()
        raise
    return Gateway(process, port, admin, time.perf_counter())


def expect(port: int, token: str | None, status: int, what: str) -> None:
    got, raw = _get(port, token)
    body = raw.decode(errors="replace")
    if got != status or (status == 200 and body != UPSTREAM_BODY):
        raise TargetError(f"{what}: expected {status}, got {got} {body[:160]!r}")


def metrics(admin: int) -> dict[str, float]:
    """The admin listener's /metrics as {'name{labels}': value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def metric_sum(values: dict[str, float], name: str, where: str = "") -> float:
    """Sum of every series of `name` (optionally only those whose labels contain `where`)."""
    return sum(v for k, v in values.items() if (k == name or k.startswith(name + "{")) and where in k)


def measure(gateway: Gateway, name: str, round_no: int, tokens: Path, h: Harness, seconds: float, warmup: float) -> Run:
    """As bench/runner.py measure(): warm up, then one wrk run with CPU time and RSS taken around it."""
    pid = gateway.process.pid
    rss_idle = rss_bytes(pid)
    script = h.script(tokens)
    if warmup > 0:
        wrk.run(gateway.url, script, warmup)
    with RssSampler(pid) as sampler:
        before = CpuSnapshot.take(pid, h.upstream.pid)
        result = wrk.run(gateway.url, script, seconds)
        after = CpuSnapshot.take(pid, h.upstream.pid)
    if gateway.process.popen.poll() is not None:
        raise TargetError(f"gateway exited during the run:\n{gateway.process.log_tail()}")
    return run_record(name, round_no, result, before, after, rss_idle, sampler.peak)


def print_run(run: Run) -> None:
    bad = f", {run.non_2xx} non-2xx + {run.socket_errors} socket errors!" if run.non_2xx + run.socket_errors else ""
    print(
        f"{run.rps:,.0f} req/s, {run.cpu_us_per_request:.0f} µs CPU/req, core 0 {run.busy:.0%} busy; "
        f"others took {run.others:.0%} of core 0, {run.others_driver:.0%} of core 1{bad}",
        flush=True,
    )


def compare(runs: dict[str, list[Run]], subject: str, baseline: str) -> str:
    """Per-round pairs (the two runs of a round are neighbours in time) and the medians, as a table."""
    rows = []
    pairs = list(zip(runs[subject], runs[baseline], strict=True))
    for a, b in pairs:
        flags = []
        if a.non_2xx + a.socket_errors + b.non_2xx + b.socket_errors:
            flags.append("errors/non-2xx!")
        if max(a.others, a.others_driver, b.others, b.others_driver) > 0.05:
            flags.append("cores shared")
        rows.append(
            [
                f"round {a.round + 1}",
                f"{a.rps:,.0f}",
                f"{b.rps:,.0f}",
                f"{a.rps / b.rps:.3f}",
                f"{a.cpu_us_per_request:.1f}",
                f"{b.cpu_us_per_request:.1f}",
                f"{a.cpu_us_per_request / b.cpu_us_per_request:.3f}",
                "  ".join(flags),
            ]
        )

    def med(values: Sequence[float]) -> float:
        return statistics.median(values)

    rps_a, rps_b = med([a.rps for a, _ in pairs]), med([b.rps for _, b in pairs])
    cpu_a, cpu_b = med([a.cpu_us_per_request for a, _ in pairs]), med([b.cpu_us_per_request for _, b in pairs])
    rows.append(["median", f"{rps_a:,.0f}", f"{rps_b:,.0f}", f"{rps_a / rps_b:.3f}"])
    rows[-1] += [f"{cpu_a:.1f}", f"{cpu_b:.1f}", f"{cpu_a / cpu_b:.3f}", "ratio of medians"]
    paired_rps = med([a.rps / b.rps for a, b in pairs])
    paired_cpu = med([a.cpu_us_per_request / b.cpu_us_per_request for a, b in pairs])
    rows.append(
        ["median of pairs", "", "", f"{paired_rps:.3f}", "", "", f"{paired_cpu:.3f}", "median of per-round ratios"]
    )
    headers = ["", f"{subject} req/s", f"{baseline} req/s", "ratio"]
    headers += [f"{subject} CPU µs/req", f"{baseline} CPU µs/req", "ratio", ""]
    return "\n".join(_grid(headers, rows))


@dataclass(frozen=True)
class Ratios:
    """Per-round ratios subject ÷ baseline. Even rounds (0, 2, ...) ran or started the subject first, odd rounds
    the baseline: the median of each half, and their geometric mean, in which a bias of either order cancels."""

    rps: list[float]
    cpu: list[float]

    @classmethod
    def of(cls, data: dict[str, list[Run]], subject: str, baseline: str) -> Ratios:
        pairs = list(zip(data[subject], data[baseline], strict=True))
        return cls([a.rps / b.rps for a, b in pairs], [a.cpu_us_per_request / b.cpu_us_per_request for a, b in pairs])

    @staticmethod
    def balanced(values: list[float]) -> tuple[float, float | None, float]:
        first, second = statistics.median(values[0::2]), values[1::2]
        if not second:
            return first, None, first
        later = statistics.median(second)
        return first, later, math.sqrt(first * later)

    def describe(self, subject: str, baseline: str, as_cost: bool) -> str:
        """One line: medians of the per-round ratios, split by order, as ratios or (as_cost) as extra cost."""

        def show(value: float, cpu: bool) -> str:
            if not as_cost:
                return f"{value:.3f}"
            return f"{value - 1:+.1%}" if cpu else f"{1 - value:+.1%}"

        parts = []
        for label, values, cpu in (("req/s", self.rps, False), ("CPU µs/req", self.cpu, True)):
            first, later, mean = self.balanced(values)
            split = (
                "" if later is None else f" ({subject} first {show(first, cpu)}, {baseline} first {show(later, cpu)})"
            )
            parts.append(f"{label} {show(mean, cpu)}{split}")
        return "; ".join(parts)


def percentiles(values: Sequence[float], points: Sequence[float] = (50, 90, 99)) -> list[float]:
    """Nearest-rank percentiles, and the maximum last."""
    ordered = sorted(values)
    picked = [ordered[min(len(ordered) - 1, max(0, int(-(-p * len(ordered) // 100)) - 1))] for p in points]
    return [*picked, ordered[-1]]


def run_async(main: Callable[[], Any]) -> Any:
    """Run the coroutine `main()` makes to completion, on uvloop as the gateway does when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())
    return uvloop.run(main())


@contextmanager
def empty_prefix() -> Iterator[str]:
    """A fresh Redis key prefix with nothing under it, deleted afterwards."""
    import redis

    prefix = f"gwbench-{secrets.token_hex(4)}:"
    client = redis.Redis.from_url(REDIS_URL)
    try:
        yield prefix
    finally:
        for stale in client.scan_iter(match=f"{prefix}*", count=1000):
            client.delete(stale)
        client.close()


# --- 1. Propagation --------------------------------------------------------------------------------------------


def store_config(h: Harness, prefix: str, revocation: str) -> dict[str, Any]:
    config = base_config(h)
    config["store"] = {"redis_url": REDIS_URL, "key_prefix": prefix}
    config["routes"][0]["auth"]["revocation"] = revocation
    return config


@dataclass
class Trial:
    """One revocation; every time is a perf_counter() reading in seconds."""

    during: bool  # polling started before the admin POST was sent (else: once it had returned)
    sent: float  # admin POST sent
    returned: float  # admin POST answered
    refused: list[float]  # per gateway: arrival of its first 401 (inf: none within POLL_DEADLINE)
    last_ok: list[float]  # per gateway: send time of its last 200 (-inf: none); the revocation landed after
    polls: list[int]  # per gateway: requests sent
    rtts: list[float]  # every poll's round trip


async def _poll(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], rtts: list[float]
) -> tuple[float, float, int]:
    """GET back-to-back until a 401: (its arrival, the last 200's send time, requests sent)."""
    last_ok, count = float("-inf"), 0
    deadline = time.perf_counter() + POLL_DEADLINE
    while True:
        sent = time.perf_counter()
        async with session.get(url, headers=headers) as response:
            await response.read()
            status = response.status
        arrived = time.perf_counter()
        count += 1
        rtts.append(arrived - sent)
        if status == 401:
            return arrived, last_ok, count
        if status != 200:
            raise TargetError(f"{url}: a poll got {status}")
        last_ok = sent
        if arrived > deadline:
            return float("inf"), last_ok, count


async def _trials(gateways: list[Gateway], tokens: list[tuple[str, str, int]], budget: float) -> list[Trial]:
    """Per token: all accept it; revoke it through gateway #1; poll all until each refuses it.

    Trials alternate between polling once the POST has returned (the issue's method) and polling already
    while it is under way (which shows how much of the first kind's figure is the prober's own round trip).
    """
    sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1), auto_decompress=False) for _ in gateways]
    admin = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
    admin_url = f"http://127.0.0.1:{gateways[0].admin}/admin/revocations"
    admin_headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    trials: list[Trial] = []
    stop_at = time.monotonic() + budget
    try:
        for number, (token, jti, exp) in enumerate(tokens):
            if time.monotonic() > stop_at:
                print(f"propagation: time budget of {budget:.0f}s used up after {number} trials", flush=True)
                break
            headers = {"Authorization": f"Bearer {token}"}
            for session, gateway in zip(sessions, gateways, strict=True):
                async with session.get(gateway.url, headers=headers) as response:
                    if response.status != 200:
                        raise TargetError(f"trial {number}: fresh token refused with {response.status}")
                    await response.read()
            # A random pause, so the POST lands at a random phase of the mirrors' heartbeats and resyncs,
            # and the trials spread over more than one 30 s resync of each mirror.
            await asyncio.sleep(0.05 + secrets.randbelow(200) / 1000)
            rtts: list[float] = []
            during = number % 2 == 1

            def polls(rtts: list[float] = rtts, headers: dict[str, str] = headers) -> asyncio.Future[Any]:
                return asyncio.gather(
                    *(_poll(s, g.url, headers, rtts) for s, g in zip(sessions, gateways, strict=True))
                )

            running = polls() if during else None
            sent = time.perf_counter()
            async with admin.post(admin_url, json={"jti": jti, "expires_at": exp}, headers=admin_headers) as response:
                await response.read()
                if response.status != 201:
                    raise TargetError(f"admin POST answered {response.status}")
            returned = time.perf_counter()
            results = await (running if running is not None else polls())
            trials.append(
                Trial(
                    during=during,
                    sent=sent,
                    returned=returned,
                    refused=[r[0] for r in results],
                    last_ok=[r[1] for r in results],
                    polls=[r[2] for r in results],
                    rtts=rtts,
                )
            )
    finally:
        for session in [*sessions, admin]:
            await session.close()
    return trials


def _fresh_tokens(pair: KeyPair, count: int) -> list[tuple[str, str, int]]:
    """`count` long-lived (exp - iat = 2 h > long_lived_after 1 h) RS256 tokens, each with a new jti."""
    key = serialization.load_pem_private_key(pair.private_pem.read_bytes(), password=None)
    now, salt = int(time.time()), secrets.token_hex(4)
    made = []
    for i in range(count):
        payload = claims(f"prop-user-{i}", f"prop-{salt}-{i}", now)
        token = jwt.encode(payload, key, algorithm=pair.alg, headers={"kid": pair.kid})  # type: ignore[arg-type]
        made.append((token, f"prop-{salt}-{i}", now + TOKEN_TTL))
    return made


def propagation(h: Harness, revoked: int, trials: int, resync: str | None) -> None:
    print(f"propagation: {revoked:,} revoked jtis into Redis, {GATEWAYS} gateways on core {SERVER_CORE}", flush=True)
    probe = sign(h.keys["RS256"], claims("user-revoked", "probe-revoked", int(time.time())))
    tokens = _fresh_tokens(h.keys["RS256"], trials)
    with ExitStack() as stack:
        prefix = stack.enter_context(revoked_set(revoked, "probe-revoked"))
        config = store_config(h, prefix, "long_lived")
        if resync:
            config["store"]["resync_interval"] = resync
        gateways = []
        for _ in range(GATEWAYS):
            gateway = start_gateway(h, config, env={"GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN})
            stack.callback(gateway.stop)
            gateways.append(gateway)
        for number, gateway in enumerate(gateways, 1):
            expect(gateway.port, tokens[0][0], 200, f"gateway #{number}, valid token")
            expect(gateway.port, probe, 401, f"gateway #{number}, pre-loaded revoked token")
            held = metric_sum(metrics(gateway.admin), "gateway_revoked_tokens")
            if held != revoked + 1:
                raise TargetError(f"gateway #{number}: mirror holds {held:.0f} entries, not {revoked + 1}")
        print(
            f"propagation: {GATEWAYS} gateways ready, each mirroring {revoked + 1:,} entries; {trials} trials",
            flush=True,
        )
        started = time.monotonic()
        done: list[Trial] = run_async(lambda: _trials(gateways, tokens, RUN_BUDGET))
        elapsed = time.monotonic() - started
        mirrored = [metric_sum(metrics(g.admin), "gateway_revoked_tokens") for g in gateways]
        logs = [g.process.log_tail(3) for g in gateways]
    print_propagation(done, revoked, elapsed, mirrored, logs)
    print_slow(done, [g.ready for g in gateways], resync or "30s (default)")


def _ms(values: Sequence[float]) -> list[str]:
    return [f"{v * 1000:.2f}" for v in percentiles(values)] + [f"{len(values):,}"]


def print_propagation(
    trials: list[Trial], revoked: int, elapsed: float, mirrored: list[float], logs: list[str]
) -> None:
    failed = [t for t in trials if max(t.refused) == float("inf")]
    after = [t for t in trials if not t.during and t not in failed]
    during = [t for t in trials if t.during and t not in failed]
    print()
    print(
        f"Revocation propagation — {GATEWAYS} gateway processes (--workers 1 each, core {SERVER_CORE}) on one Redis, "
        f"{revoked:,} revoked jtis; {len(trials)} trials in {elapsed:.0f} s; prober on core {DRIVER_CORE}"
    )
    headers = ["ms", "p50", "p90", "p99", "max", "n"]
    if after:
        print()
        print("A. Polling starts when the admin POST (to gateway #1) has returned; time until the first 401 arrives")
        rows = [
            [f"last of {GATEWAYS} = PROPAGATION", *_ms([max(t.refused) - t.returned for t in after])],
            [f"first of {GATEWAYS}", *_ms([min(t.refused) - t.returned for t in after])],
            ["gateway #1 (took the POST)", *_ms([t.refused[0] - t.returned for t in after])],
            ["admin POST round trip", *_ms([t.returned - t.sent for t in after])],
            ["prober round trip = resolution", *_ms([x for t in after for x in t.rtts])],
        ]
        print("\n".join(_grid(headers, rows)))
        last = [max(t.refused) - t.returned for t in after]
        p99 = percentiles(last)[2]
        first_poll = sum(1 for t in after if max(t.polls) == 1)
        verdict = "meets" if p99 < 0.050 and not failed else "MISSES"
        print(
            f"target p99 < 50 ms: {verdict} (p99 {p99 * 1000:.2f} ms; {sum(v > 0.050 for v in last)} of {len(after)} "
            f"trials over 50 ms). In {first_poll} of {len(after)} trials every gateway refused on its very first "
            f"poll: there the figure is one prober round trip, an upper bound."
        )
    if during:
        print()
        print(
            "B. Polling already runs while the admin POST is under way (every gateway polled back-to-back throughout);"
        )
        print("   times from when the POST was SENT; the revocation landed between the last 200 sent and the first 401")
        rows = [
            [f"last of {GATEWAYS}: first 401 arrived", *_ms([max(t.refused) - t.sent for t in during])],
            [f"last of {GATEWAYS}: last 200 sent", *_ms([max(t.last_ok) - t.sent for t in during])],
            ["admin POST round trip (under polling)", *_ms([t.returned - t.sent for t in during])],
            [f"last of {GATEWAYS}: 401 minus POST returned", *_ms([max(t.refused) - t.returned for t in during])],
            ["prober round trip = resolution", *_ms([x for t in during for x in t.rtts])],
        ]
        print("\n".join(_grid(headers, rows)))
        early = sum(1 for t in during if max(t.refused) < t.returned)
        print(f"in {early} of {len(during)} trials all {GATEWAYS} gateways refused before the admin POST had returned")
    if failed:
        print(f"{len(failed)} trial(s): a gateway still accepted the revoked token after {POLL_DEADLINE:.0f} s!")
    print(f"mirror sizes at the end: {', '.join(f'{m:,.0f}' for m in mirrored)} (pre-loaded + probe + one per trial)")
    for log in logs:
        if "error" in log.lower() or "traceback" in log.lower():
            print(f"gateway log tail:\n{log}")


def print_slow(trials: list[Trial], ready: list[float], resync: str) -> None:
    """Which gateway was last in each trial over 50 ms, and how long after its first full sync that was."""
    slow = [t for t in trials if max(t.refused) - (t.sent if t.during else t.returned) > 0.050]
    if not slow:
        return
    print(f"trials over 50 ms ({len(slow)}), with the last gateway and the time since its first full sync:")
    for t in slow:
        last = max(range(GATEWAYS), key=lambda i: t.refused[i])
        took = max(t.refused) - (t.sent if t.during else t.returned)
        print(
            f"  {'B' if t.during else 'A'} {took * 1000:7.1f} ms  gateway #{last + 1}, "
            f"{t.sent - ready[last]:6.1f} s after its first sync"
        )
    print(f"  (resync_interval {resync}: each mirror re-reads the whole set that often, in its notice-reading task)")


# --- 2. Throughput cost ------------------------------------------------------------------------------------------


def _checked(h: Harness, prefix: str, policy: str, tokens: Path, probe: str) -> Gateway:
    gateway = start_gateway(h, store_config(h, prefix, policy))
    try:
        expect(gateway.port, first_token(tokens), 200, f"{policy}: valid token")
        expect(gateway.port, None, 401, f"{policy}: no token")
        # With `never`, the pre-loaded revoked token must pass: proof the check is really off.
        expect(gateway.port, probe, 401 if policy == "always" else 200, f"{policy}: revoked token")
    except BaseException:
        gateway.stop()
        raise
    return gateway


def side_by_side(
    gateways: dict[str, tuple[Gateway, Path]], round_no: int, h: Harness, seconds: float, warmup: float
) -> dict[str, Run]:
    """Gateways on core 0 at the same time, each under its own wrk and token file: machine drift hits all alike."""
    script = {name: h.script(tokens) for name, (_, tokens) in gateways.items()}
    names = list(gateways)

    def load(name: str, duration: float) -> wrk.WrkResult:
        return wrk.run(gateways[name][0].url, script[name], duration)

    with ThreadPoolExecutor(len(names)) as pool:
        if warmup > 0:
            list(pool.map(lambda n: load(n, warmup), names))
        before = {n: CpuSnapshot.take(gateways[n][0].process.pid, h.upstream.pid) for n in names}
        results = dict(zip(names, pool.map(lambda n: load(n, seconds), names), strict=True))
        after = {n: CpuSnapshot.take(gateways[n][0].process.pid, h.upstream.pid) for n in names}
    together = sum(after[n].server - before[n].server for n in names)
    runs = {}
    for n in names:
        # The core is shared on purpose: noise is what neither gateway nor the harness used there.
        runs[n] = run_record(
            n, round_no, results[n], before[n], after[n], 0, rss_bytes(gateways[n][0].process.pid),
            cpu_together=together,
        )  # fmt: skip
    return runs


def print_side(runs: dict[str, Run]) -> None:
    print(
        ", ".join(f"{n} {r.rps:,.0f} req/s {r.cpu_us_per_request:.0f} µs/req" for n, r in runs.items())
        + f"; others took {next(iter(runs.values())).others:.0%} of core 0",
        flush=True,
    )


def synced_mirror(prefix: str) -> tuple[Any, float, float]:
    """The gateway's own Mirror, fully synced from `prefix` in this process; best of 3 full syncs: wall s, CPU s."""
    from gateway.config import StoreSettings
    from gateway.metrics import Metrics
    from gateway.revocation import Mirror
    from gateway.store import RedisStore, connect_redis

    async def sync() -> tuple[Any, float, float]:
        store = RedisStore(connect_redis(StoreSettings(redis_url=REDIS_URL, key_prefix=prefix)), prefix)
        mirror = Mirror(store, Metrics(), 30.0, 5.0)
        wall, cpu = [], []
        try:
            for _ in range(3):
                started, cpu_started = time.perf_counter(), time.process_time()
                await mirror.full_sync()
                wall.append(time.perf_counter() - started)
                cpu.append(time.process_time() - cpu_started)
        finally:
            await store.close()
        return mirror, min(wall), min(cpu)

    result: tuple[Any, float, float] = run_async(sync)
    return result


def check_cost(prefix: str, loops: int = 200) -> tuple[float, float, float, float, int]:
    """µs per RevocationCheck.check() (always, never) against the gateway's own mirror synced from `prefix`, cycling
    1,000 identities with distinct jtis as the warm tokens do; and the best full sync: wall s, CPU s, entries."""
    from gateway.identity import Identity
    from gateway.metrics import Metrics
    from gateway.revocation import RevocationCheck

    mirror, sync_wall, sync_cpu = synced_mirror(prefix)
    check = RevocationCheck(mirror, Metrics(), 5.0)
    now, salt = time.time(), secrets.token_hex(4)
    identities = [
        Identity(
            subject=f"user-{i}",
            scopes=frozenset(),
            claims={},
            issuer="bench",
            source="jwt",
            token_id=f"warm-{i}-{salt}",
            expires_at=now + 3600,
            issued_at=now,
            long_lived=True,
        )
        for i in range(WARM_TOKENS)
    ]
    cost = {}
    for policy in ("always", "never"):
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(loops):
                for identity in identities:
                    check.check(identity, policy, False)
            best = min(best, time.perf_counter() - started)
        cost[policy] = best / (loops * len(identities)) * 1e6
    return cost["always"], cost["never"], sync_wall, sync_cpu, len(mirror.jtis)


def throughput(h: Harness, revoked: int, rounds: int, seconds: float, warmup: float) -> None:
    tokens = token_file(h.keys["RS256"], "warm", WARM_TOKENS)
    probe = sign(h.keys["RS256"], claims("user-revoked", "probe-revoked", int(time.time())))
    runs: dict[str, list[Run]] = {"always": [], "never": []}
    pairs: dict[str, list[Run]] = {"always": [], "never": []}
    checks: dict[str, float] = {"always": 0.0, "never": 0.0}
    print(f"throughput: {revoked:,} revoked jtis in Redis; {rounds} rounds × {seconds:g} s", flush=True)
    with revoked_set(revoked, "probe-revoked") as prefix:
        for round_no in range(rounds):
            order = ["always", "never"] if round_no % 2 == 0 else ["never", "always"]
            for policy in order:
                print(f"throughput: round {round_no + 1}/{rounds} revocation: {policy} ...", end=" ", flush=True)
                gateway = _checked(h, prefix, policy, tokens, probe)
                try:
                    run = measure(gateway, policy, round_no, tokens, h, seconds, warmup)
                    checks[policy] += metric_sum(metrics(gateway.admin), "gateway_revocation_checks_total")
                finally:
                    gateway.stop()
                runs[policy].append(run)
                print_run(run)
            print(f"throughput: round {round_no + 1}/{rounds} both at once ...", end=" ", flush=True)
            with ExitStack() as stack:
                both = {}
                for policy in order:  # the same alternating order: start and wrk order cancel out over rounds
                    both[policy] = (_checked(h, prefix, policy, tokens, probe), tokens)
                    stack.callback(both[policy][0].stop)
                side = side_by_side(both, round_no, h, seconds, warmup)
            for policy, run in side.items():
                pairs[policy].append(run)
            print_side(side)
        print("throughput: the check in this process, against the gateway's own mirror class ...", flush=True)
        always_us, never_us, sync_wall, sync_cpu, size = check_cost(prefix)
    print()
    print(
        f"Revocation check cost — route `bench` (RS256, 1,000 warm tokens cycled), {revoked:,} revoked jtis mirrored "
        f"either way; `revocation: always` ÷ `revocation: never`; wrk -t1 -c{wrk.CONNECTIONS} on core {DRIVER_CORE}, "
        f"gateway on core {SERVER_CORE}; {rounds} rounds × {seconds:g} s"
    )
    print()
    print("A. One after the other (the suite's method; a fresh process per run, order alternating per round)")
    print(compare(runs, "always", "never"))
    print()
    print("B. Side by side: both gateways on core 0 at the same time, one wrk each (machine drift hits both alike)")
    print(compare(pairs, "always", "never"))
    print()
    print(f"gateway_revocation_checks_total in A: always {checks['always']:,.0f}, never {checks['never']:,.0f}")
    for label, data in (("A", runs), ("B", pairs)):
        ratios = Ratios.of(data, "always", "never")
        print(f"{label}: cost of the check, order-balanced: {ratios.describe('always', 'never', as_cost=True)}")
        print(f"   per-round CPU ratios {min(ratios.cpu):.3f}..{max(ratios.cpu):.3f}")
    never_cpu = statistics.median(r.cpu_us_per_request for r in runs["never"] + pairs["never"])
    extra = always_us - never_us
    print(
        f"C. RevocationCheck.check() itself, {size:,} entries, 1,000 jtis cycled: always {always_us:.2f} µs, never {never_us:.2f} µs per call "
        f"(this process, core {DRIVER_CORE}): {extra:.2f} µs = {extra / never_cpu:.1%} of the {never_cpu:.0f} µs CPU "
        f"a request costs with `never` (target: under 3 %)"
    )
    print(
        f"   a full mirror sync of {size:,} entries (Mirror.full_sync: ZRANGE + parsing + the dict) takes "
        f"{sync_wall * 1000:.0f} ms, {sync_cpu * 1000:.0f} ms of it CPU, in this process; every gateway does one per "
        f"resync_interval (30 s by default) whatever the route's revocation policy: {sync_cpu / 30:.1%} of a core "
        f"at 30 s, and not in A or B (a run ending within 30 s of the start has no resync)"
    )


# --- 3. Memory ----------------------------------------------------------------------------------------------------


def _wait_mirror(gateway: Gateway, count: int, timeout: float = 30.0) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metric_sum(metrics(gateway.admin), "gateway_revoked_tokens") == count:
            return time.monotonic()
        time.sleep(0.1)
    raise TargetError(f"mirror did not reach {count} entries in {timeout:.0f}s")


def _estimate(prefix: str) -> tuple[float, int]:
    """Bytes of the gateway's own mirror dict synced from `prefix` here (sys.getsizeof of the dict, keys, values)."""
    mirror, _, _ = synced_mirror(prefix)
    table: dict[str, float] = mirror.jtis
    size = sys.getsizeof(table) + sum(sys.getsizeof(k) + sys.getsizeof(v) for k, v in table.items())
    return size, len(table)


def memory(h: Harness, revoked: int, pairs: int, settle: float) -> None:
    print(f"memory: {pairs} pair(s) of gateways, {revoked:,} entries vs an empty set", flush=True)
    rows, deltas, later = [], [], []
    with revoked_set(revoked, "probe-revoked") as full, empty_prefix() as empty:
        for pair in range(pairs):
            sizes: dict[str, tuple[int, int]] = {}
            # Alternate which starts first; resync every 2 s, so the later figure includes resync churn.
            order = [("full", full, revoked + 1), ("empty", empty, 0)]
            for label, prefix, count in order if pair % 2 == 0 else order[::-1]:
                config = store_config(h, prefix, "long_lived")
                config["store"]["resync_interval"] = "2s"
                gateway = start_gateway(h, config)
                try:
                    _wait_mirror(gateway, count)
                    time.sleep(0.5)
                    synced = rss_bytes(gateway.process.pid)
                    time.sleep(settle)
                    sizes[label] = (synced, rss_bytes(gateway.process.pid))
                finally:
                    gateway.stop()
            delta = sizes["full"][0] - sizes["empty"][0]
            delta_later = sizes["full"][1] - sizes["empty"][1]
            deltas.append(delta)
            later.append(delta_later)
            rows.append(
                [f"pair {pair + 1}"]
                + [f"{sizes[k][i] / MB:.1f}" for i in (0, 1) for k in ("full", "empty")]
                + [f"{delta / MB:.1f}", f"{delta_later / MB:.1f}"]
            )
        estimate, entries = _estimate(full)
    print()
    print(f"Memory of {revoked:,} revoked jtis in the mirror — VmRSS of one gateway process (--workers 1), MB")
    headers = [
        "",
        "100k synced",
        "empty synced",
        f"100k +{settle:.0f}s",
        f"empty +{settle:.0f}s",
        "Δ synced",
        "Δ later",
    ]
    print("\n".join(_grid(headers, rows)))
    print(
        f"RSS cost of {revoked:,} entries: {statistics.median(deltas) / MB:.1f} MB just after the first sync, "
        f"{statistics.median(later) / MB:.1f} MB after {settle:.0f} s of 2-second resyncs (medians over pairs); "
        f"{statistics.median(deltas) / revoked:.0f} B per entry"
    )
    print(
        f"estimate without tracemalloc: sys.getsizeof of the gateway's Mirror.jtis synced in this process "
        f"({entries:,} str jti -> float exp; jtis like revoked-12345-0123456789ab): "
        f"{estimate / MB:.1f} MB, {estimate / entries:.0f} B per entry"
    )


# --- Command line ------------------------------------------------------------------------------------------------

PARTS = ("propagation", "throughput", "memory")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.propagation", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 trials, 4 rounds × 3 s, one memory pair")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {', '.join(PARTS)}")
    parser.add_argument("--revoked", type=int, default=100_000, help="revoked jtis pre-loaded (100,000)")
    parser.add_argument("--trials", type=int, default=None, help="propagation trials, half A, half B (400; quick 100)")
    parser.add_argument(
        "--resync-interval", default=None, help="propagation: store.resync_interval of the 4 gateways (default: 30s)"
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="throughput rounds, even keeps the order balanced (6; quick 4)"
    )
    parser.add_argument("--duration", type=float, default=None, help="seconds per throughput run (10; quick 3)")
    parser.add_argument("--warmup", type=float, default=None, help="seconds of load before each run (2; quick 1)")
    parser.add_argument("--pairs", type=int, default=None, help="memory: gateway pairs measured (3; quick 1)")
    parser.add_argument(
        "--settle", type=float, default=None, help="memory: seconds before the second RSS (10; quick 5)"
    )
    args = parser.parse_args()
    args.trials = args.trials or (100 if args.quick else 400)
    args.rounds = args.rounds or (4 if args.quick else 6)
    args.duration = args.duration or (3.0 if args.quick else 10.0)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0)
    args.pairs = args.pairs or (1 if args.quick else 3)
    args.settle = args.settle if args.settle is not None else (5.0 if args.quick else 10.0)
    args.parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s) {', '.join(sorted(unknown))}; known: {', '.join(PARTS)}")
    return args


def main() -> None:
    args = parse_args()
    with harness() as h:
        steps: dict[str, Callable[[], None]] = {
            "propagation": lambda: propagation(h, args.revoked, args.trials, args.resync_interval),
            "throughput": lambda: throughput(h, args.revoked, args.rounds, args.duration, args.warmup),
            "memory": lambda: memory(h, args.revoked, args.pairs, args.settle),
        }
        failed = run_parts(steps, args.parts)
    if failed:
        sys.exit(1)


def run_parts(steps: dict[str, Callable[[], None]], parts: Sequence[str]) -> list[str]:
    """Run each named part; one that fails is reported and the others still run. Returns the failed ones."""
    failed = []
    for part in parts:
        try:
            steps[part]()
        except (TargetError, RuntimeError, OSError, TimeoutError) as exc:
            failed.append(part)
            print(f"\n{part}: FAILED: {exc}", flush=True)
        print()
    return failed


if __name__ == "__main__":
    main()
