"""User-space instructions per request, counted by valgrind's callgrind: a figure the VM's noise cannot move.

    python -m bench.instructions                       # gateway-none, RS256 warm and cold (about 8 minutes)
    python -m bench.instructions --only gateway-none,gateway-es256-warm --requests 3000

On a shared VM, req/s and CPU time per request move ±25–70 % between rounds; these counts repeat within ~0.1 %.
Each target runs twice under callgrind, each time warmed up on 1,000 tokens and then sent N1 or N2 requests over 8
keep-alive connections (the client runs outside valgrind, in this process); instructions per request are the
difference of the two totals over N2 - N1, so start-up and shutdown cancel out.

What it does not count: the kernel's side of the socket calls (the same for every gateway target, so compare them
with one another, not with nginx or HAProxy), cache misses, and valgrind's CPU model (it runs without SHA
extensions, so SHA-256 weighs more here than on hardware).
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench import gateway_server, servers, system, tokens
from bench.targets import BY_NAME, Target

DEFAULT_TARGETS = "gateway-none,gateway-rs256-warm,gateway-rs256-cold"
CONNECTIONS = 8
START_TIMEOUT = 300.0  # python under callgrind starts ~50× slower


def _send(port: int, token_lines: list[str], first: int, count: int) -> None:
    """`count` requests on one keep-alive connection, tokens first..first+count (cycled); every answer a 200."""
    with socket.create_connection(("127.0.0.1", port)) as sock, sock.makefile("rb") as answers:
        for i in range(first, first + count):
            token = token_lines[i % len(token_lines)]
            sock.sendall(f"GET /items HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
            status = int(answers.readline().split()[1])
            length = 0
            while (line := answers.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            answers.read(length)
            if status != 200:
                raise RuntimeError(f"request {i} answered {status}")


def _load(port: int, token_lines: list[str], requests: int) -> None:
    each = requests // CONNECTIONS
    with ThreadPoolExecutor(CONNECTIONS) as pool:
        for done in [pool.submit(_send, port, token_lines, k * each, each) for k in range(CONNECTIONS)]:
            done.result()


def _total(path: Path) -> int:
    for line in path.read_text().splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise RuntimeError(f"no totals line in {path}")


def count(
    target: Target, requests: int, workdir: Path, upstream: int, keys: dict[str, tokens.KeyPair],
    token_sets: dict[str, list[str]],
) -> int:  # fmt: skip
    """Instructions of one gateway process, from start to exit, having served `requests` after its warm-up."""
    warm, measured = token_sets[target.warmup_tokens], token_sets[target.tokens]
    port, admin = system.free_port(), system.free_port()
    config = workdir / f"{target.name}-{requests}.yaml"
    config.write_text(gateway_server.gateway_config(port, admin, upstream, keys, target.auth, None, True))
    out = workdir / f"callgrind-{target.name}-{requests}.out"
    argv = [
        "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
        sys.executable, "-m", "gateway", "run", "--config", str(config), "--workers", "1",
    ]  # fmt: skip
    with (workdir / f"{target.name}-{requests}.log").open("wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)  # noqa: S603 - our own command
    try:
        system.wait_for_port(port, process, timeout=START_TIMEOUT)
        _load(port, warm, tokens.WARM_TOKENS)  # every warm token seen once: the cache holds them all
        _load(port, measured, requests)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(START_TIMEOUT)
    return _total(out)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=DEFAULT_TARGETS, help=f"gateway targets (default {DEFAULT_TARGETS})")
    parser.add_argument("--requests", type=int, default=2000, help="N2 - N1: requests between the two runs (2000)")
    args = parser.parse_args()
    names = [name.strip() for name in args.only.split(",") if name.strip()]
    targets = [BY_NAME[name] for name in names if name in BY_NAME and BY_NAME[name].kind == "gateway"]
    if len(targets) != len(names) or any(target.revoked for target in targets):
        raise SystemExit(f"bench.instructions: gateway targets without revocation only, not {args.only}")
    if subprocess.run(["valgrind", "--version"], capture_output=True, check=False).returncode != 0:
        raise SystemExit("bench.instructions: needs valgrind (Debian: apt-get install valgrind)")
    system.ensure_packages()  # nginx, the upstream
    keys = tokens.ensure_keys()
    small, large = CONNECTIONS * 125, CONNECTIONS * 125 + args.requests
    token_sets = {}
    for name in {target.tokens for target in targets} | {target.warmup_tokens for target in targets}:
        alg, kind = name.split("-")
        path = tokens.token_file(keys[alg.upper()], kind, tokens.WARM_TOKENS if kind == "warm" else large)
        token_sets[name] = path.read_text().split()
    per_request: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-instructions-") as tmp:
        workdir = Path(tmp)
        nginx, upstream = servers.start_nginx(workdir, system.DRIVER_CORE)
        try:
            for target in targets:
                totals = [count(target, n, workdir, upstream, keys, token_sets) for n in (small, large)]
                per_request[target.name] = (totals[1] - totals[0]) / (large - small)
                print(f"bench: {target.name}: {per_request[target.name]:,.0f} instructions per request", flush=True)
        finally:
            nginx.stop()
    print(f"\nUser-space instructions per request (callgrind; {large - small:,} requests between two runs)")
    base = per_request.get("gateway-none")
    print(f"{'target':<22} {'instr/req':>10} {'÷ none':>8} {'none ÷ target':>14}")
    for name, value in per_request.items():
        ratios = f"{value / base:>7.2f}x {base / value:>13.2f}x" if base else ""
        print(f"{name:<22} {value:>10,.0f} {ratios}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
