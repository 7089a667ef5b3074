"""Start Token Gateway under test: generate its YAML, run `gateway run`, wait for /readyz."""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from bench.servers import TargetError
from bench.system import REPO, Process, free_port, pinned, spawn
from bench.tokens import AUDIENCE, ISSUER, TOKEN_TTL, KeyPair

READY_TIMEOUT = 30.0
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


@dataclass
class Compat:
    """What this build of the gateway accepted, learnt on the first start and reused afterwards."""

    workers_flag: bool = True
    log_key: bool = True
    learnt: bool = False
    notes: list[str] = field(default_factory=list)


def gateway_command() -> list[str]:
    """The venv's `gateway` script, or `python -m gateway` while the package is not pip-installed yet."""
    script = Path(sys.executable).parent / "gateway"
    if script.exists():
        return [str(script)]
    if (REPO / "gateway" / "__main__.py").exists():
        return [sys.executable, "-m", "gateway"]
    if found := shutil.which("gateway"):
        return [found]
    raise TargetError("no gateway CLI: neither .venv/bin/gateway nor gateway/__main__.py (run `make` first)")


def gateway_config(
    port: int, admin: int, upstream: int, keys: dict[str, KeyPair], auth: str, store_prefix: str | None, log_key: bool
) -> str:
    route_auth: dict[str, object] = {"mode": "none"} if auth == "none" else {"mode": "jwt", "issuers": ["bench"]}
    config: dict[str, object] = {
        "listen": {"host": "127.0.0.1", "port": port},
        "admin": {"host": "127.0.0.1", "port": admin},
    }
    if log_key:
        config["log"] = {"access": False}
    if store_prefix is not None:
        config["store"] = {"redis_url": REDIS_URL, "key_prefix": store_prefix}
        route_auth["revocation"] = "always"
    config["issuers"] = [
        {
            "name": "bench",
            "issuer": ISSUER,
            "keys": [{"pem_file": str(pair.public_pem), "kid": pair.kid} for pair in keys.values()],
            "audiences": [AUDIENCE],
            "algorithms": sorted(keys),
        }
    ]
    config["routes"] = [
        {
            "name": "bench",
            "match": {"path_prefix": "/"},
            "upstream": {"url": f"http://127.0.0.1:{upstream}"},
            "auth": route_auth,
        }
    ]
    return yaml.safe_dump(config, sort_keys=False)


def _wait_ready(process: Process, admin: int) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            raise TargetError(f"gateway exited with code {process.popen.returncode}:\n{process.log_tail()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    process.stop()
    raise TargetError(f"gateway not ready on :{admin}/readyz after {READY_TIMEOUT:.0f}s:\n{process.log_tail()}")


def _attempts(compat: Compat) -> list[tuple[bool, bool]]:
    """(--workers 1, log key) combinations to try, most faithful first; only one once learnt."""
    if compat.learnt:
        return [(compat.workers_flag, compat.log_key)]
    return [(True, True), (False, True), (True, False), (False, False)]


def start_gateway(
    workdir: Path,
    core: int,
    upstream: int,
    keys: dict[str, KeyPair],
    auth: str,
    compat: Compat,
    store_prefix: str | None = None,
) -> tuple[Process, int]:
    errors = []
    for workers_flag, log_key in _attempts(compat):
        port, admin = free_port(), free_port()
        conf = workdir / f"gateway-{port}.yaml"
        conf.write_text(gateway_config(port, admin, upstream, keys, auth, store_prefix, log_key))
        argv = [*gateway_command(), "run", "--config", str(conf), *(["--workers", "1"] if workers_flag else [])]
        process = spawn("gateway", pinned(core, argv), workdir / f"gateway-{port}.log")
        try:
            _wait_ready(process, admin)
        except TargetError as exc:
            process.stop()
            errors.append(f"[{' '.join(argv[-4:])}, log key {'on' if log_key else 'off'}] {exc}")
            continue
        if not compat.learnt:
            compat.learnt, compat.workers_flag, compat.log_key = True, workers_flag, log_key
            if not workers_flag:
                compat.notes.append("gateway: `--workers 1` was refused; ran without it")
            if not log_key:
                compat.notes.append("gateway: config key `log: {access: false}` was refused; access log may be on")
        return process, port
    raise TargetError("gateway did not start:\n" + "\n".join(errors))


@contextmanager
def revoked_set(count: int, probe_jti: str) -> Iterator[str]:
    """A fresh Redis key prefix whose revoked-jti set holds `count` random entries plus `probe_jti`."""
    import redis  # only this target needs Redis

    prefix = f"gwbench-{secrets.token_hex(4)}:"
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise TargetError(f"revocation target needs Redis at {REDIS_URL} (BENCH_REDIS_URL): {exc}") from exc
    key = f"{prefix}revoked:jti"
    exp = int(time.time()) + TOKEN_TTL
    try:
        with client.pipeline(transaction=False) as pipe:
            for start in range(0, count, 10_000):
                pipe.zadd(
                    key, {f"revoked-{i}-{secrets.token_hex(6)}": exp for i in range(start, min(start + 10_000, count))}
                )
            pipe.zadd(key, {probe_jti: exp})
            pipe.execute()
        yield prefix
    finally:
        for stale in client.scan_iter(match=f"{prefix}*", count=1000):
            client.delete(stale)
        client.close()
