"""`python -m bench` (or `make bench`): every target, interleaved over rounds, then the tables."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import runner, wrk
from bench.gateway_server import Compat
from bench.report import (
    Run,
    fixed_rate_table,
    head_to_head_table,
    main_table,
    ratio_matrix,
    summarize,
    summarize_fixed,
)
from bench.servers import TargetError, TargetSkipped, start_nginx
from bench.system import DRIVER_CORE, can_pin, ensure_packages
from bench.targets import BY_NAME, TARGETS, Bench, Target
from bench.tokens import RESULTS, WARM_TOKENS, ensure_keys, token_file

FIXED_RATE_TARGETS = "gateway-rs256-warm,plain-aiohttp-pyjwt"
# The ratio targets, each measured head to head (both on core 0 at once) as well as from separate runs.
PAIRS = (
    "gateway-rs256-warm:gateway-none,gateway-rs256-warm:plain-aiohttp-pyjwt,"
    "gateway-rs256-cold:plain-aiohttp-pyjwt,gateway-rs256-warm:haproxy-jwt-rs256"
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--rounds", type=int, default=None, help="rounds over all targets (default 3; quick 1)")
    parser.add_argument("--duration", type=float, default=None, help="seconds per run (default 10; quick 3)")
    parser.add_argument("--warmup", type=float, default=None, help="seconds of load before each run (default 2)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round of 3 s, fewer cold tokens")
    parser.add_argument("--only", help="comma-separated target names (see --list)")
    parser.add_argument("--list", action="store_true", help="print the target names and exit")
    parser.add_argument("--connections", type=int, default=wrk.CONNECTIONS, help="wrk connections (64)")
    parser.add_argument("--cold-tokens", type=int, default=None, help="distinct tokens per cold set (200,000)")
    parser.add_argument(
        "--fixed-rate", default=FIXED_RATE_TARGETS, help="targets to measure at half their max rate ('' for none)"
    )
    parser.add_argument(
        "--pairs",
        default=None,
        help="first:second,... to run head to head on core 0, once per round ('' for none; default: the issue's "
        "four, or with --only those of them whose targets are both selected)",
    )
    parser.add_argument("--pairs-only", action="store_true", help="only the head-to-head runs")
    parser.add_argument("--soak", action="store_true", help="only a soak: steady load, RSS every minute")
    parser.add_argument("--soak-seconds", type=float, default=300.0)
    args = parser.parse_args()
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.duration = args.duration or (3.0 if args.quick else 10.0)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0)
    args.cold_tokens = args.cold_tokens or (20_000 if args.quick else 200_000)
    if args.pairs is None:
        selected = {name.strip() for name in (args.only or "").split(",")}
        wanted = [pair for pair in PAIRS.split(",") if not args.only or set(pair.split(":")) <= selected]
        args.pairs = "" if args.soak else ",".join(wanted)
    args.pair_targets = parse_pairs(args.pairs)
    return args


def parse_pairs(text: str) -> list[tuple[Target, Target]]:
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        names = [name.strip() for name in item.split(":")]
        if len(names) != 2 or any(name not in BY_NAME for name in names):
            raise SystemExit(f"bench: --pairs wants first:second of two target names (see --list), not {item!r}")
        pairs.append((BY_NAME[names[0]], BY_NAME[names[1]]))
    return pairs


def select(only: str | None, soak: bool) -> list[Target]:
    if not only:
        return [BY_NAME["gateway-rs256-warm"]] if soak else list(TARGETS)
    names = [name.strip() for name in only.split(",") if name.strip()]
    unknown = [name for name in names if name not in BY_NAME]
    if unknown:
        raise SystemExit(f"bench: unknown target(s) {', '.join(unknown)}; known: {', '.join(BY_NAME)}")
    return [target for target in TARGETS if target.name in names]


def prepare_tokens(targets: list[Target], cold_tokens: int) -> dict[str, Path]:
    keys = ensure_keys()
    wanted = sorted({t.tokens for t in targets} | {t.warmup_tokens for t in targets})
    files = {}
    for name in wanted:
        alg, kind = name.split("-")
        files[name] = token_file(keys[alg.upper()], kind, WARM_TOKENS if kind == "warm" else cold_tokens)
    return files


def main() -> None:
    args = parse_args()
    if args.list:
        print("\n".join(BY_NAME))
        return
    targets = select(args.only, args.soak)
    # On SIGTERM (e.g. `timeout`), unwind like Ctrl-C so every server started here is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ensure_packages()
    if can_pin():
        # The harness itself (RSS sampling, bookkeeping) stays off the server's core.
        os.sched_setaffinity(0, {DRIVER_CORE})
    else:
        print("bench: WARNING: cores 0 and 1 are not both available; running unpinned", flush=True)
    token_files = prepare_tokens(targets + [t for pair in args.pair_targets for t in pair], args.cold_tokens)
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        workdir = Path(tmp)
        upstream, upstream_port = start_nginx(workdir, DRIVER_CORE)
        try:
            scripts = {name: wrk.write_script(workdir, path) for name, path in token_files.items()}
            bench = Bench(
                workdir, ensure_keys(), token_files, scripts, upstream.pid, upstream_port, Compat(), args.connections
            )
            if args.soak:
                runner.soak(targets[0], bench, args.soak_seconds, probe=5.0)
                return
            execute(args, targets, bench)
        finally:
            upstream.stop()


def execute(args: argparse.Namespace, targets: list[Target], bench: Bench) -> None:
    started = time.time()
    measured = commit()  # before the runs: files edited meanwhile must not relabel them
    runs: dict[str, list[Run]] = {}
    problems: dict[str, str] = {}
    if not args.pairs_only:
        runs, problems = runner.rounds(targets, bench, args.rounds, args.duration, args.warmup)
    summaries = {t.name: summarize(runs[t.name]) for t in targets if t.name in runs}
    # As many fixed-rate runs as rounds, interleaved: one run's p99 is at the mercy of a slow spell of the VM.
    fixed_runs: dict[str, list[dict[str, float]]] = {}
    fixed_names = [n for n in args.fixed_rate.split(",") if n in summaries]
    for number in range(1, args.rounds + 1):
        for name in [n for n in fixed_names if f"{n} (fixed rate)" not in problems]:
            rps = summaries[name].rps
            print(f"bench: fixed rate {number}/{args.rounds} {name} at half of {rps:,.0f} req/s ...", flush=True)
            try:
                result = runner.fixed_rate(BY_NAME[name], bench, rps, args.duration, args.warmup)
            except (TargetError, RuntimeError, OSError, subprocess.SubprocessError) as exc:
                problems[f"{name} (fixed rate)"] = f"FAILED: {exc}"
                continue
            fixed_runs.setdefault(name, []).append(result)
            print(f"bench:   p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms", flush=True)
    fixed = {name: summarize_fixed(results) for name, results in fixed_runs.items()}
    pairs = head_to_head(args, bench, problems)

    print()
    print(
        f"Token Gateway bench — {args.rounds} round(s) × {args.duration:g} s per target, wrk -t1 -c{args.connections}; "
        f"server on core 0, wrk + upstream nginx on core 1; medians over rounds"
    )
    print(
        f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}, {measured}"
    )
    if summaries:
        print()
        print(main_table(summaries, problems))
    elif problems:
        print("\n".join(f"{name}: {why}" for name, why in problems.items()))
    for note in bench.compat.notes:
        print(note)
    if len(summaries) > 1:
        print()
        print(ratio_matrix(summaries, "req/s, row ÷ column (>1: row serves more)", lambda s: s.rps))
        print()
        print(ratio_matrix(summaries, "CPU µs/request, row ÷ column (<1: row is cheaper)", lambda s: s.cpu_us))
    if fixed:
        print()
        print(
            "Latency at a fixed rate of half the target's max (open-loop, timed from when each request was due; "
            "medians over the runs, and the range of p99):"
        )
        print(fixed_rate_table(fixed))
    if pairs:
        print()
        print(
            "Head to head: both targets on core 0 at once, each under its own wrk, for the same seconds (the VM's slow "
            "spells hit both). first ÷ second = second's CPU µs/req ÷ first's: the throughput ratio at equal CPU. Sharing "
            "a core changes what a request costs (other batching, shared caches), not by the same factor for every "
            "target: the µs differ from the table above, and the ratio is a comparison under identical conditions, "
            "not the same quantity as a ratio of separate runs."
        )
        print(head_to_head_table(pairs))
    save(args, runs, fixed, fixed_runs, pairs, problems, started, measured)


def head_to_head(
    args: argparse.Namespace, bench: Bench, problems: dict[str, str]
) -> dict[tuple[str, str], list[dict[str, float]]]:
    """Each pair once per round; like the rounds above, each round starts one pair further along."""
    pairs: dict[tuple[str, str], list[dict[str, float]]] = {}
    for number in range(1, args.rounds + 1):
        shift = (number - 1) % max(1, len(args.pair_targets))
        for first, second in args.pair_targets[shift:] + args.pair_targets[:shift]:
            key = (first.name, second.name)
            if f"{first.name} : {second.name}" in problems:
                continue
            print(f"bench: head to head {number}/{args.rounds} {first.name} : {second.name} ...", end=" ", flush=True)
            try:
                result = runner.head_to_head(first, second, bench, args.duration, args.warmup)
            except (TargetError, RuntimeError, OSError, subprocess.SubprocessError) as exc:
                kind = "SKIPPED" if isinstance(exc, TargetSkipped) else "FAILED"
                problems[f"{first.name} : {second.name}"] = f"{kind}: {exc}"
                print(kind, flush=True)
                print(f"  {exc}".replace("\n", "\n  "), flush=True)
                continue
            pairs.setdefault(key, []).append(result)
            ratio = result["second_cpu_us"] / result["first_cpu_us"]
            print(
                f"{result['first_cpu_us']:.0f} / {result['second_cpu_us']:.0f} µs CPU/req, ratio {ratio:.2f}x",
                flush=True,
            )
    return pairs


def commit() -> str:
    """The commit measured, marked `+changes` when tracked files differ from it: a figure is quoted with it."""
    git = ["git", "-C", str(Path(__file__).resolve().parent)]
    try:
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        changed = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown commit"
    return head.stdout.strip() + ("+changes" if changed.stdout.strip() else "")


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")


def save(
    args: argparse.Namespace,
    runs: dict[str, list[Run]],
    fixed: dict[str, dict[str, float]],
    fixed_runs: dict[str, list[dict[str, float]]],
    pairs: dict[tuple[str, str], list[dict[str, float]]],
    problems: dict[str, str],
    started: float,
    measured: str,
) -> None:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / time.strftime("run-%Y%m%d-%H%M%S.json", time.localtime(started))
    record = {
        "commit": measured,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "machine": {"node": platform.node(), "arch": platform.machine(), "cpus": os.cpu_count(), "cpu": cpu_model()},
        "python": platform.python_version(),
        "args": {k: v for k, v in vars(args).items() if k != "pair_targets"},
        "runs": {name: [dataclasses.asdict(run) for run in rs] for name, rs in runs.items()},
        "fixed_rate": fixed,
        "fixed_rate_runs": fixed_runs,
        "head_to_head": {f"{first}:{second}": results for (first, second), results in pairs.items()},
        "problems": problems,
    }
    path.write_text(json.dumps(record, indent=1))
    print(f"\nraw figures: {path}")


if __name__ == "__main__":
    main()
