"""The benchmark harness: the published figures rest on it, so its client, parsers and tables are checked here.

bench/openloop.c is built with the system C compiler and run against a real aiohttp server on 127.0.0.1 that
records what reached it; wrk's result line, its Lua script and the report's medians and tables are checked against
values worked out by hand. No wrk, nginx or haproxy is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from bench import openloop, wrk
from bench.report import (
    IDLE,
    MB,
    NOISY,
    Run,
    Summary,
    head_to_head_table,
    main_table,
    ratio_matrix,
    summarize,
    summarize_fixed,
)
from bench.targets import BASELINE_LABELS, BASELINES
from tests.support import serve_app

RATE = 300  # req/s: a few hundred, for one second
SECONDS = 1
TOTAL = RATE * SECONDS
OUTPUT_FIELDS = {
    "rate",
    "sent",
    "completed",
    "achieved_rps",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "p999_ms",
    "max_ms",
    "non_2xx",
    "errors",
    "connect_failures",
}


# --- bench/openloop.c: the fixed-rate client -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The client built from bench/openloop.c; a missing compiler fails (the bench cannot run without one)."""
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.fail("no C compiler (cc or gcc) on PATH: bench/openloop.c cannot be built; install gcc", pytrace=False)
    try:
        return openloop.build(tmp_path_factory.mktemp("openloop"))
    except (SystemExit, subprocess.CalledProcessError) as exc:
        pytest.fail(f"bench/openloop.c did not build (needs gcc and the libc headers): {exc}", pytrace=False)


@dataclass
class Recorder:
    """A server that records every request's Authorization header and arrival time, in arrival order.

    Token `refuse` gets a 401, token `empty` a 204, the others a 200. Request number `hold` (0-based, arrival order)
    is held until request number `release` arrives, or when `release` is -1 for `hold_seconds`; `held_for` is how
    long the server held it."""

    refuse: str = ""
    empty: str = ""
    hold: int = -1
    release: int = -1
    hold_seconds: float = 0.0
    authorizations: list[str] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    released: asyncio.Event = field(default_factory=asyncio.Event)
    held_for: float = 0.0
    port: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        index = len(self.authorizations)
        self.arrivals.append(time.monotonic())
        authorization = request.headers.get("Authorization", "")
        self.authorizations.append(authorization)
        if index == self.release:
            self.released.set()
        if index == self.hold:
            held = time.monotonic()
            if self.release >= 0:
                # Bounded: if the releasing request never came, a 5 s stall would fail the latency bounds.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.released.wait(), 5.0)
            else:
                await asyncio.sleep(self.hold_seconds)
            self.held_for = time.monotonic() - held
        token = authorization.removeprefix("Bearer ")
        if token == self.refuse:
            return web.Response(status=401, text="no")
        if token == self.empty:
            return web.Response(status=204)
        return web.Response(text="ok")


@contextlib.asynccontextmanager
async def serving(recorder: Recorder) -> AsyncIterator[Recorder]:
    app = web.Application()
    app.router.add_get("/", recorder.handle)
    runner, url = await serve_app(app)
    recorder.port = int(url.rsplit(":", 1)[1])
    try:
        yield recorder
    finally:
        await runner.cleanup()


async def run_client(binary: Path, port: int, tokens: Path, connections: int = 64) -> dict[str, float]:
    """One run at RATE for SECONDS, awaited without blocking the loop the server runs on; its JSON line."""
    process = await asyncio.create_subprocess_exec(
        *openloop.argv(binary, port, RATE, SECONDS, tokens, connections),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(30):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert len(lines) == 1, f"one JSON line expected, got {out!r}"
    result: dict[str, float] = json.loads(lines[0])
    assert set(result) == OUTPUT_FIELDS, "bench/runner.py and report.fixed_rate_table read these fields"
    return result


def token_file(path: Path, tokens: list[str]) -> Path:
    path.write_text("".join(f"{token}\n" for token in tokens))
    return path


def test_argv_is_what_the_client_takes() -> None:
    """The arguments go in the order the C client reads them: PORT RATE SECONDS TOKENS CONNECTIONS (64 by default)."""
    command = openloop.argv(Path("/b/openloop"), 8080, 300.0, 2.0, Path("/t/tokens"), 8)
    assert command == ["/b/openloop", "8080", "300", "2", "/t/tokens", "8"]
    assert openloop.argv(Path("/b/openloop"), 1, 10, 2, Path("/t"))[-1] == "64"
    # A fraction of a second is passed on (the C client reads a float); rounded, 0.5 s became "0" and failed.
    assert openloop.argv(Path("/b/openloop"), 1, 10, 2.5, Path("/t"))[3] == "2.5"
    assert openloop.argv(Path("/b/openloop"), 1, 2183.5, 2, Path("/t"))[2] == "2183.5"  # half of an odd max


def test_build_compiles_once(client: Path) -> None:
    """A second build with an unchanged source reuses the binary instead of compiling again."""
    built = client.stat().st_mtime_ns
    assert openloop.build(client.parent) == client
    assert client.stat().st_mtime_ns == built


async def test_openloop_sends_at_the_rate_with_the_tokens_in_order(client: Path, tmp_path: Path) -> None:
    """Exactly rate × seconds requests, spread over the second, each with the next token of the file (cycled);
    a 401 is counted as non-2xx, a 204 is not."""
    tokens = [f"tok-{k}" for k in range(7)]
    # Blank lines are skipped and line ends (CRLF included) stripped: the file holds the same 7 tokens.
    path = tmp_path / "tokens"
    path.write_bytes(b"tok-0\ntok-1\r\n\ntok-2  \ntok-3\ntok-4\ntok-5\ntok-6")
    async with serving(Recorder(refuse="tok-3", empty="tok-5")) as server:
        # One connection: requests reach the server in the order they were due.
        result = await run_client(client, server.port, path, connections=1)
    assert server.authorizations == [f"Bearer {tokens[i % 7]}" for i in range(TOTAL)]
    # 300 = 42 × 7 + 6: tok-0 .. tok-5 are sent 43 times, tok-6 42 times; tok-3's 43 are refused.
    assert result["non_2xx"] == 43
    assert (result["rate"], result["sent"], result["completed"]) == (RATE, TOTAL, TOTAL)
    assert (result["errors"], result["connect_failures"]) == (0, 0)
    # Bounds wide enough for a slow spell of the VM (~150 ms seen here), narrow enough to tell a burst.
    assert abs(result["achieved_rps"] - RATE) < 0.25 * RATE
    # Open loop: the requests are spread over the second, not sent in a burst (the last is due at 299/300 s).
    span = server.arrivals[-1] - server.arrivals[0]
    assert 0.75 < span < 1.5, span
    # A burst (every request due at once) is sent as fast as one connection answers: all in a fraction of a second.
    early = sum(1 for t in server.arrivals if t - server.arrivals[0] < 0.5)
    assert early < 0.8 * TOTAL, early


async def test_openloop_one_stalled_request_shows_in_max_not_in_median(client: Path, tmp_path: Path) -> None:
    """Request 30 is held until request 270 arrives (~800 ms later at 300 req/s) while 63 other connections carry
    on: max (and p99.9, the top one of 300) is the stall, p50 and p99 (the 3rd highest) stay small. The stall is
    long so that a slow spell of the VM (~150 ms seen here) cannot pass for it."""
    tokens = token_file(tmp_path / "tokens", [f"tok-{k}" for k in range(7)])
    async with serving(Recorder(hold=30, release=270)) as server:
        result = await run_client(client, server.port, tokens)
    stall_ms = server.held_for * 1000
    assert 500 < stall_ms < 4000, "request 270 released request 30"
    # The client times from when the request was due, which is before the server saw it: never less than the stall.
    assert stall_ms <= result["max_ms"] < stall_ms + 500
    assert result["p999_ms"] == result["max_ms"]
    assert result["p50_ms"] < 50
    assert result["p99_ms"] < stall_ms / 2
    assert (result["sent"], result["completed"], result["errors"], result["non_2xx"]) == (TOTAL, TOTAL, 0, 0)
    # 64 connections: the arrival order may differ slightly, the counts may not (300 = 42 × 7 + 6).
    counts = Counter(a.removeprefix("Bearer ") for a in server.authorizations)
    assert counts == {**{f"tok-{k}": 43 for k in range(6)}, "tok-6": 42}


async def test_openloop_times_a_backlog_from_when_each_request_was_due(client: Path, tmp_path: Path) -> None:
    """With one connection, request 60 held 200 ms leaves the next ~60 waiting in the backlog: each is timed from
    when it was due (no coordinated omission), so p90 and p99 show the stall while p50 stays small.

    Held for a time rather than until an event: with the only connection busy, no later request can arrive."""
    tokens = token_file(tmp_path / "tokens", ["only"])
    async with serving(Recorder(hold=60, hold_seconds=0.2)) as server:
        result = await run_client(client, server.port, tokens, connections=1)
    stall_ms = server.held_for * 1000
    assert stall_ms <= result["max_ms"] < stall_ms + 500
    # Request 60 + j waited ~200 - j × 3.3 ms: j = 2 (3rd highest, p99) ~193 ms, j = 29 (30th highest, p90) ~100 ms.
    # Timed from when each was sent instead, all but request 60 would take a millisecond or so.
    assert result["p99_ms"] > 150
    assert result["p90_ms"] > 50
    assert result["p50_ms"] < 50
    assert (result["sent"], result["completed"], result["errors"]) == (TOTAL, TOTAL, 0)
    assert len(server.authorizations) == TOTAL


@pytest.mark.parametrize(
    "args",
    [
        pytest.param([], id="no-arguments"),
        pytest.param(["8080", "100", "1"], id="no-token-file"),
    ],
)
def test_openloop_usage(client: Path, args: list[str]) -> None:
    """Too few arguments: exit 2 and the usage line on stderr, nothing on stdout (the runner reads stdout as JSON)."""
    done = subprocess.run([str(client), *args], capture_output=True, text=True, timeout=10, check=False)
    assert done.returncode == 2
    assert done.stderr == "usage: openloop PORT RATE SECONDS TOKENS [CONNECTIONS]\n"
    assert done.stdout == ""


@pytest.mark.parametrize(
    ("content", "rate", "expected"),
    [
        pytest.param("", "100", "openloop: no tokens in {path}\n", id="empty-file"),
        pytest.param("\n  \n\r\n", "100", "openloop: no tokens in {path}\n", id="blank-lines"),
        pytest.param("tok\n", "0", "openloop: PORT, RATE, SECONDS and CONNECTIONS must be positive\n", id="rate-0"),
    ],
)
def test_openloop_refuses_to_run(client: Path, tmp_path: Path, content: str, rate: str, expected: str) -> None:
    """A token file with no token, or a zero rate: exit 2 with a message, before any connection is made."""
    path = tmp_path / "tokens"
    path.write_text(content)
    done = subprocess.run(
        [str(client), "9", rate, "1", str(path)], capture_output=True, text=True, timeout=10, check=False
    )
    assert (done.returncode, done.stderr, done.stdout) == (2, expected.format(path=path), "")


def test_openloop_missing_token_file(client: Path, tmp_path: Path) -> None:
    """An unreadable token file: exit 2, the path and the reason on stderr."""
    path = tmp_path / "absent"
    done = subprocess.run(
        [str(client), "9", "100", "1", str(path)], capture_output=True, text=True, timeout=10, check=False
    )
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == f"{path}: No such file or directory\n"


# --- bench/wrk.py: wrk's result line and Lua script ------------------------------------------------------------------


def test_wrk_parse_converts_units_and_sums_socket_errors() -> None:
    """µs become seconds and ms; socket errors are connect + read + write + timeout, non-2xx is wrk's `status`."""
    line = (
        "BENCH_RESULT requests=12345 duration_us=2500000 p50_us=1234 p99_us=5678.0 max_us=91011 "
        "connect=1 read=20 write=300 status=7 timeout=4000 wraps=2"
    )
    result = wrk.parse(line)
    assert result == wrk.WrkResult(
        requests=12345,
        seconds=2.5,
        p50_ms=1.234,
        p99_ms=5.678,
        max_ms=91.011,
        non_2xx=7,
        socket_errors=4321,
        wraps=2,
    )
    assert result.rps == 4938.0


def lua_short_string(literal: str) -> str:
    """The value of a double-quoted Lua string literal, for the escapes write_script may produce; anything else fails
    the way Lua would refuse it (an unknown escape, an unescaped quote, a raw line break)."""
    assert literal[0] == literal[-1] == '"', literal
    body, value, k = literal[1:-1], [], 0
    while k < len(body):
        char = body[k]
        assert char not in '"\n', f"Lua would end or reject the string at {k}: {literal}"
        if char == "\\":
            escaped = body[k + 1]
            assert escaped in '\\"', f"escape \\{escaped} not expected: {literal}"
            value.append(escaped)
            k += 2
        else:
            value.append(char)
            k += 1
    return "".join(value)


def test_wrk_script_quotes_the_token_path(tmp_path: Path) -> None:
    """A path with a quote, a backslash and a % sign comes back unchanged from the Lua literal, and the script's own
    format string keeps single % signs for Lua."""
    directory = tmp_path / 'odd "dir" \\ 100%'
    directory.mkdir()
    tokens = directory / "rs256-warm.txt"
    script = wrk.write_script(tmp_path, tokens)
    assert script == tmp_path / "wrk-rs256-warm.lua"
    text = script.read_text()
    declarations = [line for line in text.splitlines() if line.startswith("local path = ")]
    assert len(declarations) == 1
    assert lua_short_string(declarations[0].removeprefix("local path = ")) == str(tokens)
    assert f"local preload = {wrk.PRELOAD}\n" in text
    assert '"BENCH_RESULT requests=%d duration_us=%d p50_us=%d p99_us=%d max_us=%d "' in text
    assert "%%" not in text and "%(" not in text


# --- bench/report.py: medians and tables -----------------------------------------------------------------------------


def make_run(rnd: int, rps: float, **fields: Any) -> Run:
    values: dict[str, Any] = {
        "target": "t",
        "round": rnd,
        "requests": int(rps * 10),
        "seconds": 10.0,
        "rps": rps,
        "p50_ms": 1.0,
        "p99_ms": 2.0,
        "cpu_us_per_request": 100.0,
        "busy": 1.0,
        "others": 0.0,
        "others_driver": 0.0,
        "rss_idle": 100,
        "rss_load": 200,
        "non_2xx": 0,
        "socket_errors": 0,
        "token_wraps": 0,
    }
    values.update(fields)
    return Run(**values)


def test_summarize_leaves_noisy_rounds_out_when_clean_ones_remain() -> None:
    """Rounds where others took either core (above NOISY) are left out of the medians; at NOISY exactly they stay.
    Errors and token wraps still count over every round."""
    runs = [
        make_run(1, 1000, p50_ms=1.0, p99_ms=3.0, cpu_us_per_request=90, rss_idle=100, non_2xx=1),
        make_run(2, 1100, p50_ms=2.0, p99_ms=5.0, cpu_us_per_request=80, others=NOISY, rss_idle=101),
        make_run(3, 900, p50_ms=3.0, p99_ms=4.0, cpu_us_per_request=110, others_driver=NOISY, rss_idle=103),
        make_run(4, 100, p50_ms=50, p99_ms=90, cpu_us_per_request=900, others=0.2, non_2xx=5, socket_errors=2),
        make_run(5, 5000, p50_ms=0.1, p99_ms=0.2, cpu_us_per_request=10, others_driver=NOISY + 0.01, token_wraps=3),
    ]
    summary = summarize(runs)
    assert (summary.target, summary.rounds, summary.dropped) == ("t", 3, 2)
    assert summary.rps == 1000
    assert summary.spread == pytest.approx(0.2)  # (1100 - 900) / 1000
    assert (summary.p50_ms, summary.p99_ms, summary.cpu_us) == (2.0, 4.0, 90)
    assert (summary.others, summary.others_driver) == (0.0, 0.0)
    assert summary.rss_idle == 101
    assert summary.bad == 8  # 1 + (5 + 2): the noisy round's errors are not forgiven
    assert summary.wraps == 3


def test_summarize_keeps_every_round_when_none_is_clean() -> None:
    """With no clean round, the medians are over all of them (an even count: the mean of the middle two)."""
    runs = [
        make_run(1, 1000, others=0.1, rss_idle=100, cpu_us_per_request=50),
        make_run(2, 2000, others_driver=0.3, rss_idle=101, cpu_us_per_request=70, socket_errors=4),
        make_run(3, 4000, others=0.2, rss_idle=104, cpu_us_per_request=30),
        make_run(4, 3000, others=0.4, others_driver=0.6, rss_idle=110, cpu_us_per_request=60),
    ]
    summary = summarize(runs)
    assert (summary.rounds, summary.dropped) == (4, 0)
    assert summary.rps == 2500
    assert summary.spread == pytest.approx(1.2)  # (4000 - 1000) / 2500
    assert summary.cpu_us == 55
    assert summary.rss_idle == 102  # int(102.5)
    assert summary.others == pytest.approx(0.15)
    assert summary.others_driver == pytest.approx(0.15)
    assert summary.bad == 4


def test_summarize_fixed_medians_sums_and_p99_range() -> None:
    """Medians field by field; lost requests and non-2xx summed over the runs; p99's min and max kept."""
    base = {"rate": 500.0, "max_rps": 1000.0, "others": 0.0, "others_driver": 0.0}
    results = [
        {**base, "p50_ms": 1.0, "p90_ms": 2.0, "p99_ms": 5.0, "achieved_rps": 499.0, "errors": 0, "non_2xx": 1},
        {**base, "p50_ms": 3.0, "p90_ms": 4.0, "p99_ms": 9.0, "achieved_rps": 500.0, "errors": 2, "non_2xx": 0},
        {**base, "p50_ms": 2.0, "p90_ms": 3.0, "p99_ms": 7.0, "achieved_rps": 497.0, "errors": 1, "non_2xx": 4},
    ]
    summary = summarize_fixed(results)
    assert summary == {
        **base,
        "p50_ms": 2.0,
        "p90_ms": 3.0,
        "p99_ms": 7.0,
        "achieved_rps": 499.0,
        "errors": 3,
        "non_2xx": 5,
        "p99_min_ms": 5.0,
        "p99_max_ms": 9.0,
        "runs": 3,
    }


def cells(line: str) -> list[str]:
    """A table line's cells (columns are two or more spaces apart; cells hold at most single spaces)."""
    return re.split(r" {2,}", line.strip())


def pair_round(
    idle: float, first_cpu: float, second_cpu: float, first_share: float, second_share: float, others: float = 0.0
) -> dict[str, float]:
    return {
        "idle": idle,
        "others": others,
        "first_cpu_us": first_cpu,
        "second_cpu_us": second_cpu,
        "first_share": first_share,
        "second_share": second_share,
    }


def test_head_to_head_table_ratio_is_second_over_first_over_clean_rounds() -> None:
    """The ratio is second's CPU µs/req ÷ first's; a round with the core idle above IDLE is left out while a clean
    one remains (others using the core do not disqualify a round), and a pair with no clean round keeps all of them
    with a warning."""
    pairs = {
        ("a", "b"): [
            pair_round(0.01, 100, 150, 0.50, 0.40, others=0.5),  # ratio 1.5: others hit both alike, kept
            pair_round(IDLE + 0.15, 100, 300, 0.10, 0.10),  # ratio 3.0: the core idled, left out
            pair_round(IDLE, 200, 260, 0.46, 0.56),  # ratio 1.3: at IDLE exactly, kept
        ],
        ("c", "d"): [
            pair_round(0.30, 100, 50, 0.30, 0.30),  # ratio 0.5
            pair_round(0.40, 100, 70, 0.20, 0.20),  # ratio 0.7
        ],
    }
    header, rule, first, second = head_to_head_table(pairs).splitlines()
    assert cells(header) == ["first", "second", "rounds", "CPU µs/req", "core share", "first ÷ second", "range"]
    assert set(rule) == {"-", " "}
    assert cells(first) == [
        "a",
        "b",
        "2",
        "150 / 205",
        "48% / 48%",
        "1.40x",
        "1.30–1.50",
        "1 round(s) left out (core 0 idle more than 5%)",
    ]
    assert cells(second) == [
        "c",
        "d",
        "2",
        "100 / 60",
        "25% / 25%",
        "0.60x",
        "0.50–0.70",
        "no round had core 0 saturated by the pair alone: the ratio may mislead",
    ]


def make_summary(target: str, rps: float, cpu_us: float, **fields: Any) -> Summary:
    values: dict[str, Any] = {
        "target": target,
        "rounds": 3,
        "dropped": 0,
        "rps": rps,
        "spread": 0.04,
        "p50_ms": 1.234,
        "p99_ms": 5.678,
        "cpu_us": cpu_us,
        "busy": 0.99,
        "others": 0.0,
        "others_driver": 0.0,
        "rss_idle": 50 * MB,
        "rss_load": 80 * MB,
        "bad": 0,
        "wraps": 0,
    }
    values.update(fields)
    return Summary(**values)


def test_ratio_matrix_cell_is_row_over_column() -> None:
    """Cell (row, column) = row's value ÷ column's; a zero column gives '-' rather than a division error."""
    summaries = {
        "a": make_summary("a", 1000, 0),
        "b": make_summary("b", 2000, 100),
        "c": make_summary("c", 500, 50),
    }
    lines = ratio_matrix(summaries, "req/s", lambda s: s.rps).splitlines()
    assert lines[0] == "req/s"
    assert cells(lines[1]) == ["[1]", "[2]", "[3]"]
    assert [cells(line) for line in lines[3:]] == [
        ["[1] a", "1.00x", "0.50x", "2.00x"],
        ["[2] b", "2.00x", "1.00x", "4.00x"],
        ["[3] c", "0.50x", "0.25x", "1.00x"],
    ]
    cpu = ratio_matrix(summaries, "CPU", lambda s: s.cpu_us).splitlines()
    assert [cells(line) for line in cpu[3:]] == [
        ["[1] a", "-", "0.00x", "0.00x"],
        ["[2] b", "-", "1.00x", "2.00x"],
        ["[3] c", "-", "0.50x", "1.00x"],
    ]


def test_main_table_ratios_against_the_baselines() -> None:
    """Each row's req/s and CPU µs/req divided by those of each baseline in bench/targets.py ('-' when a baseline
    did not run), with the figures and the flags of its summary."""
    assert BASELINES == ("plain-aiohttp-pyjwt", "haproxy-jwt-rs256")
    summaries = {
        "plain-aiohttp-pyjwt": make_summary("plain-aiohttp-pyjwt", 2000, 400),
        "haproxy-jwt-rs256": make_summary("haproxy-jwt-rs256", 8000, 100),
        "gateway-rs256-warm": make_summary(
            "gateway-rs256-warm", 4000, 200, bad=3, dropped=1, others=0.1, others_driver=0.02, wraps=1
        ),
    }
    lines = main_table(summaries, {"gateway-es256-cold": "FAILED: boom"}).splitlines()
    header = ["target", "req/s", "±", "p50 ms", "p99 ms", "CPU µs/req", "core 0", "RSS idle→load MB"]
    header += ["req/s÷plain", "req/s÷haproxy", "CPU÷plain", "CPU÷haproxy"]
    assert cells(lines[0]) == header
    figures = ["4%", "1.23", "5.68"]
    assert cells(lines[2]) == [
        "plain-aiohttp-pyjwt",
        "2,000",
        *figures,
        "400",
        "99%",
        "50→80",
        "1.00x",
        "0.25x",
        "1.00x",
        "4.00x",
    ]
    assert cells(lines[3]) == [
        "haproxy-jwt-rs256",
        "8,000",
        *figures,
        "100",
        "99%",
        "50→80",
        "4.00x",
        "1.00x",
        "0.25x",
        "1.00x",
    ]
    assert cells(lines[4]) == [
        "gateway-rs256-warm",
        "4,000",
        *figures,
        "200",
        "99%",
        "50→80",
        "2.00x",
        "0.50x",
        "0.50x",
        "2.00x",
        "3 errors/non-2xx!",
        "cores shared: others took 10% of core 0, 2% of core 1",
        "1 noisy round(s) left out",
        "tokens repeated: not fully cold",
    ]
    assert lines[5] == "gateway-es256-cold: FAILED: boom"
    labels = ", ".join(f"{short} = {full} ({name})" for name, (short, full) in BASELINE_LABELS.items())
    assert lines[6] == f"÷: {labels}"
    assert len(lines) == 7

    # Without the haproxy baseline its columns hold '-'.
    alone = main_table({name: summaries[name] for name in ("plain-aiohttp-pyjwt", "gateway-rs256-warm")}, {})
    assert cells(alone.splitlines()[3])[8:12] == ["2.00x", "-", "0.50x", "-"]
