"""Issue 4: what an introspected route costs with a warm cache, and how many endpoint calls its cache saves.

    python -m bench.introspection            # 6 rounds × 10 s, then 10,000 requests over 100 tokens (~6 minutes)
    python -m bench.introspection --quick    # 4 rounds × 3 s (~2 minutes)
    python -m bench.introspection --only calls

A real RFC 7662 endpoint runs on the driver core (`python -m bench.introspection serve`, aiohttp): it checks the
gateway's client_secret_basic credentials, answers `active: true` (sub, scope, exp = now + 1 h, ...) for the opaque
tokens it was given and `active: false` for anything else, and counts its calls.

4. Throughput: route `bench` in `mode: introspect` (cache_ttl 300 s) with 1,000 distinct opaque tokens, every
   one introspected once before the load, against the same route in `mode: jwt` with 1,000 distinct RS256
   tokens (already verified once: the verified-token cache is warm). Opaque tokens are as long as the JWTs, so the
   requests are the same size. wrk on core 1, gateway on core 0; one after the other (order alternating per
   round) and side by side (both gateways on core 0 at once).
5. Calls: a fresh gateway (cache_ttl 60 s), exactly 10,000 requests cycling 100 tokens, 32 at a time; the
   endpoint's own call counter and the gateway's gateway_introspection_requests_total.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import secrets
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import aiohttp

from bench.propagation import (
    Gateway,
    Harness,
    Ratios,
    base_config,
    compare,
    expect,
    harness,
    measure,
    metric_sum,
    metrics,
    print_run,
    print_side,
    run_async,
    run_parts,
    side_by_side,
    start_gateway,
)
from bench.report import Run
from bench.servers import TargetError
from bench.system import DRIVER_CORE, SERVER_CORE, free_port, pinned, spawn, wait_for_port
from bench.tokens import WARM_TOKENS, first_token, token_file

ENDPOINT = "bench-idp"
CLIENT_ID = "bench-gateway"
SECRET_ENV = "BENCH_INTROSPECTION_SECRET"
SECRET = "bench-secret-" + secrets.token_hex(8)
SCOPE = "orders:read orders:write"
CLIENT_TIMEOUT = 300.0  # seconds: the in-harness client gives up on a batch after this long


# --- The introspection endpoint (a subprocess on the driver core) -----------------------------------------------


def serve(port: int, tokens: Path, client_id: str) -> None:
    from aiohttp import web

    known = {line.strip(): f"user-{i}" for i, line in enumerate(tokens.read_text().splitlines()) if line.strip()}
    pair = f"{client_id}:{os.environ[SECRET_ENV]}"  # both URL-safe: form-encoding changes nothing
    expected = "Basic " + base64.b64encode(pair.encode()).decode()
    counts: Counter[str] = Counter()
    seen: set[str] = set()

    async def introspect(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != expected:
            counts["unauthorized"] += 1
            return web.json_response({"error": "invalid_client"}, status=401)
        token = str((await request.post()).get("token", ""))
        counts["calls"] += 1
        seen.add(token)
        subject = known.get(token)
        if subject is None:
            counts["inactive"] += 1
            return web.json_response({"active": False})
        now = int(time.time())
        answer = {
            "active": True,
            "sub": subject,
            "scope": SCOPE,
            "client_id": "bench-client",
            "token_type": "Bearer",
            "exp": now + 3600,
            "iat": now,
        }
        return web.json_response(answer)

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({**counts, "distinct": len(seen)})

    app = web.Application()
    app.router.add_post("/introspect", introspect)
    app.router.add_get("/stats", stats)
    loop: asyncio.AbstractEventLoop
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, loop=loop)


@contextmanager
def endpoint(h: Harness, tokens: Path) -> Iterator[int]:
    port = free_port()
    argv = [sys.executable, "-m", "bench.introspection", "serve", "--port", str(port), "--tokens", str(tokens)]
    process = spawn(
        "introspection",
        pinned(DRIVER_CORE, argv),
        h.workdir / "introspection.log",
        env={**os.environ, SECRET_ENV: SECRET},
    )
    try:
        try:
            wait_for_port(port, process.popen)
        except RuntimeError as exc:
            raise TargetError(f"introspection endpoint did not start: {exc}\n{process.log_tail()}") from exc
        yield port
    finally:
        process.stop()


def endpoint_stats(port: int) -> Counter[str]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=10) as response:
        return Counter(json.loads(response.read()))


# --- Gateways and the in-harness client ---------------------------------------------------------------------------


def config(h: Harness, endpoint_port: int, mode: str, cache_ttl: str) -> dict[str, Any]:
    """The suite's gateway config plus one introspection endpoint; only the route's auth mode differs."""
    conf = base_config(h)
    conf["introspection"] = [
        {
            "name": ENDPOINT,
            "endpoint": f"http://127.0.0.1:{endpoint_port}/introspect",
            "client_id": CLIENT_ID,
            "client_secret_env": SECRET_ENV,
            "auth_method": "client_secret_basic",
            "cache_ttl": cache_ttl,
            "negative_cache_ttl": "0s",
            "timeout": "2s",
            "max_concurrency": 64,
            "breaker_failures": 5,
            "breaker_reset": "10s",
            "shared_cache": False,
        }
    ]
    if mode == "introspect":
        conf["routes"][0]["auth"] = {"mode": "introspect", "introspection": ENDPOINT}
    return conf


def start(h: Harness, endpoint_port: int, mode: str, cache_ttl: str = "300s") -> Gateway:
    return start_gateway(h, config(h, endpoint_port, mode, cache_ttl), SERVER_CORE, {SECRET_ENV: SECRET})


def opaque_tokens(directory: Path, count: int, length: int) -> Path:
    """`count` random opaque tokens of `length` characters (URL-safe), one a line."""
    path = directory / f"opaque-{count}.txt"
    with path.open("w") as out:
        for _ in range(count):
            out.write(("opq_" + secrets.token_urlsafe(length))[:length] + "\n")
    return path


def send(port: int, tokens: list[str], total: int, concurrency: int) -> Counter[int]:
    """Exactly `total` GET / cycling `tokens` in order, `concurrency` at a time; the statuses counted."""

    async def main() -> Counter[int]:
        statuses: Counter[int] = Counter()
        next_index = 0
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def worker() -> None:
                nonlocal next_index
                while next_index < total:
                    token = tokens[next_index % len(tokens)]
                    next_index += 1
                    headers = {"Authorization": f"Bearer {token}"}
                    async with session.get(f"http://127.0.0.1:{port}/", headers=headers) as response:
                        await response.read()
                        statuses[response.status] += 1

            async with asyncio.timeout(CLIENT_TIMEOUT):
                await asyncio.gather(*(worker() for _ in range(concurrency)))
        return statuses

    result: Counter[int] = run_async(main)
    return result


def lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def checked(h: Harness, endpoint_port: int, mode: str, jwts: Path, opaque: Path) -> Gateway:
    gateway = start(h, endpoint_port, mode)
    try:
        valid, other = (first_token(opaque), first_token(jwts)) if mode == "introspect" else (first_token(jwts), None)
        expect(gateway.port, valid, 200, f"{mode}: valid token")
        expect(gateway.port, None, 401, f"{mode}: no token")
        expect(gateway.port, "opq_" + secrets.token_urlsafe(40), 401, f"{mode}: unknown opaque token")
        if other is not None:  # a JWT is just another opaque token to an introspect route, and this endpoint
            expect(gateway.port, other, 401, f"{mode}: a JWT the endpoint does not know")
    except BaseException:
        gateway.stop()
        raise
    return gateway


def warm(gateway: Gateway, tokens: Path, endpoint_port: int, mode: str) -> None:
    """Every token once (32 at a time); for introspect, proof that this made exactly one call per token.

    The start-up check already asked for the first token, so that one is cached: one call fewer.
    """
    before = endpoint_stats(endpoint_port)["calls"]
    statuses = send(gateway.port, lines(tokens), len(lines(tokens)), 32)
    if set(statuses) != {200}:
        raise TargetError(f"{mode}: warming got statuses {dict(statuses)}")
    made = endpoint_stats(endpoint_port)["calls"] - before
    expected = len(lines(tokens)) - 1 if mode == "introspect" else 0
    if made != expected:
        raise TargetError(f"{mode}: warming {len(lines(tokens))} tokens made {made} endpoint calls, not {expected}")


# --- 4. Throughput ------------------------------------------------------------------------------------------------


def throughput(h: Harness, rounds: int, seconds: float, warmup: float) -> None:
    jwts = token_file(h.keys["RS256"], "warm", WARM_TOKENS)
    opaque = opaque_tokens(h.workdir, WARM_TOKENS, len(first_token(jwts)))
    files = {"introspect": opaque, "jwt": jwts}
    runs: dict[str, list[Run]] = {"introspect": [], "jwt": []}
    pairs: dict[str, list[Run]] = {"introspect": [], "jwt": []}
    during: Counter[str] = Counter()
    cache: dict[str, float] = defaultdict(float)
    print(f"throughput: {rounds} rounds × {seconds:g} s; tokens of {len(first_token(jwts))} characters", flush=True)
    with endpoint(h, opaque) as port:
        for round_no in range(rounds):
            order = ["introspect", "jwt"] if round_no % 2 == 0 else ["jwt", "introspect"]
            for mode in order:
                print(f"throughput: round {round_no + 1}/{rounds} {mode} ...", end=" ", flush=True)
                gateway = checked(h, port, mode, jwts, opaque)
                try:
                    warm(gateway, files[mode], port, mode)
                    before = endpoint_stats(port)["calls"]
                    run = measure(gateway, mode, round_no, files[mode], h, seconds, warmup)
                    during[mode] += endpoint_stats(port)["calls"] - before
                    values = metrics(gateway.admin)
                    for result in ("hit", "miss"):
                        cache[f"{mode} {result}"] += metric_sum(
                            values, "gateway_introspection_cache_requests_total", f'result="{result}"'
                        )
                finally:
                    gateway.stop()
                runs[mode].append(run)
                print_run(run)
            print(f"throughput: round {round_no + 1}/{rounds} both at once ...", end=" ", flush=True)
            with ExitStack() as stack:
                both = {}
                for mode in order:  # the same alternating order: start and wrk order cancel out over rounds
                    gateway = checked(h, port, mode, jwts, opaque)
                    stack.callback(gateway.stop)
                    warm(gateway, files[mode], port, mode)
                    both[mode] = (gateway, files[mode])
                before = endpoint_stats(port)["calls"]
                side = side_by_side(both, round_no, h, seconds, warmup)
                during["side by side"] += endpoint_stats(port)["calls"] - before
            for mode, run in side.items():
                pairs[mode].append(run)
            print_side(side)
    print()
    print(
        f"Introspected route, warm cache (cache_ttl 300 s, 1,000 opaque tokens) ÷ the same route in jwt mode "
        f"(1,000 RS256 tokens, verified-token cache warm); wrk -t1 -c64 on core {DRIVER_CORE}, gateway on core "
        f"{SERVER_CORE}, endpoint on core {DRIVER_CORE}; {rounds} rounds × {seconds:g} s"
    )
    print()
    print("A. One after the other (a fresh process per run, order alternating per round)")
    print(compare(runs, "introspect", "jwt"))
    print()
    print("B. Side by side: both gateways on core 0 at the same time, one wrk each")
    print(compare(pairs, "introspect", "jwt"))
    print()
    print(
        f"endpoint calls during the measured load (after warming): A {during['introspect']}, "
        f"B {during['side by side']} (warm cache: expected 0); introspection cache in A: "
        f"{cache['introspect hit']:,.0f} hits, {cache['introspect miss']:,.0f} misses (the warming pass's 1,000 each run)"
    )
    for label, data in (("A", runs), ("B", pairs)):
        ratios = Ratios.of(data, "introspect", "jwt")
        _, _, rps = Ratios.balanced(ratios.rps)
        verdict = "meets" if rps >= 0.9 else "MISSES"
        print(f"{label}: introspect ÷ jwt, order-balanced: {ratios.describe('introspect', 'jwt', as_cost=False)}")
        print(f"   per-round req/s ratios {min(ratios.rps):.3f}..{max(ratios.rps):.3f}; target ≥ 0.9: {verdict}")


# --- 5. Endpoint calls ---------------------------------------------------------------------------------------------


def calls(h: Harness, requests: int, distinct: int, concurrency: int) -> None:
    jwts = token_file(h.keys["RS256"], "warm", WARM_TOKENS)
    opaque = opaque_tokens(h.workdir, WARM_TOKENS, len(first_token(jwts)))
    tokens = lines(opaque)[:distinct]
    burst_token = lines(opaque)[distinct]
    print(
        f"calls: a fresh gateway (cache_ttl 60 s); {requests:,} requests over {distinct} tokens, {concurrency} at a time",
        flush=True,
    )
    with endpoint(h, opaque) as port:
        gateway = start(h, port, "introspect", "60s")
        try:
            before = endpoint_stats(port)
            started = time.monotonic()
            statuses = send(gateway.port, tokens, requests, concurrency)
            elapsed = time.monotonic() - started
            after = endpoint_stats(port)
            values = metrics(gateway.admin)
            # Coalescing: `concurrency` requests with one token never seen, all at once.
            burst_before = endpoint_stats(port)["calls"]
            burst = send(gateway.port, [burst_token], concurrency, concurrency)
            burst_calls = endpoint_stats(port)["calls"] - burst_before
        finally:
            gateway.stop()
    made = after["calls"] - before["calls"]
    by_outcome = {
        key.split('outcome="')[1].split('"')[0]: value
        for key, value in values.items()
        if key.startswith("gateway_introspection_requests_total{") and value
    }
    counted = metric_sum(values, "gateway_introspection_requests_total")
    hits = metric_sum(values, "gateway_introspection_cache_requests_total", 'result="hit"')
    misses = metric_sum(values, "gateway_introspection_cache_requests_total", 'result="miss"')
    print()
    print(f"Introspection calls for {requests:,} requests cycling {distinct} opaque tokens ({concurrency} concurrent)")
    print(f"  answered:                             {dict(sorted(statuses.items()))} in {elapsed:.1f} s")
    print(
        f"  endpoint's own call counter:          {made:,} ({after['distinct'] - before['distinct']} distinct tokens)"
    )
    print(f"  gateway_introspection_requests_total: {counted:,.0f} {by_outcome}")
    print(f"  gateway_introspection_cache_requests: {hits:,.0f} hits, {misses:,.0f} misses")
    print(
        f"  per 10,000 requests:                  {made * 10_000 / requests:,.0f} endpoint calls (expected ~{distinct})"
    )
    print(
        f"  coalescing: {concurrency} concurrent requests with one new token -> {burst_calls} endpoint call(s); "
        f"answered {dict(sorted(burst.items()))}"
    )


# --- Command line ------------------------------------------------------------------------------------------------

PARTS = ("throughput", "calls")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.introspection", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")
    server = sub.add_parser("serve", help="run the introspection endpoint (used by the benchmark itself)")
    server.add_argument("--port", type=int, required=True)
    server.add_argument("--tokens", type=Path, required=True, help="file of the active opaque tokens, one a line")
    server.add_argument("--client-id", default=CLIENT_ID)
    parser.add_argument("--quick", action="store_true", help="4 rounds × 3 s")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {', '.join(PARTS)}")
    parser.add_argument(
        "--rounds", type=int, default=None, help="throughput rounds, even keeps the order balanced (6; quick 4)"
    )
    parser.add_argument("--duration", type=float, default=None, help="seconds per throughput run (10; quick 3)")
    parser.add_argument("--warmup", type=float, default=None, help="seconds of wrk load before each run (2; quick 1)")
    parser.add_argument("--requests", type=int, default=10_000, help="calls: requests sent (10,000)")
    parser.add_argument("--distinct", type=int, default=100, help="calls: distinct tokens cycled (100)")
    parser.add_argument("--concurrency", type=int, default=32, help="calls: requests in flight (32)")
    args = parser.parse_args()
    args.rounds = args.rounds or (4 if args.quick else 6)
    args.duration = args.duration or (3.0 if args.quick else 10.0)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0)
    args.parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s) {', '.join(sorted(unknown))}; known: {', '.join(PARTS)}")
    if not 0 < args.distinct < WARM_TOKENS:
        parser.error(f"--distinct must be between 1 and {WARM_TOKENS - 1}")
    return args


def main() -> None:
    args = parse_args()
    if args.command == "serve":
        serve(args.port, args.tokens, args.client_id)
        return
    with harness() as h:
        steps: dict[str, Callable[[], None]] = {
            "throughput": lambda: throughput(h, args.rounds, args.duration, args.warmup),
            "calls": lambda: calls(h, args.requests, args.distinct, args.concurrency),
        }
        failed = run_parts(steps, args.parts)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
