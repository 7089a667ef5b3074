"""`gateway run --workers N`: N processes on one port (SO_REUSEPORT), supervised by this one.

Each worker is a whole gateway (own event loop, own revocation mirror); the kernel spreads connections across
them. Metrics go to a shared PROMETHEUS_MULTIPROC_DIR so any worker's /metrics shows the sum. A worker that dies
is restarted (with backoff if it keeps dying); SIGTERM and SIGHUP are passed on to every worker.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

log = logging.getLogger(__name__)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_MAX_BACKOFF = 10.0
_STABLE = 30.0  # a worker up this long before it died starts the backoff over


class Supervisor:
    def __init__(self, config_path: str, workers: int, drain_timeout: float) -> None:
        self.config_path = config_path
        self.count = workers
        self.drain_timeout = drain_timeout
        self.procs: dict[int, subprocess.Popen[bytes]] = {}  # slot -> process
        self._restarts: dict[int, tuple[int, float]] = {}  # slot -> (recent failures, not before)
        self._spawned: dict[int, float] = {}  # slot -> when its process was started (monotonic)
        self._stopping = False
        self._hup = False
        self.metrics_dir = ""

    def run(self) -> int:
        owned_dir = MULTIPROC_ENV not in os.environ
        metrics_dir = os.environ.get(MULTIPROC_ENV) or tempfile.mkdtemp(prefix="gateway-metrics-")
        _wipe(metrics_dir)  # files from an earlier run would be summed into this one's
        self.metrics_dir = metrics_dir
        env = {**os.environ, MULTIPROC_ENV: metrics_dir}
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        log.info("starting workers", extra={"workers": self.count, "metrics_dir": metrics_dir})
        try:
            for slot in range(self.count):
                self._spawn(slot, env)
            while not self._stopping:
                self._supervise(env)
                time.sleep(0.1)
            return self._shutdown()
        finally:
            if owned_dir:
                shutil.rmtree(metrics_dir, ignore_errors=True)

    def _spawn(self, slot: int, env: dict[str, str]) -> None:
        cmd = [sys.executable, "-m", "gateway", "run", "--config", self.config_path, "--worker"]
        # The worker starts with SIGHUP ignored (kept across exec) until it installs its own handler: a reload
        # passed on while it is still starting must not kill it.
        self.procs[slot] = subprocess.Popen(cmd, env=env, preexec_fn=_ignore_hup)  # noqa: S603, PLW1509 - no threads here
        self._spawned[slot] = time.monotonic()

    def _supervise(self, env: dict[str, str]) -> None:
        hup = self._hup
        if hup:
            self._hup = False
            self._signal_all(signal.SIGHUP)
        now = time.monotonic()
        for slot, proc in list(self.procs.items()):
            code = proc.poll()
            if code is None:
                continue
            failures, not_before = self._restarts.get(slot, (0, 0.0))
            if not_before == 0.0:
                if now - self._spawned.get(slot, now) >= _STABLE:
                    failures = 0  # it had been running fine: this death is not part of a crash loop
                failures += 1
                not_before = now + min(_MAX_BACKOFF, 0.1 * 2**failures)
                self._restarts[slot] = (failures, not_before)
                log.error("worker exited; restarting", extra={"pid": proc.pid, "code": code, "slot": slot})
                _mark_dead(proc.pid, self.metrics_dir)
            if now >= not_before or hup:
                problem = self._config_problem()
                if problem is not None:
                    # The file changed since the running workers read it, and does not load: a worker started
                    # from it would only die again. Wait for a fix (a SIGHUP retries at once).
                    self._restarts[slot] = (failures, now + _MAX_BACKOFF)
                    log.error(
                        "worker not restarted: the config file does not load; fix it and send SIGHUP",
                        extra={"slot": slot, "error": problem},
                    )
                    continue
                self._restarts[slot] = (failures, 0.0)
                self._spawn(slot, env)

    def _config_problem(self) -> str | None:
        from gateway import configfile  # the supervisor loads no more than it needs until a worker dies

        try:
            configfile.load(Path(self.config_path))
        except Exception as exc:  # noqa: BLE001 - whatever stops a worker from starting
            return str(exc)
        return None

    def _shutdown(self) -> int:
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.drain_timeout + 5
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return 0

    def _signal_all(self, sig: signal.Signals) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(sig)

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self._stopping = True

    def _on_hup(self, signum: int, frame: FrameType | None) -> None:
        self._hup = True


def usable_cpus(cgroup_cpu_max: str = "/sys/fs/cgroup/cpu.max") -> int:
    """The CPUs this process may use: its affinity (taskset, cpusets), less a cgroup v2 CPU quota (a container's
    CPU limit). os.cpu_count() is the host's: 16 workers in a pod limited to one CPU."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        with open(cgroup_cpu_max) as file:
            quota, period = file.read().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota readable: the affinity decides
    return max(1, cpus)


def address_in_use(addresses: list[tuple[str, int]]) -> str | None:
    """The first `host:port` something already listens on, or None. Workers bind with SO_REUSEPORT, which would let
    a second `gateway run --workers` join the first's ports silently and split its traffic (and scrapes)."""
    for host, port in addresses:
        if port == 0:
            continue
        for family, kind, proto, _, address in socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM):
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio binds: TIME_WAIT is fine
                try:
                    probe.bind(address)
                except OSError:
                    return f"{host}:{port}"
    return None


def _ignore_hup() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def _wipe(directory: str) -> None:
    for name in os.listdir(directory):
        if name.endswith(".db"):
            os.remove(os.path.join(directory, name))


def _mark_dead(pid: int, metrics_dir: str) -> None:
    """Drop the dead worker's live gauges (its counters stay: they are part of the totals)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, metrics_dir)  # type: ignore[no-untyped-call]  # untyped in prometheus_client
