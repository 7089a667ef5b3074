"""Fixed-rate (open-loop) HTTP/1.1 load, for latency at a set fraction of a target's maximum.

wrk is closed-loop and Debian has no wrk2, so this sends requests on a fixed schedule whatever the
server does, and times each from when it was *due*, not when it was sent: a stalled server shows up
as latency instead of as fewer requests (no coordinated omission). Requests are written from the
scheduler itself onto an idle keep-alive connection, and responses are parsed in protocol callbacks,
so the client adds little: its own timer lateness measured under 1 ms at p99 (uvloop's 1 ms timers).
Run: python -m bench.openloop --port P --rate R --seconds S --tokens FILE; prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import uvloop

DRAIN_TIMEOUT = 10.0


def response_size(buf: bytes | bytearray) -> tuple[int, int, bool] | None:
    """(bytes of the first complete response, status, keep-alive) or None while incomplete."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buf[:end]).decode("latin-1").lower()
    status = int(head.split(" ", 2)[1])
    keep_alive = "connection: close" not in head
    pos = end + 4
    if "transfer-encoding: chunked" not in head:
        length = 0
        for line in head.split("\r\n"):
            if line.startswith("content-length:"):
                length = int(line.split(":", 1)[1])
        return (pos + length, status, keep_alive) if len(buf) >= pos + length else None
    while True:
        line_end = buf.find(b"\r\n", pos)
        if line_end < 0:
            return None
        size = int(bytes(buf[pos:line_end]).split(b";")[0], 16)
        pos = line_end + 2 + size + 2
        if len(buf) < pos:
            return None
        if size == 0:
            return pos, status, keep_alive


@dataclass
class Pool:
    """Keep-alive connections; a request due while all are busy waits in `backlog` (and that counts)."""

    port: int
    size: int
    idle: deque[Connection] = field(default_factory=deque)
    backlog: deque[tuple[float, bytes]] = field(default_factory=deque)
    latencies: list[float] = field(default_factory=list)
    non_2xx: int = 0
    errors: int = 0
    live: int = 0
    expected: int = 0
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    def settle(self) -> None:
        """Called whenever a request ends, answered or lost."""
        if len(self.latencies) + self.errors >= self.expected:
            self.finished.set()

    def send(self, due: float, request: bytes) -> None:
        if self.idle:
            self.idle.pop().send(due, request)
        else:
            self.backlog.append((due, request))
            if self.live < self.size:
                self.open()

    def ready(self, connection: Connection) -> None:
        if self.backlog:
            connection.send(*self.backlog.popleft())
        else:
            self.idle.append(connection)

    def open(self) -> None:
        self.live += 1
        loop = asyncio.get_running_loop()
        task = loop.create_task(loop.create_connection(lambda: Connection(self), "127.0.0.1", self.port))
        task.add_done_callback(self._opened)

    def _opened(self, task: asyncio.Task[tuple[asyncio.BaseTransport, asyncio.BaseProtocol]]) -> None:
        if task.cancelled() or task.exception() is not None:
            self.live -= 1
            if self.backlog:
                self.backlog.popleft()
                self.errors += 1
                self.settle()


class Connection(asyncio.Protocol):
    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.buf = bytearray()
        self.due: float | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but have its interface.
        self.transport = cast(asyncio.Transport, transport)
        self.pool.ready(self)

    def send(self, due: float, request: bytes) -> None:
        assert self.transport is not None
        self.due = due
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        parsed = response_size(self.buf)
        if parsed is None or self.due is None:
            return
        size, status, keep_alive = parsed
        self.pool.latencies.append(time.perf_counter() - self.due)
        self.pool.non_2xx += not 200 <= status < 300
        self.due = None
        self.pool.settle()
        del self.buf[:size]
        if keep_alive:
            self.pool.ready(self)
        elif self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.live -= 1
        if self in self.pool.idle:
            self.pool.idle.remove(self)
        if self.due is not None:
            self.pool.errors += 1
            self.pool.settle()
        if self.pool.backlog:
            self.pool.open()


async def drive(port: int, rate: float, seconds: float, requests: list[bytes], connections: int) -> dict[str, float]:
    total = int(rate * seconds)
    pool = Pool(port, connections, expected=total)
    for _ in range(connections):
        pool.open()
    await asyncio.sleep(0.2)  # connections open before the clock starts
    start = time.perf_counter()
    for i in range(total):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        pool.send(due, requests[i % len(requests)])
    # Bounded: whatever has not come back DRAIN_TIMEOUT after the last send counts as lost.
    try:
        async with asyncio.timeout(DRAIN_TIMEOUT):
            await pool.finished.wait()
    except TimeoutError:
        pass
    return summarize(pool, total, rate, time.perf_counter() - start)


def summarize(pool: Pool, total: int, rate: float, elapsed: float) -> dict[str, float]:
    latencies = sorted(pool.latencies)

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1000 if latencies else 0.0

    return {
        "rate": rate,
        "sent": total,
        "completed": len(latencies),
        "achieved_rps": len(latencies) / elapsed,
        "p50_ms": pct(50),
        "p90_ms": pct(90),
        "p99_ms": pct(99),
        "p999_ms": pct(99.9),
        "max_ms": latencies[-1] * 1000 if latencies else 0.0,
        "non_2xx": pool.non_2xx,
        "errors": total - len(latencies),
    }


def build_requests(port: int, tokens: Path, limit: int) -> list[bytes]:
    """One request per token, at most `limit` (a cold token file can be far larger than a run needs)."""
    requests: list[bytes] = []
    with tokens.open() as lines:
        for line in lines:
            if len(requests) >= limit:
                break
            token = line.strip()
            requests.append(
                f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
            )
    return requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--tokens", type=Path, required=True, help="token file, one a line")
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    requests = build_requests(args.port, args.tokens, int(args.rate * args.seconds) + 1)
    # The client makes no reference cycles worth collecting; a GC pause would read as server latency.
    gc.freeze()
    gc.disable()
    result = uvloop.run(drive(args.port, args.rate, args.seconds, requests, args.connections))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
