"""Host plumbing: system packages, CPU pinning, free ports, and per-process CPU time and memory from /proc."""

from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# Debian packages per command the suite runs (cc builds the fixed-rate client, bench/openloop.c).
PACKAGES = {"wrk": ("wrk",), "nginx": ("nginx",), "haproxy": ("haproxy",), "cc": ("gcc", "libc6-dev")}
CLK_TCK = os.sysconf("SC_CLK_TCK")
SERVER_CORE = 0
DRIVER_CORE = 1
# Children run `python -m bench.…` from the repository root (bench/ is not an installed package).
REPO = Path(__file__).resolve().parent.parent


def ensure_packages() -> None:
    """Install whatever of wrk, nginx, haproxy and a C compiler is missing; `apt-get update` only when something is."""
    missing = [pkg for cmd, pkgs in PACKAGES.items() if shutil.which(cmd) is None for pkg in pkgs]
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise SystemExit(f"bench: missing {', '.join(missing)} and no apt-get to install them")
    print(f"bench: installing {' '.join(missing)} with apt-get", flush=True)
    # Another apt-get may hold the lock (e.g. a provisioning step): wait for it rather than fail.
    apt = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "-qq"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([*apt, "update"], check=True, env=env)
    subprocess.run([*apt, "install", "-y", "--no-install-recommends", *missing], check=True, env=env)


@functools.cache
def can_pin() -> bool:
    """Pinning needs both cores 0 and 1 and the taskset tool.

    Cached: the answer must come from before the harness pins itself to the driver core.
    """
    return {SERVER_CORE, DRIVER_CORE} <= os.sched_getaffinity(0) and shutil.which("taskset") is not None


def pinned(core: int, argv: Sequence[str]) -> list[str]:
    """`argv` run on one core (taskset execs, so the PID is the program's own)."""
    return ["taskset", "-c", str(core), *argv] if can_pin() else list(argv)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """Block until something accepts on 127.0.0.1:port; fail early if `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with code {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port} after {timeout:.0f}s")


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry.name))[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def process_tree(pid: int) -> list[int]:
    """`pid` and all its live descendants (nginx master + worker, forked gateway workers)."""
    children = _children_map()
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def _stat_fields(pid: int) -> list[str]:
    # The command name is in parentheses and may contain spaces: split after the last ')'.
    raw = Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rindex(")") + 2 :].split()


def cpu_seconds(pid: int) -> float:
    """utime+stime of the tree, plus cutime+cstime so reaped children are not lost."""
    ticks = 0
    for member in process_tree(pid):
        try:
            fields = _stat_fields(member)
        except OSError:
            continue
        # fields[0] is field 3 (state): utime, stime, cutime, cstime are fields 14-17.
        ticks += sum(int(value) for value in fields[11:15])
    return ticks / CLK_TCK


def core_busy_seconds(core: int) -> float:
    """Time core `core` spent on anything but idle, from /proc/stat (to see what else ran on the server core)."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{core} "):
            user, nice, system, _idle, _iowait, _irq, _softirq, steal = (int(v) for v in line.split()[1:9])
            # Not irq/softirq: much of that is the benchmark's own loopback traffic. Steal is the hypervisor's.
            return (user + nice + system + steal) / CLK_TCK
    raise RuntimeError(f"no cpu{core} in /proc/stat")


def core_idle_seconds(core: int) -> float:
    """Time core `core` spent idle (idle + iowait in /proc/stat)."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{core} "):
            idle, iowait = (int(v) for v in line.split()[4:6])
            return (idle + iowait) / CLK_TCK
    raise RuntimeError(f"no cpu{core} in /proc/stat")


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU seconds so far: the server's, the driver side's (harness, its reaped children such as wrk, and
    the upstream nginx), and each core's busy time; differences of two tell who else used the cores."""

    server: float
    driver: float
    server_core: float
    driver_core: float

    @classmethod
    def take(cls, server_pid: int, upstream_pid: int) -> CpuSnapshot:
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        harness = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
        return cls(
            server=cpu_seconds(server_pid),
            driver=harness + cpu_seconds(upstream_pid),
            server_core=core_busy_seconds(SERVER_CORE),
            driver_core=core_busy_seconds(DRIVER_CORE),
        )


def rss_bytes(pid: int) -> int:
    """VmRSS summed over the tree."""
    total = 0
    for member in process_tree(pid):
        try:
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


@dataclass
class Process:
    """A server this suite started, in its own session so that stopping it stops its children too."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=10)


def spawn(name: str, argv: Sequence[str], log: Path, env: dict[str, str] | None = None) -> Process:
    with log.open("ab") as out:
        popen = subprocess.Popen(
            list(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=REPO,
            start_new_session=True,
        )
    return Process(name, popen, log)
