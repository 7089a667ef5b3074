"""Medians over rounds, and the tables: figures, ratios against the baselines, ratio matrices."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bench.targets import BASELINE_LABELS, BASELINES

MB = 1024 * 1024
# Above this share of the server's core taken by other processes, a row is flagged as noisy.
NOISY = 0.05
# Above this idle share of the server core, a head-to-head pair did not saturate it.
IDLE = 0.05


@dataclass(frozen=True)
class Run:
    """One measured run of one target (one round)."""

    target: str
    round: int
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_request: float
    busy: float  # share of one core the server used during the run
    others: float  # share of the server's core that anything else used meanwhile (noise)
    others_driver: float  # the same on the driver core, besides wrk, the upstream and the harness
    rss_idle: int
    rss_load: int
    non_2xx: int
    socket_errors: int
    token_wraps: int


@dataclass(frozen=True)
class Summary:
    """Medians over the rounds of one target; `spread` is (max - min) / median of req/s."""

    target: str
    rounds: int
    dropped: int  # noisy rounds left out of the medians
    rps: float
    spread: float
    p50_ms: float
    p99_ms: float
    cpu_us: float
    busy: float
    others: float
    others_driver: float
    rss_idle: int
    rss_load: int
    bad: int  # non-2xx responses plus socket errors, summed over rounds
    wraps: int


def summarize(all_runs: Sequence[Run]) -> Summary:
    """Medians over the rounds in which no other process took either core, if there are any."""
    runs = [r for r in all_runs if max(r.others, r.others_driver) <= NOISY] or list(all_runs)

    def median(get: Callable[[Run], float]) -> float:
        return statistics.median(get(run) for run in runs)

    rps = median(lambda r: r.rps)
    return Summary(
        target=runs[0].target,
        rounds=len(runs),
        dropped=len(all_runs) - len(runs),
        rps=rps,
        spread=(max(r.rps for r in runs) - min(r.rps for r in runs)) / rps if rps else 0.0,
        p50_ms=median(lambda r: r.p50_ms),
        p99_ms=median(lambda r: r.p99_ms),
        cpu_us=median(lambda r: r.cpu_us_per_request),
        busy=median(lambda r: r.busy),
        others=median(lambda r: r.others),
        others_driver=median(lambda r: r.others_driver),
        rss_idle=int(median(lambda r: r.rss_idle)),
        rss_load=int(median(lambda r: r.rss_load)),
        bad=sum(r.non_2xx + r.socket_errors for r in all_runs),
        wraps=max(r.token_wraps for r in all_runs),
    )


def _shared(others: float, others_driver: float) -> str:
    if max(others, others_driver) <= NOISY:
        return ""
    return f"cores shared: others took {others:.0%} of core 0, {others_driver:.0%} of core 1"


def _ratio(value: float, base: float | None) -> str:
    return f"{value / base:.2f}x" if base else "-"


def main_table(summaries: dict[str, Summary], problems: dict[str, str]) -> str:
    base = {name: summaries.get(name) for name in BASELINES}
    headers = ["target", "req/s", "±", "p50 ms", "p99 ms", "CPU µs/req", "core 0", "RSS idle→load MB"]
    headers += [f"req/s÷{BASELINE_LABELS[name][0]}" for name in BASELINES]
    headers += [f"CPU÷{BASELINE_LABELS[name][0]}" for name in BASELINES]
    rows = []
    for name, s in summaries.items():
        flags = []
        if s.bad:
            flags.append(f"{s.bad} errors/non-2xx!")
        if shared := _shared(s.others, s.others_driver):
            flags.append(shared)
        if s.dropped:
            flags.append(f"{s.dropped} noisy round(s) left out")
        if s.wraps:
            flags.append("tokens repeated: not fully cold")
        row = [
            name,
            f"{s.rps:,.0f}",
            f"{s.spread:.0%}",
            f"{s.p50_ms:.2f}",
            f"{s.p99_ms:.2f}",
            f"{s.cpu_us:.0f}",
            f"{s.busy:.0%}",
            f"{s.rss_idle / MB:.0f}→{s.rss_load / MB:.0f}",
        ]
        row += [_ratio(s.rps, b.rps if b else None) for b in base.values()]
        row += [_ratio(s.cpu_us, b.cpu_us if b else None) for b in base.values()]
        rows.append(row + ["  ".join(flags)])
    lines = _grid([*headers, ""], rows)
    lines += [f"{name}: {why}" for name, why in problems.items()]
    lines.append("÷: " + ", ".join(f"{short} = {full} ({name})" for name, (short, full) in BASELINE_LABELS.items()))
    return "\n".join(lines)


def ratio_matrix(summaries: dict[str, Summary], title: str, get: Callable[[Summary], float]) -> str:
    """Every target against every other: cell = row ÷ column."""
    names = list(summaries)
    rows = [
        [f"[{i + 1}] {row}"] + [_ratio(get(summaries[row]), get(summaries[col])) for col in names]
        for i, row in enumerate(names)
    ]
    return "\n".join([title, *_grid(["", *[f"[{i + 1}]" for i in range(len(names))]], rows)])


def summarize_fixed(results: Sequence[dict[str, float]]) -> dict[str, float]:
    """Medians of the fixed-rate runs of one target, field by field; lost and non-2xx summed; p99's range."""
    summary = {key: statistics.median(r[key] for r in results) for key in results[0]}
    for key in ("errors", "non_2xx"):
        summary[key] = sum(r[key] for r in results)
    summary["p99_min_ms"] = min(r["p99_ms"] for r in results)
    summary["p99_max_ms"] = max(r["p99_ms"] for r in results)
    summary["runs"] = len(results)
    return summary


def fixed_rate_table(results: dict[str, dict[str, float]]) -> str:
    headers = ["target", "runs", "max req/s", "offered req/s", "achieved", "p50 ms", "p90 ms", "p99 ms", "p99 range"]
    rows = []
    for name, r in results.items():
        rates = [f"{r[key]:,.0f}" for key in ("max_rps", "rate", "achieved_rps")]
        latencies = [f"{r[key]:.2f}" for key in ("p50_ms", "p90_ms", "p99_ms")]
        spread = f"{r['p99_min_ms']:.2f}–{r['p99_max_ms']:.2f}"
        outcome = [f"{r['errors']:.0f}/{r['non_2xx']:.0f}", _shared(r["others"], r["others_driver"])]
        rows.append([name, f"{r['runs']:.0f}", *rates, *latencies, spread, *outcome])
    return "\n".join(_grid([*headers, "lost/non-2xx", ""], rows))


def clean_pair_round(result: dict[str, float]) -> bool:
    """The pair kept the server core busy: when it idles, a target waited (on its wrk or the upstream) rather than
    ran, and the two did not meet the same conditions. Others using the core (the VM's steal included) hit both
    alike, so they are reported in the JSON but do not disqualify a round."""
    return result["idle"] <= IDLE


def head_to_head_table(pairs: dict[tuple[str, str], list[dict[str, float]]]) -> str:
    """Per pair: CPU µs/request of each (medians over the rounds) and first ÷ second as a throughput ratio (the
    inverse ratio of CPU per request), its median and its range over the rounds. Rounds in which the core was not
    saturated by the pair are left out when a clean round remains (see clean_pair_round)."""
    headers = ["first", "second", "rounds", "CPU µs/req", "core share", "first ÷ second", "range"]
    rows = []
    for (first, second), all_results in pairs.items():
        results = [r for r in all_results if clean_pair_round(r)] or all_results
        ratios = [r["second_cpu_us"] / r["first_cpu_us"] for r in results]
        cpu = [statistics.median(r[key] for r in results) for key in ("first_cpu_us", "second_cpu_us")]
        share = [statistics.median(r[key] for r in results) for key in ("first_share", "second_share")]
        dropped = len(all_results) - len(results)
        flag = f"{dropped} round(s) left out (core 0 idle more than {IDLE:.0%})" if dropped else ""
        if not any(clean_pair_round(r) for r in results):
            flag = "no round had core 0 saturated by the pair alone: the ratio may mislead"
        rows.append(
            [
                first,
                second,
                str(len(results)),
                f"{cpu[0]:.0f} / {cpu[1]:.0f}",
                f"{share[0]:.0%} / {share[1]:.0%}",
                f"{statistics.median(ratios):.2f}x",
                f"{min(ratios):.2f}–{max(ratios):.2f}",
                flag,
            ]
        )
    return "\n".join(_grid([*headers, ""], rows))


def _grid(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=False)]

    def line(cells: Sequence[str]) -> str:
        first, *rest = (str(c) for c in cells)
        cells = [first.ljust(widths[0]), *(c.rjust(w) for c, w in zip(rest, widths[1:], strict=False))]
        return "  ".join(cells).rstrip()

    return [line(headers), "  ".join("-" * w for w in widths).rstrip(), *(line(row) for row in rows)]
