"""Closed-loop load with wrk: a Lua script gives every request the next token of a file."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench.system import DRIVER_CORE, pinned

CONNECTIONS = 64
# One wrk thread: wrk has a single core, and one thread keeps the token order strictly sequential.
THREADS = 1

# A warm set (at most PRELOAD tokens) is formatted into requests once, at init, so that the driver spends
# as little as it can per request; a cold set (200k tokens is >100 MB) is read as a stream instead.
# Both start over at the end of the file, counting wraps: a "cold" run is only cold while wraps == 0.
# No response() hook: it would make wrk parse every response into Lua.
LUA = """
local path = %(path)s
local preload = %(preload)d
local f = nil
local cache = {}
local n, i = 0, 0
wraps = 0
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

local function format(token)
  return wrk.format("GET", "/", {["Authorization"] = "Bearer " .. token})
end

function init(args)
  f = assert(io.open(path, "r"))
  for line in f:lines() do
    n = n + 1
    if n > preload then
      cache, n = nil, 0
      f:seek("set", 0)
      return
    end
    cache[n] = format(line)
  end
  f:close()
end

function request()
  if cache then
    i = i + 1
    if i > n then
      i, wraps = 1, wraps + 1
    end
    return cache[i]
  end
  local token = f:read("*l")
  if token == nil then
    wraps = wraps + 1
    f:seek("set", 0)
    token = f:read("*l")
  end
  return format(token)
end

function done(summary, latency, requests)
  local w = 0
  for _, t in ipairs(threads) do w = w + t:get("wraps") end
  local e = summary.errors
  io.write(string.format(
    "BENCH_RESULT requests=%%d duration_us=%%d p50_us=%%d p99_us=%%d max_us=%%d "
    .. "connect=%%d read=%%d write=%%d status=%%d timeout=%%d wraps=%%d\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency.max,
    e.connect, e.read, e.write, e.status, e.timeout, w))
end
"""
PRELOAD = 10_000


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    non_2xx: int  # wrk counts statuses >= 400 here
    socket_errors: int
    wraps: int

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


def write_script(directory: Path, tokens: Path) -> Path:
    script = directory / f"wrk-{tokens.stem}.lua"
    quoted = '"' + str(tokens).replace("\\", "\\\\").replace('"', '\\"') + '"'
    script.write_text(LUA % {"path": quoted, "preload": PRELOAD})
    return script


def run(url: str, script: Path, seconds: float, connections: int = CONNECTIONS) -> WrkResult:
    """One wrk run on the driver core; raises RuntimeError with wrk's output if it gives no result."""
    argv = [
        "wrk",
        f"-t{THREADS}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "5s",
        "-s",
        str(script),
        url,
    ]
    done = subprocess.run(pinned(DRIVER_CORE, argv), capture_output=True, text=True, timeout=seconds + 60, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            return parse(line)
    raise RuntimeError(f"wrk gave no result (exit {done.returncode}): {done.stdout[-500:]} {done.stderr[-500:]}")


def parse(line: str) -> WrkResult:
    fields = {key: int(float(value)) for key, value in (item.split("=") for item in line.split()[1:])}
    return WrkResult(
        requests=fields["requests"],
        seconds=fields["duration_us"] / 1e6,
        p50_ms=fields["p50_us"] / 1000,
        p99_ms=fields["p99_us"] / 1000,
        max_ms=fields["max_us"] / 1000,
        non_2xx=fields["status"],
        socket_errors=fields["connect"] + fields["read"] + fields["write"] + fields["timeout"],
        wraps=fields["wraps"],
    )
