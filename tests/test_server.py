"""The gateway as an operator runs it: `python -m gateway ...` in a subprocess, driven by signals and HTTP.

check-config, SIGHUP reload (good and bad), SIGTERM drain, the demo's promises, and the access log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.support import (
    AUDIENCE,
    ISSUER,
    REPO_ROOT,
    IdP,
    Key,
    RichUpstream,
    gateway_process,
    open_route_config,
    run_cli,
    serve_app_cancelling,
)

# --- check-config ------------------------------------------------------------------------------------------------

GOOD = """
issuers:
  - name: corp
    issuer: https://idp.example.com/
    jwks_uri: https://idp.example.com/jwks
    audiences: [api://orders]
routes:
  - name: orders
    match: {path_prefix: /orders}
    upstream: {url: "http://127.0.0.1:8000", timeout: 30s}
    auth: {mode: jwt, issuers: [corp]}
  - name: health
    match: {path: /health}
    upstream: {url: "http://127.0.0.1:8000"}
    auth: {mode: none}
"""


@pytest.mark.parametrize("named_by", ["argument", "--config", "-c", "GATEWAY_CONFIG"])
async def test_check_config_good_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, named_by: str) -> None:
    """check-config reads the file given, or the one `gateway run` would (--config, -c, GATEWAY_CONFIG)."""
    path = tmp_path / "good.yaml"
    path.write_text(GOOD)
    if named_by == "GATEWAY_CONFIG":
        monkeypatch.setenv("GATEWAY_CONFIG", str(path))
    args = {"argument": [str(path)], "--config": ["--config", str(path)], "-c": ["-c", str(path)]}.get(named_by, [])
    code, out, err = await run_cli("check-config", *args)
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"{path}: OK")
    assert "2 routes" in lines[0] and "1 issuers" in lines[0]


async def test_check_config_refuses_two_files(tmp_path: Path) -> None:
    path = tmp_path / "good.yaml"
    path.write_text(GOOD)
    code, out, err = await run_cli("check-config", str(path), "--config", str(tmp_path / "other.yaml"))
    assert code == 2 and out == ""
    assert "two files named" in err


@pytest.mark.parametrize(
    ("name", "edit", "where", "what"),
    [
        (
            "unknown issuer",
            ("issuers: [corp]", "issuers: [crop]"),
            "routes[0].auth.issuers[0]",
            "unknown issuer 'crop'",
        ),
        ("bad duration", ("timeout: 30s", "timeout: 30 parsecs"), "routes[0].upstream.timeout", "duration"),
        (
            "missing env var",
            ('"http://127.0.0.1:8000", timeout', '"${GATEWAY_TEST_SURELY_UNSET_7F3A}", timeout'),
            "routes[0].upstream.url",
            "GATEWAY_TEST_SURELY_UNSET_7F3A is not set",
        ),
        (
            "unknown field",
            ("timeout: 30s}", "timeout: 30s, retries: 3}"),
            "routes[0].upstream.retries",
            "unknown field",
        ),
        ("bad mode", ("mode: none", "mode: nothing"), "routes[1].auth.mode", "none"),
    ],
)
async def test_check_config_bad_file_names_file_and_path(
    tmp_path: Path, name: str, edit: tuple[str, str], where: str, what: str
) -> None:
    assert edit[0] in GOOD, name
    path = tmp_path / "bad.yaml"
    path.write_text(GOOD.replace(edit[0], edit[1], 1))
    code, out, err = await run_cli("check-config", str(path))
    assert code != 0
    assert out == ""
    problem = next((line for line in err.splitlines() if where in line), None)
    assert problem is not None, err
    assert problem.startswith(f"{path}: {where}:")
    assert what in problem


async def test_check_config_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    code, _, err = await run_cli("check-config", str(path))
    assert code != 0
    assert str(path) in err and "cannot read" in err


# --- SIGHUP reload -----------------------------------------------------------------------------------------------


def two_routes(up: str, second: bool) -> str:
    extra = f"""
  - name: b
    match: {{path_prefix: /b}}
    upstream: {{url: "{up}"}}
    auth: {{mode: none}}
"""
    return f"""
listen: {{host: 127.0.0.1, port: 0}}
admin: {{host: 127.0.0.1, port: 0}}
routes:
  - name: a
    match: {{path_prefix: /a}}
    upstream: {{url: "{up}"}}
    auth: {{mode: none}}
{extra if second else ""}"""


async def test_sighup_with_valid_config_adds_route(rich_upstream: RichUpstream, tmp_path: Path) -> None:
    async with gateway_process(two_routes(rich_upstream.url, second=False), tmp_path) as gw:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{gw.url}/b/1") as resp:
                assert resp.status == 404
            gw.config_path.write_text(two_routes(rich_upstream.url, second=True))
            gw.signal(signal.SIGHUP)
            await gw.wait_for_log(lambda e: e.get("msg") == "config reloaded")
            async with http.get(f"{gw.url}/b/1") as resp:
                assert resp.status == 200
            async with http.get(f"{gw.url}/a/1") as resp:
                assert resp.status == 200
            assert await gw.metric(http, "gateway_config_reloads_total", outcome="success") == 1
            assert await gw.metric(http, "gateway_config_reloads_total", outcome="failure") == 0
        assert [r["path"] for r in rich_upstream.requests] == ["/b/1", "/a/1"]
        assert not any("restart" in e.get("msg", "") for e in gw.logs())  # listen/admin unchanged


async def test_sighup_with_invalid_config_keeps_old_one(rich_upstream: RichUpstream, tmp_path: Path) -> None:
    async with gateway_process(two_routes(rich_upstream.url, second=True), tmp_path) as gw:
        gw.config_path.write_text(
            two_routes(rich_upstream.url, second=True).replace("path_prefix: /b", "pathprefix: /b")
        )
        gw.signal(signal.SIGHUP)
        refused = await gw.wait_for_log(lambda e: "reload refused" in e.get("msg", ""))
        assert refused["level"] == "error"
        assert "routes[1].match" in refused["error"] and str(gw.config_path) in refused["error"]
        async with aiohttp.ClientSession() as http:
            for path in ("/a/1", "/b/1"):  # the old config, both routes, keeps serving
                async with http.get(f"{gw.url}{path}") as resp:
                    assert resp.status == 200
            assert await gw.metric(http, "gateway_config_reloads_total", outcome="failure") == 1
            assert await gw.metric(http, "gateway_config_reloads_total", outcome="success") == 0


# --- SIGTERM drain -----------------------------------------------------------------------------------------------


@pytest.fixture
async def held_upstream() -> AsyncIterator[tuple[str, asyncio.Event, asyncio.Event]]:
    """An upstream whose /hold answers only when the test says so: (url, arrived, release)."""
    arrived, release = asyncio.Event(), asyncio.Event()

    async def hold(request: web.Request) -> web.Response:
        arrived.set()
        await release.wait()
        return web.Response(text="finished")

    app = web.Application()
    app.router.add_get("/hold", hold)
    runner, url = await serve_app_cancelling(app)
    yield url, arrived, release
    await runner.cleanup()


async def connection_refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    await writer.wait_closed()
    return False


async def wait_refused(port: int, within: float = 10.0) -> None:
    """Until a connect to `port` is refused (the process gives no other sign that its listener closed)."""
    async with asyncio.timeout(within):
        while True:
            if await connection_refused(port):
                return
            await asyncio.sleep(0.02)


async def test_sigterm_drains_in_flight_then_exits_0(
    held_upstream: tuple[str, asyncio.Event, asyncio.Event], tmp_path: Path
) -> None:
    url, arrived, release = held_upstream
    config = f"""
routes:
  - name: held
    match: {{path: /hold}}
    upstream: {{url: "{url}"}}
    auth: {{mode: none}}
"""
    async with gateway_process(config, tmp_path) as gw, aiohttp.ClientSession() as http:
        in_flight = asyncio.create_task(http.get(f"{gw.url}/hold"))
        async with asyncio.timeout(10):
            await arrived.wait()
        gw.signal(signal.SIGTERM)
        await gw.wait_for_log(lambda e: e.get("msg", "").startswith("stopping: draining"))
        # The listener closes while the request is still held: new connections are refused from then on.
        await wait_refused(gw.proxy_port)
        assert not in_flight.done()
        # Meanwhile the admin listener still answers, and says why this instance is not ready.
        async with http.get(f"{gw.admin_url}/readyz") as ready:
            assert ready.status == 503
            assert "draining" in (await ready.json())["problems"]
        release.set()
        async with asyncio.timeout(10):
            resp = await in_flight
        async with resp:
            assert resp.status == 200
            assert await resp.text() == "finished"
        assert await gw.wait_exit() == 0
        assert await connection_refused(gw.proxy_port)
    assert any(e.get("msg") == "stopped" for e in gw.logs())


# --- the demo ----------------------------------------------------------------------------------------------------


async def test_demo_prints_curl_lines_that_do_what_they_say(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "demo", "--port", "0", "--admin-port", "0",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,
    )  # fmt: skip
    assert process.stdout is not None and process.stderr is not None
    try:
        intro = []
        async with asyncio.timeout(30):
            async for raw in process.stdout:
                intro.append(raw.decode())
                if "Ctrl-C stops it." in intro[-1]:
                    break
        text = "".join(intro)
        token = re.search(r"^\s*TOKEN=(\S+)$", text, re.MULTILINE)
        assert token is not None, text
        curls = re.findall(
            r"curl -i (http://127\.0\.0\.1:\d+/\S+)( -H \"Authorization: Bearer \$TOKEN\")?\s+# (\d{3})", text
        )
        assert [(c[0].rsplit("/", 1)[1], bool(c[1]), c[2]) for c in curls] == [
            ("hello", True, "200"),
            ("hello", False, "401"),
            ("admin-area", True, "403"),
        ]
        metrics_url = re.search(r"curl -s (http://127\.0\.0\.1:\d+/metrics)", text)
        assert metrics_url is not None
        async with aiohttp.ClientSession() as http:
            for url, with_token, status in curls:
                headers = {"Authorization": f"Bearer {token.group(1)}"} if with_token else {}
                async with http.get(url, headers=headers) as resp:
                    assert resp.status == int(status), url
                    if resp.status == 200:
                        seen = await resp.json()
                        assert seen["headers"]["X-Auth-Subject"] == "demo-user"
            async with http.get(metrics_url.group(1)) as resp:
                assert resp.status == 200
                decisions = await resp.text()
            decided = {
                (sample.labels["route"], sample.labels["outcome"], sample.labels["reason"]): sample.value
                for family in text_string_to_metric_families(decisions)
                for sample in family.samples
                if sample.name == "gateway_auth_decisions_total"
            }
            assert decided == {
                ("hello", "allow", "ok"): 1,
                ("hello", "deny", "missing"): 1,
                ("admin-area", "deny", "scope"): 1,
            }
        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(20):
            _, err = await process.communicate()
        assert process.returncode == 0, err.decode()
        assert token.group(1) not in err.decode()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


# --- access log --------------------------------------------------------------------------------------------------


async def test_access_log_one_json_line_per_request_never_the_token(
    idp: IdP, rich_upstream: RichUpstream, rsa_key: Key, tmp_path: Path
) -> None:
    config = f"""
log: {{level: info, access: true}}
issuers:
  - name: corp
    issuer: {ISSUER}
    jwks_uri: {idp.url}/jwks
    audiences: [{AUDIENCE}]
routes:
  - name: orders
    match: {{path_prefix: /orders}}
    upstream: {{url: "{rich_upstream.url}"}}
    auth: {{mode: jwt, issuers: [corp]}}
  - name: by-query
    match: {{path_prefix: /q}}
    upstream: {{url: "{rich_upstream.url}"}}
    auth: {{mode: jwt, issuers: [corp], token: {{source: query, name: access_token}}}}
"""
    good = rsa_key.sign(sub="alice", jti="jti-good-1")
    expired = rsa_key.sign(sub="bob", iat=1_000_000_000, exp=1_000_000_600)
    wrong_audience = rsa_key.sign(aud="api://elsewhere")
    sent = [
        ("GET", "/orders/1", {"Authorization": f"Bearer {good}"}, 200),
        ("POST", "/orders", {"Authorization": f"Bearer {good}"}, 200),
        ("GET", "/orders/2", {"Authorization": f"Bearer {expired}"}, 401),
        ("GET", "/orders/3", {"Authorization": f"Bearer {wrong_audience}"}, 401),
        ("GET", "/orders/4", {}, 401),
        ("GET", f"/q/5?access_token={good}", {}, 200),
        ("GET", "/nowhere", {"Authorization": f"Bearer {good}"}, 404),
    ]
    async with gateway_process(config, tmp_path) as gw:
        async with aiohttp.ClientSession() as http:
            for method, path, headers, status in sent:
                async with http.request(method, f"{gw.url}{path}", headers=headers) as resp:
                    assert resp.status == status, path
        gw.signal(signal.SIGTERM)
        assert await gw.wait_exit() == 0
    access = [e for e in gw.logs() if e.get("logger") == "gateway.access"]
    assert len(access) == len(sent)
    for entry, (method, path, _, status) in zip(access, sent, strict=True):
        assert entry["method"] == method
        assert entry["path"] == path.split("?")[0]  # never the query string
        assert entry["status"] == status
        assert isinstance(entry["duration_ms"], int | float) and entry["duration_ms"] >= 0
        assert entry["route"] == {"/o": "orders", "/q": "by-query"}.get(path[:2], "unmatched")
    assert access[0]["subject"] == "alice" and access[0]["jti"] == "jti-good-1"
    assert access[5]["subject"] == "alice" and access[5]["jti"] == "jti-good-1"
    assert access[2]["reason"] == "expired" and "subject" not in access[2]
    assert access[4]["reason"] == "missing"
    everything = gw.text()
    for token in (good, expired, wrong_audience):
        assert token not in everything
        assert token.split(".")[2] not in everything  # not even the signature part


async def test_malformed_requests_answered_in_json_and_logged_without_their_bytes(
    rich_upstream: RichUpstream, tmp_path: Path
) -> None:
    """aiohttp quotes the bytes it could not parse, in its 400 answer and its error log: tokens included."""
    config = f"""
routes:
  - name: open
    match: {{path_prefix: /}}
    upstream: {{url: "{rich_upstream.url}"}}
    auth: {{mode: none}}
"""
    secrets = [f"SECRET{i}{'x' * 20}" for i in range(5)]
    malformed = [
        f"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer eyJ{secrets[0]}.e30.sig\x01\r\n\r\n",
        f"GET /?access_token={secrets[1]}\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
        f"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {secrets[2]}{'A' * 20000}\r\n\r\n",
        f"GET / HTTP/1.1\r\nHost: x\r\nX-Api-Token {secrets[3]}\r\n\r\n",
        f"GET / HTTP/1.1\r\nHost: x\r\nCookie: s={secrets[4]}\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    ]
    async with gateway_process(config, tmp_path) as gw:
        for request in malformed:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.proxy_port)
            writer.write(request.encode("latin-1"))
            async with asyncio.timeout(10):
                answer = await reader.read()  # aiohttp closes after a parse error
            writer.close()
            await writer.wait_closed()
            head, _, body = answer.partition(b"\r\n\r\n")
            too_large = "A" * 20000 in request
            status = 431 if too_large else 400
            assert head.startswith(b"HTTP/1.1 %d " % status), answer[:200]
            assert b"application/json" in head
            description = "request header fields too large" if too_large else "malformed HTTP request"
            assert json.loads(body) == {"error": "invalid_request", "error_description": description}
        gw.signal(signal.SIGTERM)
        assert await gw.wait_exit() == 0
    refused = [e for e in gw.logs() if e.get("msg") == "malformed request refused"]
    assert len(refused) == len(malformed)
    assert all(e["level"] == "info" and e["status"] in (400, 431) and "exc" not in e for e in refused)
    assert sorted(e["status"] for e in refused) == [400, 400, 400, 400, 431]
    assert not [e for e in gw.logs() if e.get("level") == "error"]
    for secret in secrets:
        assert secret not in gw.text()


def test_log_lines_never_carry_a_bearer_token_or_jwt() -> None:
    from gateway.logs import JsonFormatter

    jwt_like = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"
    record = logging.LogRecord(
        "x", logging.WARNING, __file__, 1, "sent %s", ("Authorization: Bearer opaque-Tok3n==",), None
    )
    record.header = f"token={jwt_like}"
    line = JsonFormatter().format(record)
    entry = json.loads(line)  # still valid JSON
    assert "opaque-Tok3n" not in line and jwt_like not in line
    assert entry["msg"] == "sent Authorization: [redacted]"
    assert entry["header"] == "token=[redacted]"


@pytest.mark.parametrize("command", [("run", "--config", "{config}"), ("demo", "--port", "{port}")])
async def test_a_port_in_use_is_one_clear_line_and_exit_1(
    command: tuple[str, ...], rich_upstream: RichUpstream, tmp_path: Path
) -> None:
    """Not a traceback and an "Unclosed client session" error: what is in the way is all an operator needs."""
    import socket
    import subprocess

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "gw.yaml"
        config.write_text(
            open_route_config(rich_upstream.url).replace(
                "listen: {host: 127.0.0.1, port: 0}", f"listen: {{host: 127.0.0.1, port: {port}}}"
            )
        )
        args = [part.format(config=config, port=port) for part in command]
        done = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=60
        )
    assert done.returncode == 1, done.stderr
    errors = [json.loads(line) for line in done.stderr.splitlines() if '"level":"error"' in line]
    assert [e["msg"] for e in errors] == ["cannot start"] and "address already in use" in errors[0]["error"]
    assert "Traceback" not in done.stderr
