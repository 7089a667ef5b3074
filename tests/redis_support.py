"""Redis for tests: REDIS_URL if set, else the shared one on 127.0.0.1:6379, else a private redis-server.

Tests that stop or break Redis always get a private `redis-server` on a free port (PrivateRedis).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

HOW_TO = (
    "Redis is required: set REDIS_URL=redis://host:port/0, run one on 127.0.0.1:6379, "
    "or install redis-server (apt-get install redis-server)"
)


def reachable(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError):
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    """A redis-server of the test's own, on a free port, that can be stopped and started again on that port."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(HOW_TO)
        self.binary = binary
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="gw-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while not reachable(self.url):
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"private redis-server did not start on port {self.port}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def resolve_url() -> tuple[str, PrivateRedis | None]:
    """The Redis the suite uses, and the private server to stop afterwards (if one had to be started)."""
    url = os.environ.get("REDIS_URL")
    if url:
        if not reachable(url):
            raise RuntimeError(f"REDIS_URL={url} is not reachable. {HOW_TO}")
        return url, None
    shared = "redis://127.0.0.1:6379/0"
    if reachable(shared):
        return shared, None
    private = PrivateRedis()
    private.start()
    return private.url, private
