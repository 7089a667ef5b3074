"""What is measured: the target list, how each starts, and the check that it really judges tokens."""

from __future__ import annotations

import http.client
import os
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from bench import gateway_server, servers
from bench.gateway_server import Compat
from bench.servers import UPSTREAM_BODY, TargetError
from bench.system import SERVER_CORE, Process, can_pin
from bench.tokens import KeyPair, claims, first_token, sign


@dataclass(frozen=True)
class Target:
    """One thing to measure; adding a target is one line in TARGETS."""

    name: str
    kind: Literal["nginx", "haproxy", "plain", "gateway"]
    tokens: str = "rs256-warm"  # token set wrk sends: "<alg>-warm" (1,000 cycled) or "<alg>-cold" (all distinct)
    auth: Literal["jwt", "none"] = "jwt"  # "none": lets every request through (no 401 check)
    revoked: int = 0  # gateway only: entries in the Redis revocation set; >0 turns revocation on

    @property
    def alg(self) -> str:
        return self.tokens.split("-")[0].upper()

    @property
    def warmup_tokens(self) -> str:
        # A cold target warms up on other tokens of the same algorithm: its cold ones stay unseen.
        return self.tokens.replace("-cold", "-warm")


TARGETS: tuple[Target, ...] = (
    Target("upstream-direct", "nginx", auth="none"),
    Target("haproxy-proxy", "haproxy", auth="none"),
    Target("haproxy-jwt-rs256", "haproxy"),
    Target("plain-aiohttp-pyjwt", "plain"),
    Target("gateway-none", "gateway", auth="none"),
    Target("gateway-rs256-warm", "gateway"),
    Target("gateway-rs256-cold", "gateway", tokens="rs256-cold"),
    Target("gateway-es256-warm", "gateway", tokens="es256-warm"),
    Target("gateway-es256-cold", "gateway", tokens="es256-cold"),
    Target("gateway-revocation-100k", "gateway", revoked=100_000),
)
BY_NAME = {target.name: target for target in TARGETS}
BASELINES = ("plain-aiohttp-pyjwt", "haproxy-jwt-rs256")
# Short column label and the full name printed under the table.
BASELINE_LABELS = {
    "plain-aiohttp-pyjwt": ("plain", "plain aiohttp+pyjwt"),
    "haproxy-jwt-rs256": ("haproxy", "haproxy jwt_verify"),
}


@dataclass
class Bench:
    """What every run shares: scratch directory, keys, token files and their wrk scripts, the upstream nginx."""

    workdir: Path
    keys: dict[str, KeyPair]
    token_files: dict[str, Path]
    scripts: dict[str, Path]
    upstream_pid: int
    upstream_port: int
    compat: Compat
    connections: int


@dataclass(frozen=True)
class Running:
    process: Process
    port: int


@contextmanager
def launch(target: Target, bench: Bench) -> Iterator[Running]:
    """Start `target` on the server core, check it, yield it, stop it (and its Redis data)."""
    with ExitStack() as stack:
        rs256 = bench.keys["RS256"].public_pem
        probe = None
        if target.kind == "nginx":
            process, port = servers.start_nginx(bench.workdir, SERVER_CORE)
        elif target.kind == "haproxy":
            if target.auth == "jwt":
                servers.check_haproxy_jwt(bench.workdir, rs256)
            key = rs256 if target.auth == "jwt" else None
            process, port = servers.start_haproxy(bench.workdir, SERVER_CORE, bench.upstream_port, key)
        elif target.kind == "plain":
            process, port = servers.start_plain_proxy(bench.workdir, SERVER_CORE, bench.upstream_port, rs256)
        else:
            prefix = None
            if target.revoked:
                probe = sign(bench.keys[target.alg], claims("user-revoked", "probe-revoked", int(time.time())))
                prefix = stack.enter_context(gateway_server.revoked_set(target.revoked, "probe-revoked"))
            process, port = gateway_server.start_gateway(
                bench.workdir, SERVER_CORE, bench.upstream_port, bench.keys, target.auth, bench.compat, prefix
            )
        stack.callback(process.stop)
        if can_pin() and os.sched_getaffinity(process.pid) != {SERVER_CORE}:
            raise TargetError(f"not pinned to core {SERVER_CORE}: {sorted(os.sched_getaffinity(process.pid))}")
        try:
            check(target, port, bench, probe)
        except TargetError as exc:
            raise TargetError(f"{exc}\n{process.name} log:\n{process.log_tail(8)}") from exc
        yield Running(process, port)


def _get(port: int, token: str | None) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/", headers={"Authorization": f"Bearer {token}"} if token else {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def check(target: Target, port: int, bench: Bench, revoked_token: str | None) -> None:
    """A valid token gets the upstream's body; with auth on, a missing, forged, expired or revoked one gets 401."""
    # From the warm-up set: a cold target's own tokens must stay unseen until the measured run.
    valid = first_token(bench.token_files[target.warmup_tokens])
    status, body = _get(port, valid)
    if status != 200 or body.decode(errors="replace") != UPSTREAM_BODY:
        raise TargetError(f"valid token: expected 200 with the upstream body, got {status} {body[:200]!r}")
    if target.auth == "none":
        return
    header, payload, signature = valid.split(".")
    forged = f"{header}.{payload}.{signature[:10]}{'A' if signature[10] != 'A' else 'B'}{signature[11:]}"
    now = int(time.time())
    expired = sign(bench.keys[target.alg], {**claims("user-x", "expired", now - 7200), "exp": now - 3600})
    cases = {"no token": None, "forged signature": forged, "expired": expired}
    if revoked_token is not None:
        cases["revoked"] = revoked_token
    for case, token in cases.items():
        status, body = _get(port, token)
        if status != 401:
            why = "revocation is not applied" if case == "revoked" else "is auth really on?"
            raise TargetError(f"{case} token: expected 401, got {status} {body[:120]!r}: {why}")
