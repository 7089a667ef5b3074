"""Introspection (RFC 7662) behind a real gateway: a real authorization server, upstream, IdP and Redis.

The authorization server below issues opaque tokens, revokes them, counts calls, checks the gateway's client
authentication, and can be made slow, failing or malformed. Time-dependent behaviour (cache TTLs, the breaker's
reset) runs on a clock the test moves, installed on the gateway's Introspector; nothing sleeps on the wall clock.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

import aiohttp
import pytest
import yaml
from aiohttp import web

from gateway import configfile, errors
from gateway.checks import compile_check
from gateway.config import IntrospectionSettings, StoreSettings
from gateway.metrics import Metrics
from gateway.store import Revocation, connect_redis
from gateway.verify.introspection import Breaker, Introspector, _Entry
from tests.support import (
    AUDIENCE,
    ISSUER,
    IdP,
    Key,
    RunningGateway,
    Upstream,
    refusing_port,
    serve_app_cancelling,
    start_gateway,
)

CLIENT_ID = "gateway client"  # a space, so client_secret_basic must form-encode it (RFC 6749 §2.3.1)
SECRET = "s3cret:with/odd+chars"
SECRET_ENV = "GW_TEST_INTROSPECTION_SECRET"
LOGGER = "gateway.verify.introspection"
IDENTITY_HEADERS = {"X-Auth-Subject": "sub", "X-Auth-Client": "client_id", "X-Auth-Scopes": "scope"}

# How the authorization server can answer wrongly: each must be a 503 with its reason, and a log line saying why.
MALFORMED: dict[str, tuple[Callable[[], web.Response], str, str]] = {
    "status 500": (lambda: web.Response(status=500, text="down"), "introspection_unavailable", "status 500"),
    "redirect": (
        lambda: web.Response(status=307, headers={"Location": "http://127.0.0.1:9/steal"}),
        "introspection_unavailable",
        "status 307",
    ),
    "not JSON": (lambda: web.Response(text="<html>ok</html>"), "introspection_invalid", "not JSON"),
    "not an object": (lambda: web.json_response([{"active": True}]), "introspection_invalid", "not a JSON object"),
    "active missing": (lambda: web.json_response({"sub": "alice"}), "introspection_invalid", "no `active`"),
    'active "true"': (lambda: web.json_response({"active": "true"}), "introspection_invalid", "not a boolean"),
    "active 1": (lambda: web.json_response({"active": 1}), "introspection_invalid", "not a boolean"),
    "active null": (lambda: web.json_response({"active": None}), "introspection_invalid", "not a boolean"),
    "body over 64 KiB": (
        lambda: web.json_response({"active": True, "pad": "x" * 70_000}),
        "introspection_invalid",
        "larger than 65536 bytes",
    ),
    "body over 64 KiB, chunked": (lambda: _chunked_huge(), "introspection_invalid", "larger than 65536 bytes"),
    "nested too deep": (
        lambda: web.Response(text="[" * 30_000 + "]" * 30_000),
        "introspection_invalid",
        "not JSON",
    ),
    "exp NaN": (lambda: web.Response(text='{"active": true, "exp": NaN}'), "introspection_invalid", "not JSON"),
    "exp 10**400": (
        lambda: web.Response(text='{"active": true, "exp": 1' + "0" * 400 + "}"),
        "introspection_invalid",
        "`exp` is not a number",
    ),
    "exp a string": (
        lambda: web.json_response({"active": True, "exp": str(int(time.time()) + 600)}),
        "introspection_invalid",
        "`exp` is not a number",
    ),
    "scope a list": (
        lambda: web.json_response({"active": True, "scope": ["orders:read"]}),
        "introspection_invalid",
        "`scope` is not a string",
    ),
}


def _chunked_huge() -> web.Response:
    response = web.Response(body=json.dumps({"active": True, "pad": "x" * 70_000}).encode())
    response.enable_chunked_encoding()
    return response


@dataclass
class AuthServer:
    """A real RFC 7662 endpoint: issues opaque tokens, revokes them, counts calls, checks client authentication."""

    method: str = "client_secret_basic"
    secret: str = SECRET
    tokens: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: int = 0
    refused_clients: int = 0
    forms: list[dict[str, str]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    failure: str | None = None  # a key of MALFORMED: every answer goes wrong that way
    hold: asyncio.Event | None = None  # when set, every call waits for it (a slow endpoint)
    url: str = ""

    @property
    def endpoint(self) -> str:
        return f"{self.url}/introspect"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/introspect", self._introspect)
        return app

    def issue(self, token: str | None = None, **claims: Any) -> str:
        """A new active token; a claim given as None is left out of the answer."""
        token = token or secrets.token_urlsafe(24)
        now = int(time.time())
        answer = {"active": True, "sub": "alice", "client_id": "app-1", "scope": "orders:read", "iat": now}
        answer.update(exp=now + 600, jti=str(uuid.uuid4()), token_type="Bearer")
        answer.update(claims)
        self.tokens[token] = {k: v for k, v in answer.items() if v is not None}
        return token

    def revoke(self, token: str) -> None:
        self.tokens[token]["active"] = False

    async def _introspect(self, request: web.Request) -> web.Response:
        self.calls += 1
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.forms.append(form)
        self.headers.append(dict(request.headers))
        if not self._authenticated(request, form):
            self.refused_clients += 1
            return web.json_response({"error": "invalid_client"}, status=401)
        if self.hold is not None:
            await self.hold.wait()
        if self.failure is not None:
            return MALFORMED[self.failure][0]()
        if form.get("token_type_hint") != "access_token":
            return web.json_response({"error": "invalid_request"}, status=400)
        answer = self.tokens.get(form.get("token", ""))
        if answer is None or not answer["active"]:
            return web.json_response({"active": False})  # RFC 7662 §2.2: nothing more about an inactive token
        return web.json_response(answer)

    def _authenticated(self, request: web.Request, form: dict[str, str]) -> bool:
        authorization = request.headers.get("Authorization", "")
        if self.method == "bearer":
            return authorization == f"Bearer {self.secret}" and "client_secret" not in form
        if self.method == "client_secret_post":
            return not authorization and (form.get("client_id"), form.get("client_secret")) == (CLIENT_ID, self.secret)
        scheme, _, encoded = authorization.partition(" ")
        if scheme != "Basic" or "client_secret" in form:
            return False
        client_id, _, secret = base64.b64decode(encoded).decode().partition(":")
        return (unquote_plus(client_id), unquote_plus(secret)) == (CLIENT_ID, self.secret)


class Clock:
    """A clock the test moves; starts at the real time so tokens' exp and iat make sense."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(autouse=True)
def introspection_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)


@pytest.fixture
async def auth_server() -> AsyncIterator[AuthServer]:
    server = AuthServer()
    runner, server.url = await serve_app_cancelling(server.app())
    yield server
    if server.hold is not None:
        server.hold.set()
    await runner.cleanup()


def route(name: str, upstream: Upstream, **auth: Any) -> dict[str, Any]:
    return {
        "name": name,
        "match": {"path_prefix": f"/{name}"},
        "upstream": {"url": upstream.url},
        "auth": {"mode": "introspect", "introspection": "corp", **auth},
        "forward": {"identity_headers": IDENTITY_HEADERS},
    }


def config(
    server: AuthServer, upstream: Upstream, routes: list[dict[str, Any]] | None = None, **endpoint: Any
) -> dict[str, Any]:
    corp = {"name": "corp", "endpoint": server.endpoint, "client_id": CLIENT_ID, "client_secret_env": SECRET_ENV}
    return {"introspection": [{**corp, **endpoint}], "routes": routes or [route("orders", upstream)]}


@contextlib.asynccontextmanager
async def gateway(
    settings: dict[str, Any], tmp_path: Path, clock: Clock | None = None
) -> AsyncIterator[RunningGateway]:
    """A gateway from `settings` (dumped to YAML); `clock`, if given, drives its introspection endpoints."""
    running = start_gateway(yaml.safe_dump(settings), tmp_path)
    gw = await anext(running)
    try:
        if clock is not None:
            for client in introspectors(gw).values():
                client.clock = clock
        yield gw
    finally:
        await running.aclose()


def introspectors(gw: RunningGateway) -> dict[str, Introspector]:
    assert gw.server.runtime is not None and gw.server.runtime.gateway is not None
    return gw.server.runtime.gateway.introspectors


async def call(
    http: aiohttp.ClientSession, gw: RunningGateway, path: str, token: str, **headers: str
) -> tuple[int, dict[str, Any], Any]:
    async with http.get(f"{gw.url}{path}", headers={"Authorization": f"Bearer {token}", **headers}) as resp:
        return resp.status, dict(resp.headers), await resp.json()


def decisions(gw: RunningGateway, route: str, outcome: str, reason: str) -> float:
    return gw.metric("gateway_auth_decisions_total", route=route, outcome=outcome, reason=reason)


def calls(gw: RunningGateway, outcome: str) -> float:
    return gw.metric("gateway_introspection_requests_total", endpoint="corp", outcome=outcome)


def breaker_open(gw: RunningGateway) -> float:
    return gw.metric("gateway_introspection_breaker_open", endpoint="corp")


async def misses(gw: RunningGateway, count: int) -> None:
    """Wait until `count` requests have missed the cache (and so wait on, or make, a call)."""
    async with asyncio.timeout(10):
        # The gateway shows this only as a metric: there is no event to await, so look every 10 ms.
        while gw.metric("gateway_introspection_cache_requests_total", result="miss") < count:  # noqa: ASYNC110
            await asyncio.sleep(0.01)


def assert_not_logged(caplog: pytest.LogCaptureFixture, *values: str) -> None:
    for record in caplog.records:
        text = record.getMessage() + repr(vars(record))
        for value in values:
            assert value not in text, f"{value!r} leaked into the log line {record.getMessage()!r}"


# ------------------------------------------------------------------------------------------ answers and identity


async def test_active_token_passes_with_identity_from_the_answer(
    auth_server: AuthServer, upstream: Upstream, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    token = auth_server.issue(scope="orders:read orders:write")
    async with gateway(config(auth_server, upstream), tmp_path) as gw:
        status, _, _ = await call(http, gw, "/orders/1", token, **{"X-Auth-Subject": "mallory"})
    assert status == 200
    seen = upstream.requests[-1]["headers"]
    assert (seen["X-Auth-Subject"], seen["X-Auth-Client"]) == ("alice", "app-1")
    assert seen["X-Auth-Scopes"] == "orders:read orders:write"
    assert "Authorization" not in seen
    # RFC 7662 §2.1: a form POST of the token with its type hint, the client authenticated (here: Basic).
    assert auth_server.forms == [{"token": token, "token_type_hint": "access_token"}]
    assert auth_server.headers[0]["Content-Type"] == "application/x-www-form-urlencoded"
    assert auth_server.headers[0]["Accept-Encoding"] == "identity"
    assert calls(gw, "active") == 1
    assert decisions(gw, "orders", "allow", "ok") == 1
    assert gw.metric("gateway_introspection_duration_seconds_count", endpoint="corp") == 1


async def test_unknown_token_is_401_inactive(
    auth_server: AuthServer, upstream: Upstream, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    async with gateway(config(auth_server, upstream), tmp_path) as gw:
        status, headers, body = await call(http, gw, "/orders", "never-issued")
        assert calls(gw, "inactive") == 1
        assert decisions(gw, "orders", "deny", "inactive") == 1
    assert status == 401 and body["error"] == "invalid_token"
    assert 'error="invalid_token"' in headers["WWW-Authenticate"]
    assert upstream.requests == []


@pytest.mark.parametrize(
    ("claims", "status", "reason"),
    [
        # RFC 7662 §4: the resource server still checks exp, nbf, iss and aud, as it would for a JWT.
        ({"exp": int(time.time()) - 5}, 401, "expired"),
        ({"nbf": int(time.time()) + 300}, 401, "not_yet_valid"),
        ({"iss": "https://elsewhere.test/"}, 401, "issuer"),
        ({"iss": None}, 401, "issuer"),
        ({"aud": "api://other"}, 401, "audience"),
        ({"aud": None}, 401, "audience"),
        ({"aud": ["api://other", AUDIENCE]}, 200, "ok"),
        ({"exp": None}, 200, "ok"),
        ({"scope": "orders:write"}, 403, "scope"),
        ({"client_id": "app-2"}, 403, "claims"),
    ],
    ids=[
        "exp past",
        "nbf future",
        "wrong iss",
        "no iss",
        "wrong aud",
        "no aud",
        "aud list",
        "no exp",
        "scope",
        "claim",
    ],
)
async def test_the_answer_is_judged_like_a_jwt(
    claims: dict[str, Any],
    status: int,
    reason: str,
    auth_server: AuthServer,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    token = auth_server.issue(**{"iss": ISSUER, "aud": AUDIENCE, **claims})
    orders = route("orders", upstream, required_scopes=["orders:read"], required_claims={"client_id": "app-1"})
    settings = config(auth_server, upstream, [orders], issuer=ISSUER, audiences=[AUDIENCE])
    async with gateway(settings, tmp_path) as gw:
        got, _, _ = await call(http, gw, "/orders", token)
        assert decisions(gw, "orders", "allow" if status == 200 else "deny", reason) == 1
    assert got == status


# ------------------------------------------------------------------------------------------------------ caching


async def test_revocation_is_seen_once_the_cache_ttl_passes(
    auth_server: AuthServer, upstream: Upstream, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    clock = Clock()
    token = auth_server.issue()
    async with gateway(config(auth_server, upstream, cache_ttl="30s"), tmp_path, clock) as gw:
        assert (await call(http, gw, "/orders", token))[0] == 200
        auth_server.revoke(token)
        clock.advance(29)
        assert (await call(http, gw, "/orders", token))[0] == 200  # still cached: the answer is 29 s old
        assert auth_server.calls == 1
        clock.advance(2)
        status, _, _ = await call(http, gw, "/orders", token)
        assert gw.metric("gateway_introspection_cache_requests_total", result="hit") == 1
    assert (status, auth_server.calls) == (401, 2)


async def test_exp_in_the_answer_bounds_the_cache(
    auth_server: AuthServer, upstream: Upstream, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    clock = Clock()
    token = auth_server.issue(exp=int(clock.now) + 5)
    async with gateway(config(auth_server, upstream, cache_ttl="60s"), tmp_path, clock) as gw:
        assert (await call(http, gw, "/orders", token))[0] == 200
        clock.advance(4)
        assert (await call(http, gw, "/orders", token))[0] == 200
        assert auth_server.calls == 1
        clock.advance(2)  # past exp, well within cache_ttl: the answer is asked again, and now refused
        status, _, _ = await call(http, gw, "/orders", token)
        assert decisions(gw, "orders", "deny", "expired") == 1
    assert (status, auth_server.calls) == (401, 2)


async def test_a_cached_answer_is_judged_at_each_hit_until_it_passes_then_only_its_dates(
    auth_server: AuthServer, upstream: Upstream, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """An answer not valid yet is refused from the cache, and accepted from it once nbf has passed; the accepted
    judgement is kept, and exp still ends it (here the cache's own bound, exp, ends the entry first)."""
    clock = Clock()
    token = auth_server.issue(nbf=int(clock.now) + 10, exp=int(clock.now) + 30)
    async with gateway(config(auth_server, upstream, cache_ttl="60s"), tmp_path, clock) as gw:
        assert (await call(http, gw, "/orders", token))[0] == 401  # asked, and cached
        clock.advance(1)
        assert (await call(http, gw, "/orders", token))[0] == 401  # from the cache: still not valid
        assert gw.metric("gateway_introspection_cache_requests_total", result="hit") == 1
        clock.advance(10)
        assert (await call(http, gw, "/orders", token))[0] == 200  # from the cache, judged again: valid now
        clock.advance(1)
        assert (await call(http, gw, "/orders", token))[0] == 200  # the kept judgement
        assert auth_server.calls == 1
        assert decisions(gw, "orders", "deny", "not_yet_valid") == 2
        clock.advance(19)  # past exp: asked again, and refused
        assert (await call(http, gw, "/orders", token))[0] == 401
        assert decisions(gw, "orders", "deny", "expired") == 1
    assert auth_server.calls == 2


async def test_a_kept_judgement_still_meets_exp_and_nbf(http: aiohttp.ClientSession) -> None:
    """An entry can outlive its answer's exp (a shared-cache TTL, clocks apart), and the clock can step back before
    nbf: the kept identity is refused then, as a fresh judgement would be."""
    now = [1_000_000.0]
    settings = IntrospectionSettings(
        name="corp", endpoint="http://127.0.0.1:9/introspect", client_id=CLIENT_ID, client_secret_env=SECRET_ENV
    )  # never called: the answer is put in its cache
    introspector = Introspector(settings, http, Metrics(), clock=lambda: now[0])
    answer = {"active": True, "sub": "alice", "nbf": now[0] - 5, "exp": now[0] + 10}
    introspector._cache.put(b"digest", _Entry(answer, until=now[0] + 100))
    first = introspector.cached(b"digest")
    assert first is not None and first.subject == "alice"
    now[0] += 1
    assert introspector.cached(b"digest") is first  # kept, not rebuilt
    now[0] += 10
    with pytest.raises(errors.Expired):
        introspector.cached(b"digest")
    now[0] -= 20
    with pytest.raises(errors.NotYetValid):
        introspector.cached(b"digest")
    assert introspector.cached(b"other") is None


@pytest.mark.parametrize(("negative_ttl", "calls_for_two"), [("0s", 2), ("30s", 1)])
async def test_negative_answers_are_cached_only_when_configured(
    negative_ttl: str,
    calls_for_two: int,
    auth_server: AuthServer,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    clock = Clock()
    settings = config(auth_server, upstream, negative_cache_ttl=negative_ttl)
    async with gateway(settings, tmp_path, clock) as gw:
        for _ in range(2):
            assert (await call(http, gw, "/orders", "not-yet-issued"))[0] == 401
        assert auth_server.calls == calls_for_two
        auth_server.issue("not-yet-issued")
        clock.advance(29)
        expected = 401 if negative_ttl == "30s" else 200
        assert (await call(http, gw, "/orders", "not-yet-issued"))[0] == expected
        clock.advance(2)
        assert (await call(http, gw, "/orders", "not-yet-issued"))[0] == 200


async def test_a_cache_hit_meets_the_routes_own_scopes_again(
    auth_server: AuthServer, upstream: Upstream, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    reader = auth_server.issue(scope="orders:read")
    admin = auth_server.issue(scope="orders:read orders:admin")
    routes = [route("open", upstream), route("admin", upstream, required_scopes=["orders:admin"])]
    async with gateway(config(auth_server, upstream, routes), tmp_path) as gw:
        assert (await call(http, gw, "/open", reader))[0] == 200
        status, headers, body = await call(http, gw, "/admin", reader)  # a hit on the answer /open cached
        assert (status, body["error"]) == (403, "insufficient_scope")
        assert 'scope="orders:admin"' in headers["WWW-Authenticate"]
        assert auth_server.calls == 1
        assert gw.metric("gateway_introspection_cache_requests_total", result="hit") == 1
        assert (await call(http, gw, "/admin", admin))[0] == 200
        assert (await call(http, gw, "/open", admin))[0] == 200
    assert auth_server.calls == 2


async def test_concurrent_lookups_of_one_token_make_one_call(
    auth_server: AuthServer, upstream: Upstream, tmp_path: Path
) -> None:
    token = auth_server.issue()
    auth_server.hold = asyncio.Event()
    settings = config(auth_server, upstream, cache_ttl="0s")  # no cache: only coalescing can save calls
    async with (
        gateway(settings, tmp_path) as gw,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http,
    ):
        requests = [asyncio.create_task(call(http, gw, "/orders", token)) for _ in range(100)]
        await misses(gw, 100)  # every request has missed the cache and waits on the one call in flight
        auth_server.hold.set()
        results = await asyncio.gather(*requests)
    assert [status for status, _, _ in results] == [200] * 100
    assert auth_server.calls == 1


async def test_a_client_leaving_does_not_cancel_the_call_others_wait_for(
    auth_server: AuthServer, upstream: Upstream, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    token = auth_server.issue()
    auth_server.hold = asyncio.Event()
    async with gateway(config(auth_server, upstream, cache_ttl="0s"), tmp_path) as gw:
        leaving = asyncio.create_task(call(http, gw, "/orders", token))
        staying = asyncio.create_task(call(http, gw, "/orders", token))
        await misses(gw, 2)
        leaving.cancel()
        await asyncio.gather(leaving, return_exceptions=True)
        auth_server.hold.set()
        status, _, _ = await staying
    assert (status, auth_server.calls) == (200, 1)


# ---------------------------------------------------------------------------------------------- endpoint failures


async def test_slow_endpoint_times_out_as_503(
    auth_server: AuthServer,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    auth_server.hold = asyncio.Event()  # never set while the test runs
    token = auth_server.issue()
    async with gateway(config(auth_server, upstream, timeout="200ms"), tmp_path) as gw:
        started = time.monotonic()
        status, headers, body = await call(http, gw, "/orders", token)
        elapsed = time.monotonic() - started
        assert calls(gw, "timeout") == 1
        assert decisions(gw, "orders", "error", "introspection_unavailable") == 1
    assert (status, body["error"]) == (503, "temporarily_unavailable")
    assert headers["Retry-After"] == "5"
    assert 0.2 <= elapsed < 2
    assert any("no answer within 0.2s" in r.getMessage() for r in caplog.records if r.name == LOGGER)
    assert_not_logged(caplog, token, SECRET)


async def test_unreachable_endpoint_is_503(upstream: Upstream, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    with refusing_port() as port:
        settings = config(AuthServer(url=f"http://127.0.0.1:{port}"), upstream)
        async with gateway(settings, tmp_path) as gw:
            status, _, body = await call(http, gw, "/orders", "some-token")
            assert calls(gw, "error") == 1
    assert (status, body["error"]) == (503, "temporarily_unavailable")


@pytest.mark.parametrize("failure", list(MALFORMED))
async def test_a_malformed_answer_is_503_never_a_pass(
    failure: str,
    auth_server: AuthServer,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, reason, problem = MALFORMED[failure]
    token = auth_server.issue()
    auth_server.failure = failure
    async with gateway(config(auth_server, upstream), tmp_path) as gw:
        status, headers, body = await call(http, gw, "/orders", token)
        assert decisions(gw, "orders", "error", reason) == 1
        assert calls(gw, "invalid" if reason == "introspection_invalid" else "error") == 1
    assert (status, body["error"], headers["Retry-After"]) == (503, "temporarily_unavailable", "5")
    assert upstream.requests == []
    lines = [r for r in caplog.records if r.name == LOGGER and getattr(r, "endpoint", None) == "corp"]
    assert any(problem in r.getMessage() and problem in r.problem for r in lines), [r.getMessage() for r in lines]
    assert_not_logged(caplog, token, SECRET)


async def test_breaker_opens_after_n_failures_and_closes_after_a_good_trial(
    auth_server: AuthServer,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    clock = Clock()
    token = auth_server.issue()
    auth_server.failure = "status 500"
    settings = config(auth_server, upstream, breaker_failures=3, breaker_reset="10s")
    async with gateway(settings, tmp_path, clock) as gw:
        for _ in range(3):
            assert (await call(http, gw, "/orders", token))[0] == 503
        assert (auth_server.calls, breaker_open(gw)) == (3, 1)
        auth_server.failure = None  # the endpoint recovers, but the breaker has not tried it yet
        clock.advance(4)
        status, headers, body = await call(http, gw, "/orders", token)
        assert (status, headers["Retry-After"], auth_server.calls) == (503, "6", 3)
        assert decisions(gw, "orders", "error", "introspection_breaker_open") == 1
        assert calls(gw, "breaker_open") == 1
        clock.advance(6)  # reset elapsed: one trial call decides
        assert (await call(http, gw, "/orders", token))[0] == 200
        assert (auth_server.calls, breaker_open(gw)) == (4, 0)
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert "introspection breaker open: refusing calls for 10s" in messages
    assert "introspection breaker closed: the endpoint answers again" in messages


async def test_open_breaker_answers_at_once_without_queueing(
    auth_server: AuthServer, upstream: Upstream, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    clock = Clock()
    auth_server.hold = asyncio.Event()  # the endpoint hangs: each call costs the full timeout
    settings = config(auth_server, upstream, breaker_failures=2, breaker_reset="10s", timeout="100ms")
    async with gateway(settings, tmp_path, clock) as gw:
        for _ in range(2):
            assert (await call(http, gw, "/orders", auth_server.issue()))[0] == 503
        started = time.monotonic()
        results = await asyncio.gather(*(call(http, gw, "/orders", auth_server.issue()) for _ in range(20)))
        elapsed = time.monotonic() - started
        clock.advance(10)
        assert (await call(http, gw, "/orders", auth_server.issue()))[0] == 503  # the trial times out: open again
        assert breaker_open(gw) == 1
        assert (await call(http, gw, "/orders", auth_server.issue()))[0] == 503
    assert {status for status, _, _ in results} == {503}
    assert {headers["Retry-After"] for _, headers, _ in results} == {"10"}
    assert elapsed < 0.1 * 20 / 2  # far below twenty timeouts: nobody waited on the endpoint
    assert auth_server.calls == 3


async def test_cached_answers_keep_serving_during_an_outage(
    auth_server: AuthServer, upstream: Upstream, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    cached = auth_server.issue()
    async with gateway(config(auth_server, upstream, breaker_failures=2), tmp_path) as gw:
        assert (await call(http, gw, "/orders", cached))[0] == 200
        auth_server.failure = "status 500"
        assert (await call(http, gw, "/orders", auth_server.issue()))[0] == 503
        assert (await call(http, gw, "/orders", auth_server.issue()))[0] == 503
        assert breaker_open(gw) == 1
        assert (await call(http, gw, "/orders", cached))[0] == 200
    assert auth_server.calls == 3


def test_breaker_states() -> None:
    changes: list[bool] = []
    breaker = Breaker(failures=2, reset=10, on_change=changes.append)
    breaker.failed(0)
    breaker.succeeded()  # a success resets the count: failures must be consecutive
    breaker.failed(1)
    assert breaker.allow(1) and changes == []
    breaker.failed(2)
    assert changes == [True] and not breaker.allow(11.9) and breaker.retry_after(3) == 9
    assert breaker.allow(12)  # half-open: this caller is the one trial
    assert not breaker.allow(12) and breaker.retry_after(12) == 1
    breaker.failed(12.5)  # the trial failed: open for a full reset again
    assert changes == [True, True] and not breaker.allow(22) and breaker.allow(22.5)
    breaker.succeeded()
    assert changes == [True, True, False] and breaker.allow(22.5) and breaker.allow(22.5)


# --------------------------------------------------------------------------------------------- jwt_or_introspect


@pytest.fixture
async def mixed(idp: IdP, auth_server: AuthServer, upstream: Upstream, tmp_path: Path) -> AsyncIterator[RunningGateway]:
    issuer = {"jwks_uri": f"{idp.url}/jwks", "audiences": [AUDIENCE], "algorithms": ["RS256", "ES256"]}
    settings = config(
        auth_server,
        upstream,
        [
            route("mixed", upstream, mode="jwt_or_introspect", issuers=["corp"]),
            route("jwt", upstream, mode="jwt", issuers=["corp"], introspection=None),
        ],
    )
    settings["issuers"] = [
        {"name": "corp", "issuer": ISSUER, **issuer},
        {"name": "partner", "issuer": "https://partner.test/", **issuer},  # configured, but not on the routes
    ]
    async with gateway(settings, tmp_path) as gw:
        yield gw


async def test_a_valid_local_jwt_is_never_introspected(
    mixed: RunningGateway, auth_server: AuthServer, upstream: Upstream, rsa_key: Key, http: aiohttp.ClientSession
) -> None:
    status, _, _ = await call(http, mixed, "/mixed", rsa_key.sign(sub="bob"))
    assert (status, auth_server.calls) == (200, 0)
    assert upstream.requests[-1]["headers"]["X-Auth-Subject"] == "bob"


@pytest.mark.parametrize(
    "kind", ["opaque", "JWT of an unconfigured issuer", "JWT of an issuer not on the route", "unsigned JWT"]
)
async def test_tokens_not_from_the_routes_issuers_are_introspected(
    kind: str,
    mixed: RunningGateway,
    auth_server: AuthServer,
    upstream: Upstream,
    rsa_key: Key,
    http: aiohttp.ClientSession,
) -> None:
    tokens = {
        "opaque": None,
        "JWT of an unconfigured issuer": rsa_key.sign(iss="https://elsewhere.test/"),
        "JWT of an issuer not on the route": rsa_key.sign(iss="https://partner.test/"),
        "unsigned JWT": "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhbGljZSJ9.",
    }
    token = auth_server.issue(tokens[kind], sub="carol")
    status, _, _ = await call(http, mixed, "/mixed", token)
    assert (status, auth_server.calls) == (200, 1)
    assert auth_server.forms[0]["token"] == token
    assert upstream.requests[-1]["headers"]["X-Auth-Subject"] == "carol"


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda key: Key.rsa(kid=key.kid).sign(), "bad_signature"),  # same kid, another key
        (lambda key: key.sign(exp=int(time.time()) - 300), "expired"),
        (lambda key: key.sign(aud="api://other"), "audience"),
    ],
    ids=["bad signature", "expired", "wrong audience"],
)
async def test_a_failing_jwt_of_the_routes_issuer_is_refused_not_introspected(
    make: Callable[[Key], str],
    reason: str,
    mixed: RunningGateway,
    auth_server: AuthServer,
    rsa_key: Key,
    http: aiohttp.ClientSession,
) -> None:
    token = make(rsa_key)
    auth_server.issue(token)  # the authorization server would vouch for it: it must not be asked
    status, _, _ = await call(http, mixed, "/mixed", token)
    assert (status, auth_server.calls) == (401, 0)
    assert decisions(mixed, "mixed", "deny", reason) == 1


def _stray_bits(token: str) -> str:
    """The token with its signature's unused trailing bits set: the same bytes to a lenient base64 decoder."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    head, _, sig = token.rpartition(".")
    assert len(sig) % 4 == 2  # an RS256 signature: 342 characters, the last with 4 unused bits
    return f"{head}.{sig[:-1]}{alphabet[alphabet.index(sig[-1]) | 1]}"


@pytest.mark.parametrize(
    ("respell", "iss"),
    [
        (lambda token: token + "==", ISSUER),
        (_stray_bits, ISSUER),
        (lambda token: token + ".", ISSUER),  # Java's split drops the empty last segment: still a JWS there
        (lambda token: token + "==", "https://partner.test/"),  # configured, though not on the route
    ],
    ids=["padded signature", "stray bits", "trailing dot", "issuer not on the route"],
)
async def test_a_respelled_jwt_of_a_configured_issuer_is_refused_not_introspected(
    respell: Callable[[str], str],
    iss: str,
    mixed: RunningGateway,
    auth_server: AuthServer,
    rsa_key: Key,
    http: aiohttp.ClientSession,
) -> None:
    # A wrong audience would be refused; spelled so strict base64url refuses it, it must not reach an endpoint that
    # decodes leniently (as Keycloak does) and vouches for it.
    token = respell(rsa_key.sign(aud="api://other", iss=iss))
    auth_server.issue(token, sub="mallory")
    status, _, body = await call(http, mixed, "/mixed", token)
    assert (status, body["error"], auth_server.calls) == (401, "invalid_token", 0)
    assert decisions(mixed, "mixed", "deny", "malformed") == 1


async def test_a_respelled_jwt_of_an_unconfigured_issuer_is_still_introspected(
    mixed: RunningGateway, auth_server: AuthServer, rsa_key: Key, http: aiohttp.ClientSession
) -> None:
    token = auth_server.issue(rsa_key.sign(iss="https://elsewhere.test/") + "==", sub="carol")
    status, _, _ = await call(http, mixed, "/mixed", token)
    assert (status, auth_server.calls) == (200, 1)


@pytest.mark.parametrize("path", ["/mixed", "/jwt"])
@pytest.mark.parametrize("shape", ["opaque", "JWT"])
async def test_a_token_with_characters_no_token_has_is_400_and_never_introspected(
    path: str, shape: str, mixed: RunningGateway, auth_server: AuthServer, rsa_key: Key, http: aiohttp.ClientSession
) -> None:
    # '!' is outside RFC 6750's b64token. JWT parsing is the first to see a new token now: whatever it makes of
    # it, the answer is the malformed request's 400, and the authorization server is never asked.
    token = "opaque!token" if shape == "opaque" else rsa_key.sign() + "!"
    auth_server.issue(token)
    status, _, body = await call(http, mixed, path, token)
    assert (status, body["error"], auth_server.calls) == (400, "invalid_request", 0)
    assert decisions(mixed, path.strip("/"), "deny", "invalid_request") == 1


async def test_an_introspect_route_never_sends_a_malformed_token(
    auth_server: AuthServer, upstream: Upstream, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    token = auth_server.issue("opaque!token")
    async with gateway(config(auth_server, upstream), tmp_path) as gw:
        status, _, body = await call(http, gw, "/orders", token)
        assert (status, body["error"], auth_server.calls) == (400, "invalid_request", 0)


async def test_jwt_mode_never_introspects(
    mixed: RunningGateway, auth_server: AuthServer, http: aiohttp.ClientSession
) -> None:
    token = auth_server.issue()
    status, _, _ = await call(http, mixed, "/jwt", token)
    assert (status, auth_server.calls) == (401, 0)


# ------------------------------------------------------------------------------------------------- revocation


@pytest.mark.parametrize(("revocation", "status"), [("always", 401), ("long_lived", 200)])
async def test_revocation_set_applies_to_introspected_tokens_with_revocation_always(
    revocation: str,
    status: int,
    auth_server: AuthServer,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    token = auth_server.issue()
    answer = auth_server.tokens[token]
    settings = config(auth_server, upstream, [route("orders", upstream, revocation=revocation)])
    async with gateway(settings, tmp_path) as gw:
        assert gw.server.runtime is not None
        await gw.server.runtime.store.add(Revocation("jti", answer["jti"], answer["exp"]))
        got, _, _ = await call(http, gw, "/orders", token)
    # long_lived: an introspected token is not long-lived; the authorization server answers for it.
    assert got == status


# ------------------------------------------------------------------------------------------ client authentication


@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post", "bearer"])
async def test_client_authentication_methods(
    method: str,
    auth_server: AuthServer,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    auth_server.method = method
    token = auth_server.issue()
    settings = config(auth_server, upstream, auth_method=method)
    if method == "bearer":
        del settings["introspection"][0]["client_id"]
    async with gateway(settings, tmp_path) as gw:
        assert (await call(http, gw, "/orders", token))[0] == 200
        auth_server.secret = "rotated-on-the-server-only"
        status, _, _ = await call(http, gw, "/orders", auth_server.issue())
    assert (status, auth_server.refused_clients) == (503, 1)  # the endpoint's 401 is its failure, not the token's
    assert any("status 401" in r.getMessage() for r in caplog.records if r.name == LOGGER)
    assert_not_logged(caplog, SECRET, token)


async def test_client_secret_from_a_file(
    auth_server: AuthServer, upstream: Upstream, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    (tmp_path / "introspection.secret").write_text(SECRET + "\n")
    settings = config(auth_server, upstream, auth_method="client_secret_post")
    del settings["introspection"][0]["client_secret_env"]
    settings["introspection"][0]["client_secret_file"] = "introspection.secret"  # relative to the config file
    auth_server.method = "client_secret_post"
    async with gateway(settings, tmp_path) as gw:
        assert (await call(http, gw, "/orders", auth_server.issue()))[0] == 200


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"client_secret_env": "GW_TEST_UNSET_SECRET"}, "environment variable GW_TEST_UNSET_SECRET"),
        ({"client_secret_env": None, "client_secret_file": "missing.secret"}, "cannot read client_secret_file"),
        ({"client_secret_file": "introspection.secret"}, "exactly one of client_secret_env or client_secret_file"),
        ({"client_secret_env": None}, "exactly one of client_secret_env or client_secret_file"),
        ({"client_id": None}, "auth_method client_secret_basic needs client_id"),
        ({"auth_method": "client_secret_post", "client_id": None}, "client_secret_post needs client_id"),
        ({"endpoint": "idp.test/introspect"}, "endpoint must be an http:// or https:// URL"),
    ],
    ids=["env unset", "file missing", "both", "neither", "basic without client_id", "post without client_id", "url"],
)
def test_a_bad_client_secret_fails_check_config(change: dict[str, Any], problem: str, tmp_path: Path) -> None:
    settings = config(AuthServer(url="http://127.0.0.1:9"), Upstream(url="http://127.0.0.1:9"))
    endpoint = settings["introspection"][0]
    endpoint.update(change)
    settings["introspection"][0] = {k: v for k, v in endpoint.items() if v is not None}
    loaded = configfile.loads(yaml.safe_dump(settings), base_dir=tmp_path)
    found = compile_check(loaded)
    assert found is not None and found.startswith("introspection corp: ") and problem in found
    assert SECRET not in found


# -------------------------------------------------------------------------------------------------- shared cache


async def test_shared_cache_lets_two_gateways_call_once(
    shared_url: str,
    key_prefix: str,
    auth_server: AuthServer,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    token = auth_server.issue()
    settings = config(auth_server, upstream, shared_cache=True, cache_ttl="30s")
    settings["store"] = {"redis_url": shared_url, "key_prefix": key_prefix}
    client = connect_redis(StoreSettings(redis_url=shared_url, key_prefix=key_prefix))
    try:
        async with gateway(settings, tmp_path) as first, gateway(settings, tmp_path) as second:
            assert (await call(http, first, "/orders", token))[0] == 200
            status, _, _ = await call(http, second, "/orders", token)
            assert second.metric("gateway_introspection_requests_total", endpoint="corp", outcome="active") == 0
        keys = [key async for key in client.scan_iter(f"{key_prefix}introspection:*")]
        assert len(keys) == 1 and keys[0].startswith(f"{key_prefix}introspection:corp:")
        assert 0 < await client.pttl(keys[0]) <= 30_000
        stored = await client.get(keys[0])
        assert json.loads(stored)["sub"] == "alice" and token not in stored and token not in keys[0]
    finally:
        async for key in client.scan_iter(f"{key_prefix}*"):
            await client.delete(key)
        await client.aclose()
    assert (status, auth_server.calls) == (200, 1)


async def test_shared_cache_with_redis_down_falls_back_to_the_endpoint(
    auth_server: AuthServer, upstream: Upstream, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    token = auth_server.issue()
    with refusing_port() as port:
        settings = config(auth_server, upstream, shared_cache=True)
        settings["store"] = {"redis_url": f"redis://127.0.0.1:{port}/0"}
        async with gateway(settings, tmp_path) as gw:
            assert (await call(http, gw, "/orders", token))[0] == 200
            assert (await call(http, gw, "/orders", token))[0] == 200  # from memory
    assert auth_server.calls == 1


# --------------------------------------------------------------------------------------------------------- reload


async def test_reload_keeps_an_unchanged_endpoint_with_its_cache(
    auth_server: AuthServer,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    token = auth_server.issue()
    async with gateway(config(auth_server, upstream), tmp_path) as gw:
        assert gw.server.config_path is not None
        before = introspectors(gw)["corp"]
        assert (await call(http, gw, "/orders", token))[0] == 200
        assert await gw.server.reload()
        assert introspectors(gw)["corp"] is before
        assert (await call(http, gw, "/orders", token))[0] == 200
        assert auth_server.calls == 1
        monkeypatch.setenv(SECRET_ENV, "a-rotated-secret")  # same settings, new secret: a new client
        assert await gw.server.reload()
        assert introspectors(gw)["corp"] is not before
        monkeypatch.delenv(SECRET_ENV)
        assert not await gw.server.reload()  # refused; the previous config keeps serving
        assert introspectors(gw)["corp"].auth.secret == "a-rotated-secret"
