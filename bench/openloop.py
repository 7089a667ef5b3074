"""The fixed-rate (open-loop) client: bench/openloop.c, built here with the system's C compiler.

wrk is closed-loop and Debian has no wrk2. The client was first written in Python (asyncio + uvloop), and on a
faster machine it became the bottleneck itself: against nginx alone its p99 was 4.3 ms at 5,000 req/s and
14 ms at 8,000 req/s, while the gateway's half-maximum rate there is 5,000-8,000 req/s. In C the same test
gives a p99 under 1 ms (see bench/README.md).

Run by hand: python -m bench.openloop --port P --rate R --seconds S --tokens FILE; prints one JSON line.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

SOURCE = Path(__file__).with_name("openloop.c")


def build(directory: Path) -> Path:
    """Compile the client into `directory` (once per source change); SystemExit if there is no C compiler."""
    binary = directory / "openloop"
    if binary.exists() and binary.stat().st_mtime >= SOURCE.stat().st_mtime:
        return binary
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise SystemExit("bench: the fixed-rate client needs a C compiler (Debian: apt-get install gcc libc6-dev)")
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run([compiler, "-O2", "-Wall", "-o", str(binary), str(SOURCE)], check=True)  # noqa: S603
    return binary


def argv(binary: Path, port: int, rate: float, seconds: float, tokens: Path, connections: int = 64) -> list[str]:
    return [str(binary), str(port), f"{rate:.10g}", f"{seconds:.10g}", str(tokens), str(connections)]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.openloop", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--tokens", type=Path, required=True, help="token file, one a line")
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    binary = build(Path(__file__).resolve().parent / "results" / "bin")
    command = argv(binary, args.port, args.rate, args.seconds, args.tokens, args.connections)
    sys.exit(subprocess.run(command, check=False).returncode)  # noqa: S603


if __name__ == "__main__":
    main()
