"""Redis for tests: REDIS_URL if set, else the shared one on 127.0.0.1:6379, else a private redis-server.

Tests that stop or break Redis always get a private `redis-server` on a free port (PrivateRedis). Redis Cluster
tests use REDIS_CLUSTER_URL if set, else three private redis-servers made into a cluster (PrivateCluster).
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
CLUSTER_HOW_TO = (
    "Redis Cluster tests need REDIS_CLUSTER_URL=redis+cluster://host:port[,host:port] (a cluster whose slots are "
    "all served) or redis-server on PATH to start one (apt-get install redis-server)"
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
        self.bus_port = free_port()  # in cluster mode
        self.dir = Path(tempfile.mkdtemp(prefix="gw-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, cluster: bool = False) -> None:
        # The cluster bus port is given too: the default (port + 10000) overflows for ports above 55535.
        extra = ["--cluster-enabled", "yes", "--cluster-config-file", str(self.dir / "nodes.conf"),
                 "--cluster-port", str(self.bus_port)] if cluster else []  # fmt: skip
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log"), *extra],
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


class PrivateCluster:
    """Three redis-servers in cluster mode on free ports, the 16384 slots split between them, no replicas."""

    def __init__(self, nodes: int = 3) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError(CLUSTER_HOW_TO)
        self.nodes = [PrivateRedis() for _ in range(nodes)]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    def start(self) -> None:
        for node in self.nodes:
            node.start(cluster=True)
        clients = [redis.Redis(port=node.port, socket_timeout=5) for node in self.nodes]
        try:
            share = 16384 // len(clients) + 1
            for i, client in enumerate(clients):
                client.execute_command("CLUSTER ADDSLOTS", *range(i * share, min((i + 1) * share, 16384)))
            for node in self.nodes[1:]:
                clients[0].execute_command("CLUSTER MEET", "127.0.0.1", node.port, node.bus_port)
            deadline = time.monotonic() + 20
            while not all(self._settled(client) for client in clients):
                if time.monotonic() > deadline:
                    raise RuntimeError("private Redis Cluster did not reach cluster_state:ok")
                time.sleep(0.05)
        finally:
            for client in clients:
                client.close()

    def move_slot_of(self, key: str) -> tuple[int, int]:
        """Move the slot of `key`, with its keys, to another node, as a resharding does (IMPORTING / MIGRATING,
        MIGRATE, SETSLOT NODE on every node). Returns the ports of the old and the new owner."""
        clients = {node.port: redis.Redis(port=node.port, socket_timeout=5) for node in self.nodes}
        try:
            any_client = next(iter(clients.values()))
            slot = int(any_client.execute_command("CLUSTER KEYSLOT", key))
            ids = {port: client.execute_command("CLUSTER MYID").decode() for port, client in clients.items()}
            ranges = any_client.execute_command("CLUSTER SLOTS")  # [start, end, [host, port, id], ...]
            source = next(int(r[2][1]) for r in ranges if int(r[0]) <= slot <= int(r[1]))
            target = next(port for port in clients if port != source)
            clients[target].execute_command("CLUSTER SETSLOT", slot, "IMPORTING", ids[source])
            clients[source].execute_command("CLUSTER SETSLOT", slot, "MIGRATING", ids[target])
            while keys := clients[source].execute_command("CLUSTER GETKEYSINSLOT", slot, 100):
                clients[source].execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
            for client in clients.values():
                client.execute_command("CLUSTER SETSLOT", slot, "NODE", ids[target])
            return source, target
        finally:
            for client in clients.values():
                client.close()

    def owner_of(self, key: str) -> PrivateRedis:
        """The node serving `key`'s slot."""
        client = redis.Redis(port=self.nodes[0].port, socket_timeout=5)
        try:
            slot = int(client.execute_command("CLUSTER KEYSLOT", key))
            ranges = client.execute_command("CLUSTER SLOTS")
        finally:
            client.close()
        port = next(int(r[2][1]) for r in ranges if int(r[0]) <= slot <= int(r[1]))
        return next(node for node in self.nodes if node.port == port)

    def subscribers(self, port: int, channel: str) -> int:
        client = redis.Redis(port=port, socket_timeout=5)
        try:
            return int(client.execute_command("PUBSUB NUMSUB", channel)[0][1])  # [(channel, count)]
        finally:
            client.close()

    def _settled(self, client: redis.Redis) -> bool:
        info = client.execute_command("CLUSTER INFO")  # parsed into a dict by redis-py
        return bool(info.get("cluster_state") == "ok" and int(info.get("cluster_known_nodes", 0)) == len(self.nodes))

    def close(self) -> None:
        for node in self.nodes:
            node.close()


def resolve_cluster_url() -> tuple[str, PrivateCluster | None]:
    """The Redis Cluster the suite uses, and the private one to stop afterwards (if one had to be started)."""
    url = os.environ.get("REDIS_CLUSTER_URL")
    if url:
        return url, None
    cluster = PrivateCluster()
    try:
        cluster.start()
    except Exception:
        cluster.close()
        raise
    return cluster.url, cluster


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
