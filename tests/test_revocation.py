"""Revocation: by jti and by subject cut-off, mirrored from Redis by pub/sub, surviving outages and lost notices."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from gateway import signing
from gateway.config import StoreSettings
from gateway.store import STORE_ERRORS, RedisStore, Revocation, connect_redis
from tests.redis_support import PrivateCluster, PrivateRedis, free_port
from tests.support import AUDIENCE, ISSUER, IdP, Key, RunningGateway, Upstream, gateway_process, start_gateway

ADMIN_TOKEN = "test-admin-token-0123456789"
HOUR = 3600


def config(idp: IdP, upstream: Upstream, redis_url: str = "", prefix: str = "gw:", staleness: str = "300ms") -> str:
    return f"""
admin: {{host: 127.0.0.1, port: 0, token_env: GW_TEST_ADMIN_TOKEN}}
listen: {{host: 127.0.0.1, port: 0}}
store: {{redis_url: "{redis_url}", key_prefix: "{prefix}", max_staleness: {staleness}, resync_interval: 30s}}
issuers:
  - name: corp
    issuer: {ISSUER}
    jwks_uri: {idp.url}/jwks
    audiences: [{AUDIENCE}]
    algorithms: [RS256, ES256]
    long_lived_after: 1h
routes:
  - name: closed
    match: {{path_prefix: /closed}}
    upstream: {{url: "{upstream.url}"}}
    auth: {{mode: jwt, issuers: [corp], revocation: long_lived, on_unavailable: fail_closed}}
  - name: open
    match: {{path_prefix: /open}}
    upstream: {{url: "{upstream.url}"}}
    auth: {{mode: jwt, issuers: [corp], revocation: long_lived, on_unavailable: fail_open}}
  - name: always
    match: {{path_prefix: /always}}
    upstream: {{url: "{upstream.url}"}}
    auth: {{mode: jwt, issuers: [corp], revocation: always}}
  - name: never
    match: {{path_prefix: /never}}
    upstream: {{url: "{upstream.url}"}}
    auth: {{mode: jwt, issuers: [corp], revocation: never}}
"""


@pytest.fixture(autouse=True)
def admin_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GW_TEST_ADMIN_TOKEN", ADMIN_TOKEN)


def long_lived(key: Key, **claims: Any) -> str:
    now = int(time.time())
    return key.sign(iat=now, exp=now + 30 * 24 * HOUR, **claims)


async def status(http: aiohttp.ClientSession, gw: RunningGateway, path: str, token: str) -> int:
    async with http.get(f"{gw.url}{path}", headers={"Authorization": f"Bearer {token}"}) as resp:
        await resp.read()
        return resp.status


async def admin(
    http: aiohttp.ClientSession, gw: RunningGateway, method: str, path: str, **kwargs: Any
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", **kwargs.pop("headers", {})}
    async with http.request(method, f"{gw.admin_url}{path}", headers=headers, **kwargs) as resp:
        return resp.status, await resp.json()


async def until(condition: Callable[..., Awaitable[bool]], *args: Any) -> None:
    """Wait for a condition the system under test must reach; fail (not hang) past a 10 s deadline."""
    deadline = time.monotonic() + 10.0
    while not await condition(*args):
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached before the deadline")
        await asyncio.sleep(0.01)


@pytest.fixture
async def memory_gw(idp: IdP, upstream: Upstream, tmp_path: Path) -> AsyncIterator[RunningGateway]:
    async for gw in start_gateway(config(idp, upstream), tmp_path):
        yield gw


async def test_revoke_by_jti_then_undo(
    memory_gw: RunningGateway, rsa_key: Key, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    token = long_lived(rsa_key, jti="jti-1")
    assert await status(http, memory_gw, "/closed", token) == 200
    code, body = await admin(http, memory_gw, "POST", "/admin/revocations", json={"jti": "jti-1"})
    assert code == 201 and body["revoked"]["jti"] == "jti-1"
    seen = len(upstream.requests)
    async with http.get(f"{memory_gw.url}/closed", headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"] == "invalid_token"
        assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]
    assert len(upstream.requests) == seen, "a revoked token must not reach the upstream"
    assert memory_gw.metric("gateway_auth_decisions_total", route="closed", outcome="deny", reason="revoked") == 1
    assert await status(http, memory_gw, "/never", token) == 200, "revocation: never does not check"
    code, _ = await admin(http, memory_gw, "DELETE", "/admin/revocations?jti=jti-1")
    assert code == 200
    assert await status(http, memory_gw, "/closed", token) == 200
    code, _ = await admin(http, memory_gw, "DELETE", "/admin/revocations?jti=jti-1")
    assert code == 404


async def test_short_lived_tokens_are_checked_only_on_always_routes(
    memory_gw: RunningGateway, rsa_key: Key, http: aiohttp.ClientSession
) -> None:
    token = rsa_key.sign(jti="short-1")  # 10 minutes: not long-lived
    await admin(http, memory_gw, "POST", "/admin/revocations", json={"jti": "short-1"})
    assert await status(http, memory_gw, "/closed", token) == 200
    assert await status(http, memory_gw, "/always", token) == 401


async def test_subject_cutoff_revokes_only_tokens_issued_before(
    memory_gw: RunningGateway, rsa_key: Key, http: aiohttp.ClientSession
) -> None:
    now = int(time.time())
    old = rsa_key.sign(sub="mallory", iat=now - 100, exp=now + 30 * 24 * HOUR)
    new = rsa_key.sign(sub="mallory", iat=now + 5, exp=now + 30 * 24 * HOUR)
    other = rsa_key.sign(sub="bob", iat=now - 100, exp=now + 30 * 24 * HOUR)
    code, _ = await admin(http, memory_gw, "POST", "/admin/revocations", json={"subject": "mallory", "before": now})
    assert code == 201
    assert await status(http, memory_gw, "/closed", old) == 401
    assert await status(http, memory_gw, "/closed", new) == 200
    assert await status(http, memory_gw, "/closed", other) == 200


async def test_issuer_scoped_revocation_spares_other_issuers(
    memory_gw: RunningGateway, rsa_key: Key, http: aiohttp.ClientSession
) -> None:
    token = long_lived(rsa_key, jti="scoped-1")
    code, body = await admin(http, memory_gw, "POST", "/admin/revocations", json={"jti": "scoped-1", "issuer": "nope"})
    assert code == 400 and "unknown issuer" in body["error_description"]
    code, _ = await admin(http, memory_gw, "POST", "/admin/revocations", json={"jti": "scoped-1", "issuer": "corp"})
    assert code == 201
    assert await status(http, memory_gw, "/closed", token) == 401


async def test_long_lived_token_without_jti_is_refused(
    memory_gw: RunningGateway, rsa_key: Key, http: aiohttp.ClientSession
) -> None:
    now = int(time.time())
    token = rsa_key.sign(jti=None, iat=now, exp=now + 30 * 24 * HOUR)
    async with http.get(f"{memory_gw.url}/closed", headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 401
        assert "without jti" in (await resp.json())["error_description"]
    assert await status(http, memory_gw, "/never", token) == 200


BAD_REQUESTS = [
    ({"jti": "a", "subject": "b"}, "exactly one of jti or subject"),
    ({}, "exactly one of jti or subject"),
    ({"jti": ""}, "jti"),
    ({"jti": "line\nbreak"}, "jti"),
    ({"jti": "x" * 600}, "jti"),
    ({"jti": "a", "before": 5}, "before applies to subject"),
    ({"subject": "s", "expires_at": "soon"}, "expires_at"),
    ({"jti": "a", "colour": "red"}, "colour"),
    ({"jti": 5}, "jti"),
    # NaN compares false both ways: as a cut-off it revoked nothing and, beside a real one, cancelled it
    ({"subject": "s", "before": "nan"}, "before: expected unix seconds or an ISO 8601 time between 1970 and 9999"),
    ({"subject": "s", "before": float("nan")}, "the body is not valid JSON: NaN is not JSON"),
    ({"jti": "a", "expires_at": "inf"}, "expires_at: expected unix seconds or an ISO 8601 time between 1970"),
    ({"jti": "a", "expires_at": 10**400}, "expires_at: expected unix seconds or an ISO 8601 time between 1970"),
    ({"jti": "a", "expires_at": -1}, "expires_at: expected unix seconds or an ISO 8601 time between 1970"),
    # An entry pruned at the next sync would revoke for a few seconds, then lapse
    ({"jti": "a", "expires_at": "2020-01-01T00:00:00Z"}, "expires_at: the token expired long enough ago"),
]


@pytest.mark.parametrize(("body", "message"), BAD_REQUESTS)
async def test_admin_api_refuses_bad_input_clearly(
    memory_gw: RunningGateway, http: aiohttp.ClientSession, body: dict[str, Any], message: str
) -> None:
    code, answer = await admin(http, memory_gw, "POST", "/admin/revocations", json=body)
    assert code == 400
    assert answer["error"] == "invalid_request" and message in answer["error_description"]


async def test_admin_api_needs_the_admin_token(memory_gw: RunningGateway, http: aiohttp.ClientSession) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {ADMIN_TOKEN}"}):
        async with http.post(f"{memory_gw.admin_url}/admin/revocations", json={"jti": "x"}, headers=headers) as r:
            assert r.status == 401
    code, body = await admin(http, memory_gw, "POST", "/admin/revocations", data=b"{not json")
    assert code == 400 and body["error_description"] == "the body is not valid JSON"
    code, body = await admin(http, memory_gw, "POST", "/admin/revocations", json=["jti"])
    assert code == 400 and "JSON object" in body["error_description"]
    code, body = await admin(http, memory_gw, "GET", "/admin/revocations?limit=0")
    assert code == 400
    code, body = await admin(http, memory_gw, "GET", "/admin/revocations?offset=99999999999999999999")
    assert code == 400 and "offset" in body["error_description"]
    code, listing = await admin(http, memory_gw, "GET", "/admin/revocations")
    assert code == 200 and listing == {"items": [], "next_offset": None}


async def test_an_admin_token_that_is_not_utf_8_is_refused_not_a_500(memory_gw: RunningGateway) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", memory_gw.ports.admin_port)
    writer.write(b"GET /admin/revocations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n\r\n")
    async with asyncio.timeout(10):
        status_line = await reader.readline()
    writer.close()
    assert status_line.startswith(b"HTTP/1.1 401 "), status_line


async def test_revocations_kept_past_exp_by_the_longest_leeway(
    memory_gw: RunningGateway, http: aiohttp.ClientSession
) -> None:
    """A verifier still accepts a token for its leeway (at most 5m) past exp: the entry outlives exp by that."""
    exp = time.time() + 60
    code, answer = await admin(http, memory_gw, "POST", "/admin/revocations", json={"jti": "j-1", "expires_at": exp})
    assert code == 201 and answer["revoked"]["expires_at"] == exp + 300
    code, answer = await admin(http, memory_gw, "POST", "/admin/revocations", json={"jti": "j-2"})
    assert code == 201 and answer["revoked"]["expires_at"] == 253402300799.0, "no exp given: kept for good"
    # Expired, but within the longest leeway: still worth revoking.
    code, _ = await admin(
        http, memory_gw, "POST", "/admin/revocations", json={"jti": "j-3", "expires_at": time.time() - 60}
    )
    assert code == 201


async def test_a_subject_cut_off_that_is_not_a_number_is_ignored_by_the_mirror(redis_url: str, key_prefix: str) -> None:
    """Written before input was checked (or by hand): NaN beside a real cut-off once cancelled it."""
    from gateway.identity import Identity
    from gateway.metrics import Metrics
    from gateway.revocation import Mirror

    store = RedisStore(connect_redis(StoreSettings(redis_url=redis_url)), key_prefix)
    try:
        await store.client.hset(store.sub_key, "victim", "nan")
        await store.add(Revocation("subject", "victim", time.time(), "corp"))
        mirror = Mirror(store, Metrics(), resync_interval=3600, max_staleness=5)
        await mirror.full_sync()
        mirror.apply(json.dumps({"op": "add", "kind": "subject", "member": "victim", "until": "nan"}))
        issued = Identity(
            subject="victim", scopes=frozenset(), claims={}, issuer="corp", source="jwt", issued_at=time.time() - 60
        )
        assert mirror.is_revoked(issued)
    finally:
        await store.client.delete(store.sub_key)
        await store.close()


def test_a_revocation_may_be_scoped_to_an_introspection_endpoint() -> None:
    """Introspected identities carry the endpoint's name as their issuer: a revocation scoped to it is meant."""
    from gateway import configfile
    from gateway.revoke import unknown_issuer

    settings = configfile.loads(
        """
introspection:
  - {name: keycloak, endpoint: "https://idp.test/introspect", client_id: gw, client_secret_env: SECRET}
routes:
  - name: open
    match: {path_prefix: /}
    upstream: {url: "http://127.0.0.1:9"}
    auth: {mode: introspect, introspection: keycloak}
""",
        env={"SECRET": "x"},
    )
    assert unknown_issuer("keycloak", settings) is None
    assert unknown_issuer("gateway", settings) == "issuer: unknown issuer 'gateway'", "no tokens: section"
    assert unknown_issuer(None, settings) is None


async def test_admin_api_is_disabled_without_a_token(
    idp: IdP, upstream: Upstream, tmp_path: Path, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GW_TEST_ADMIN_TOKEN")
    async for gw in start_gateway(config(idp, upstream), tmp_path):
        async with http.get(f"{gw.admin_url}/admin/revocations", headers={"Authorization": "Bearer "}) as resp:
            assert resp.status == 403
            assert (await resp.json())["error"] == "admin_disabled"


async def test_paging_over_redis(
    idp: IdP, upstream: Upstream, tmp_path: Path, shared_url: str, key_prefix: str, http: aiohttp.ClientSession
) -> None:
    async for gw in start_gateway(config(idp, upstream, shared_url, key_prefix), tmp_path):
        for i in range(5):
            await admin(
                http, gw, "POST", "/admin/revocations", json={"jti": f"p{i}", "expires_at": time.time() + i + 10}
            )
        await admin(http, gw, "POST", "/admin/revocations", json={"jti": "p0", "expires_at": time.time() + 10})
        code, first = await admin(http, gw, "GET", "/admin/revocations?limit=3")
        assert code == 200 and len(first["items"]) == 3 and first["next_offset"] == 3
        code, rest = await admin(http, gw, "GET", "/admin/revocations?limit=3&offset=3")
        assert [i["jti"] for i in first["items"] + rest["items"]] == ["p0", "p1", "p2", "p3", "p4"]
        assert rest["next_offset"] is None


async def test_two_gateways_sharing_redis_both_refuse(
    idp: IdP,
    upstream: Upstream,
    tmp_path: Path,
    shared_url: str,
    key_prefix: str,
    rsa_key: Key,
    http: aiohttp.ClientSession,
) -> None:
    token = long_lived(rsa_key, jti="shared-1")
    text = config(idp, upstream, shared_url, key_prefix)
    async for first in start_gateway(text, tmp_path):
        async for second in start_gateway(text, tmp_path):
            for gw in (first, second):
                await until(_ready, http, gw)
                assert await status(http, gw, "/closed", token) == 200
            code, _ = await admin(http, first, "POST", "/admin/revocations", json={"jti": "shared-1"})
            assert code == 201
            for gw in (first, second):
                await until(_refused, http, gw, token)
            assert second.metric("gateway_revoked_tokens") == 1


async def _ready(http: aiohttp.ClientSession, gw: RunningGateway) -> bool:
    async with http.get(f"{gw.admin_url}/readyz") as resp:
        return resp.status == 200


async def _refused(http: aiohttp.ClientSession, gw: RunningGateway, token: str) -> bool:
    return await status(http, gw, "/closed", token) == 401


async def test_redis_outage_under_both_policies_and_healing(
    idp: IdP,
    upstream: Upstream,
    tmp_path: Path,
    private_redis: PrivateRedis,
    rsa_key: Key,
    http: aiohttp.ClientSession,
) -> None:
    token = long_lived(rsa_key, jti="outage-1")
    revoked = long_lived(rsa_key, jti="outage-revoked")
    short = rsa_key.sign()
    async for gw in start_gateway(config(idp, upstream, private_redis.url, "gw:"), tmp_path):
        await until(_ready, http, gw)
        assert gw.metric("gateway_store_up") == 1
        code, _ = await admin(http, gw, "POST", "/admin/revocations", json={"jti": "outage-revoked"})
        assert code == 201
        await until(_status_is, http, gw, "/open", revoked, 401)
        private_redis.stop()
        await until(_status_is, http, gw, "/closed", token, 503)
        async with http.get(f"{gw.url}/closed", headers={"Authorization": f"Bearer {token}"}) as resp:
            assert resp.status == 503 and resp.headers["Retry-After"].isdigit()
            assert (await resp.json())["error"] == "temporarily_unavailable"
        assert await status(http, gw, "/open", token) == 200, "fail_open serves, and counts it"
        # What the stale mirror knows was revoked stays refused, whichever the policy.
        assert await status(http, gw, "/open", revoked) == 401
        assert await status(http, gw, "/closed", revoked) == 401
        assert gw.metric("gateway_revocation_checks_total", result="stale_open") >= 1
        assert await status(http, gw, "/closed", short) == 200, "tokens needing no check are unaffected"
        assert gw.metric("gateway_store_up") == 0
        assert gw.metric("gateway_revocation_mirror_age_seconds") > 0.3
        private_redis.start()  # empty again: it keeps nothing on disk
        await until(_status_is, http, gw, "/closed", token, 200)
        assert gw.metric("gateway_store_up") == 1
        code, _ = await admin(http, gw, "POST", "/admin/revocations", json={"jti": "outage-1"})
        assert code == 201
        assert await status(http, gw, "/closed", token) == 401


async def _status_is(http: aiohttp.ClientSession, gw: RunningGateway, path: str, token: str, code: int) -> bool:
    return await status(http, gw, path, token) == code


class Cuttable:
    """A TCP relay to Redis that a test can cut (drop connections, refuse new ones) and restore."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.open = True
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> None:
        self.open = False
        for writer in self._writers:
            writer.close()
        self._writers.clear()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def test_notice_published_while_disconnected_is_applied_after_reconnect(
    idp: IdP,
    upstream: Upstream,
    tmp_path: Path,
    private_redis: PrivateRedis,
    rsa_key: Key,
    http: aiohttp.ClientSession,
) -> None:
    relay = Cuttable(private_redis.port)
    await relay.start()
    token = long_lived(rsa_key, jti="missed-1")
    relayed = f"redis://127.0.0.1:{relay.port}/0"
    try:
        async for gw in start_gateway(config(idp, upstream, relayed, "gw:", staleness="60s"), tmp_path):
            await until(_ready, http, gw)
            relay.cut()
            await until(_metric_is, gw, "gateway_store_up", 0)
            direct = RedisStore(connect_redis(StoreSettings(redis_url=private_redis.url)), "gw:")
            await direct.add(Revocation("jti", "missed-1", time.time() + HOUR))  # its notice reaches no one
            await direct.close()
            assert await status(http, gw, "/closed", token) == 200, "the mirror has not heard of it yet"
            relay.open = True
            await until(_refused, http, gw, token)
    finally:
        await relay.close()


async def _metric_is(gw: RunningGateway, name: str, value: float) -> bool:
    return gw.metric(name) == value


async def test_writes_are_idempotent_and_expired_entries_are_pruned(shared_url: str, key_prefix: str) -> None:
    store = RedisStore(connect_redis(StoreSettings(redis_url=shared_url, key_prefix=key_prefix)), key_prefix)
    client = store.client
    try:
        await store.add(Revocation("jti", "same", time.time() + HOUR))
        await store.add(Revocation("jti", "same", time.time() + HOUR))
        await store.add(Revocation("jti", "gone", time.time() - 1))
        assert await client.zcard(f"{key_prefix}revoked:jti") == 2
        jtis, _ = await store.snapshot()
        assert set(jtis) == {"same"}
        assert await client.zcard(f"{key_prefix}revoked:jti") == 1
        assert await store.remove("jti", "same", None) is True
        assert await store.remove("jti", "same", None) is False
    finally:
        await client.delete(f"{key_prefix}revoked:jti")
        await store.close()


def _cli(*args: str, config_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args, "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "GW_TEST_ADMIN_TOKEN": ADMIN_TOKEN},
    )


async def test_cli_against_redis_with_no_gateway_running(
    idp: IdP, upstream: Upstream, tmp_path: Path, shared_url: str, key_prefix: str
) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(config(idp, upstream, shared_url, key_prefix))
    done = _cli("revoke", "--jti", "cli-1", "--expires-at", "2099-01-01T00:00:00Z", config_path=path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["revoked"]["expires_at"] == 4070908800.0 + 300, "exp, and the longest leeway"
    done = _cli("revoke", "--subject", "eve", "--before", "1700000000", "--issuer", "corp", config_path=path)
    assert done.returncode == 0, done.stderr
    listed = _cli("revocations", "list", "--kind", "subject", config_path=path)
    assert json.loads(listed.stdout) == {"kind": "subject", "subject": "eve", "issuer": "corp", "before": 1700000000.0}
    bad = _cli("revoke", "--jti", "x", "--before", "yesterday", config_path=path)
    assert bad.returncode == 2 and "before" in bad.stderr
    assert _cli("revocations", "delete", "--jti", "cli-1", config_path=path).returncode == 0
    assert _cli("revocations", "delete", "--jti", "cli-1", config_path=path).returncode == 1
    memory = tmp_path / "memory.yaml"
    memory.write_text(config(idp, upstream))
    refused = _cli("revoke", "--jti", "x", config_path=memory)
    assert refused.returncode == 1 and "use its admin API" in refused.stderr


async def test_cli_refuses_an_issuer_the_config_does_not_name(
    idp: IdP, upstream: Upstream, tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    """As the admin API does: a revocation scoped to an unknown issuer would revoke nothing. Nothing is written."""
    path = tmp_path / "gw.yaml"
    path.write_text(config(idp, upstream, redis_url, key_prefix))
    for issuer in ("doesnotexist", "gateway"):  # the gateway's own issuer exists only with a tokens: section
        refused = _cli("revoke", "--jti", "abc", "--issuer", issuer, config_path=path)
        assert refused.returncode == 2 and refused.stdout == ""
        assert f"issuer: unknown issuer '{issuer}'" in refused.stderr, refused.stderr
    client = aioredis.Redis.from_url(redis_url)
    try:
        assert [k async for k in client.scan_iter(f"{key_prefix}*")] == [], "the store was not touched"
        key = tmp_path / "signing.pem"
        signing.write_private_key(signing.generate("ES256"), str(key))
        path.write_text(path.read_text() + f"tokens: {{issuer: 'https://gateway.test/', signing_key_file: '{key}'}}\n")
        done = _cli("revoke", "--jti", "abc", "--issuer", "gateway", config_path=path)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["revoked"]["issuer"] == "gateway"
    finally:
        await client.delete(f"{key_prefix}revoked:jti")
        await client.aclose()


async def test_cli_listing_clamps_offset_and_limit_as_tokens_list_does(
    idp: IdP, upstream: Upstream, tmp_path: Path, shared_url: str, key_prefix: str
) -> None:
    """A negative offset is 0, a limit below 1 is 1 and one over the admin API's MAX_PAGE (1000) is 1000: passed on
    as they were, they were ranges counted from the end (--offset -2: the last two; --limit -1: all but the last)."""
    path = tmp_path / "gw.yaml"
    path.write_text(config(idp, upstream, shared_url, key_prefix))
    store = RedisStore(connect_redis(StoreSettings(redis_url=shared_url, key_prefix=key_prefix)), key_prefix)
    base = time.time() + HOUR
    try:
        await store.client.zadd(store.jti_key, {f"j{i:04d}": base + i for i in range(1001)})
        for subject in ("alice", "bob", "carol"):
            await store.add(Revocation("subject", subject, 1700000000.0))
        asks = {
            ("--limit", "-1"): ["j0000"],
            ("--limit", "0"): ["j0000"],
            ("--offset", "-2", "--limit", "2"): ["j0000", "j0001"],
            ("--offset", "999", "--limit", "5000"): ["j0999", "j1000"],
            ("--limit", "5000"): [f"j{i:04d}" for i in range(1000)],
            ("--kind", "subject", "--offset", "-1"): ["alice", "bob", "carol"],
        }
        runs = await asyncio.gather(
            *(asyncio.to_thread(_cli, "revocations", "list", *ask, config_path=path) for ask in asks)
        )
        for (ask, expected), done in zip(asks.items(), runs, strict=True):
            assert done.returncode == 0, done.stderr
            listed = [json.loads(line) for line in done.stdout.splitlines()]
            assert [item.get("jti") or item.get("subject") for item in listed] == expected, ask
            assert ("capped at 1000" in done.stderr) == ("5000" in ask)
    finally:
        await store.client.delete(store.jti_key, store.sub_key)
        await store.close()


async def _heartbeats_at_least(gw: RunningGateway, count: int) -> bool:
    assert gw.server.runtime is not None
    return gw.server.runtime.mirror.heartbeats >= count


async def test_idle_mirror_keeps_one_subscription_across_heartbeats(
    idp: IdP, upstream: Upstream, tmp_path: Path, redis_url: str, key_prefix: str, http: aiohttp.ClientSession
) -> None:
    """An idle mirror is confirmed by PONGs on its subscription, without reconnecting (the RESP3 PONG bug)."""
    async for gw in start_gateway(config(idp, upstream, redis_url, key_prefix, staleness="200ms"), tmp_path):
        await until(_ready, http, gw)
        await until(_heartbeats_at_least, gw, 10)  # heartbeat every 50 ms: ten of them
        mirror = gw.server.runtime.mirror  # type: ignore[union-attr]
        assert mirror.sessions == 1, "the subscription was dropped and re-made"
        assert mirror.age() < 0.2
        assert gw.metric("gateway_store_up") == 1


async def test_admin_api_answers_503_while_redis_is_down(
    idp: IdP, upstream: Upstream, tmp_path: Path, private_redis: PrivateRedis, http: aiohttp.ClientSession
) -> None:
    async for gw in start_gateway(config(idp, upstream, private_redis.url, "gw:"), tmp_path):
        await until(_ready, http, gw)
        private_redis.stop()
        code, body = await admin(http, gw, "POST", "/admin/revocations", json={"jti": "x"})
        assert code == 503 and body["error"] == "store_unavailable"
        code, body = await admin(http, gw, "GET", "/admin/revocations")
        assert code == 503


async def test_two_gateway_processes_sharing_redis_both_refuse(
    idp: IdP, upstream: Upstream, tmp_path: Path, shared_url: str, key_prefix: str, rsa_key: Key,
    http: aiohttp.ClientSession,
) -> None:  # fmt: skip
    """Separate processes (own event loop, own mirror) on one Redis; the revocation is made by the CLI."""
    token = long_lived(rsa_key, jti="processes-1")
    text = config(idp, upstream, shared_url, key_prefix)
    env = {"GW_TEST_ADMIN_TOKEN": ADMIN_TOKEN}
    async with gateway_process(text, tmp_path, env=env, args=("--workers", "1")) as first:
        async with gateway_process(text, tmp_path, env=env, args=("--workers", "1")) as second:
            for gw in (first, second):
                await until(_ready_url, http, gw.admin_url)
                assert await _status_at(http, gw.url, token) == 200
            path = tmp_path / "cli.yaml"
            path.write_text(text)
            done = _cli("revoke", "--jti", "processes-1", config_path=path)
            assert done.returncode == 0, done.stderr
            for gw in (first, second):
                await until(_status_at_is, http, gw.url, token, 401)


async def _ready_url(http: aiohttp.ClientSession, admin_url: str) -> bool:
    async with http.get(f"{admin_url}/readyz") as resp:
        return resp.status == 200


async def _status_at(http: aiohttp.ClientSession, url: str, token: str) -> int:
    async with http.get(f"{url}/closed", headers={"Authorization": f"Bearer {token}"}) as resp:
        await resp.read()
        return resp.status


async def _status_at_is(http: aiohttp.ClientSession, url: str, token: str, code: int) -> bool:
    return await _status_at(http, url, token) == code


async def test_a_notice_arriving_during_a_full_sync_survives_the_swap(redis_url: str, key_prefix: str) -> None:
    """The snapshot is taken before the change and swapped in after its notice: the notice is replayed onto it."""
    from gateway.metrics import Metrics
    from gateway.revocation import Mirror

    taken, release = asyncio.Event(), asyncio.Event()

    class SlowSnapshot(RedisStore):
        async def snapshot(self) -> tuple[dict[str, float], dict[str, float]]:
            result = await super().snapshot()  # a real snapshot, from before the change below
            taken.set()
            await release.wait()
            return result

    store = SlowSnapshot(connect_redis(StoreSettings(redis_url=redis_url)), key_prefix)
    try:
        mirror = Mirror(store, Metrics(), resync_interval=3600, max_staleness=5)
        sync = asyncio.create_task(mirror.full_sync())
        await taken.wait()
        change = Revocation("jti", "during-sync", time.time() + HOUR)
        await store.add(change)
        mirror.apply(change.notice("add"))  # as the subscription delivers it, while the snapshot is in flight
        assert "during-sync" in mirror.jtis, "applied to the live mirror at once"
        release.set()
        await sync
        assert "during-sync" in mirror.jtis, "lost when the older snapshot was swapped in"
    finally:
        await store.client.delete(store.jti_key)
        await store.close()


async def test_a_revocation_reaches_the_mirror_after_its_slot_moves_to_another_node(
    idp: IdP, upstream: Upstream, tmp_path: Path, rsa_key: Key, http: aiohttp.ClientSession
) -> None:
    """Redis Cluster, resharded under a running gateway: the admin API's write follows the slot (MOVED) to its new
    node, and the mirror, still subscribed on the old one, hears the notice (PUBLISH reaches every node)."""
    try:
        cluster = PrivateCluster()  # its own: this test moves a slot
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    await asyncio.to_thread(cluster.start)
    try:
        prefix = "{moving}:"
        token, later = long_lived(rsa_key, jti="moved-1"), long_lived(rsa_key, jti="moved-2")
        async for gw in start_gateway(config(idp, upstream, cluster.url, prefix), tmp_path):
            await until(_ready, http, gw)
            code, _ = await admin(http, gw, "POST", "/admin/revocations", json={"jti": "before-the-move"})
            assert code == 201 and await status(http, gw, "/closed", token) == 200
            old, new = await asyncio.to_thread(cluster.move_slot_of, prefix)
            assert old != new
            code, _ = await admin(http, gw, "POST", "/admin/revocations", json={"jti": "moved-1"})
            assert code == 201
            await until(_refused, http, gw, token)
            assert await status(http, gw, "/closed", later) == 200
            code, listed = await admin(http, gw, "GET", "/admin/revocations?kind=jti")
            assert code == 200 and {i["jti"] for i in listed["items"]} == {"before-the-move", "moved-1"}

            # The subscription follows the slot: on the old node the notices come only over the cluster bus, if at
            # all, while its PONGs kept the mirror looking fresh (a revoked token was let in for 20 s).
            async def follows(new: int = new) -> bool:
                channel = f"{prefix}revocations"
                return await asyncio.to_thread(cluster.subscribers, new, channel) == 1

            await until(follows)
            assert await asyncio.to_thread(cluster.subscribers, old, f"{prefix}revocations") == 0
    finally:
        cluster.close()


async def test_a_hung_cluster_node_fails_a_store_call_in_seconds_not_half_a_minute(key_prefix: str) -> None:
    """redis-py's cluster client retried a timed-out command three times, re-learning the slots in between: 22 s
    for an admin call (and the CLI, and the final usage flush) where a single Redis fails in 2 s."""
    try:
        cluster = PrivateCluster()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    await asyncio.to_thread(cluster.start)
    owner = cluster.owner_of(key_prefix)
    store = RedisStore(connect_redis(StoreSettings(redis_url=cluster.url, key_prefix=key_prefix)), key_prefix)
    try:
        await store.add(Revocation("jti", "before", time.time() + HOUR))
        assert owner.process is not None
        os.kill(owner.process.pid, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(STORE_ERRORS):
            await store.add(Revocation("jti", "while-hung", time.time() + HOUR))
        assert time.monotonic() - started < 10
        os.kill(owner.process.pid, signal.SIGCONT)
        await store.add(Revocation("jti", "after", time.time() + HOUR))  # and it recovers
    finally:
        if owner.process is not None:
            os.kill(owner.process.pid, signal.SIGCONT)
        await store.close()
        cluster.close()


async def test_the_mirror_outlives_an_error_it_did_not_foresee(
    redis_url: str, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug or a client-library surprise (a cluster client once raised KeyError before learning its slots) used to
    end the mirror's task for good, silently: the mirror aged and revocations stopped arriving."""
    from gateway.metrics import Metrics
    from gateway.revocation import Mirror

    class Surprising(RedisStore):
        failures = 2

        async def snapshot(self) -> tuple[dict[str, float], dict[str, float]]:
            if self.failures:
                self.failures -= 1
                raise KeyError(2372)
            return await super().snapshot()

    store = Surprising(connect_redis(StoreSettings(redis_url=redis_url)), key_prefix)
    mirror = Mirror(store, Metrics(), resync_interval=3600, max_staleness=5)
    task = asyncio.create_task(mirror.run())
    try:
        await asyncio.wait_for(mirror.synced.wait(), 10)
        assert store.failures == 0 and not task.done()
        await store.add(Revocation("jti", "after-the-surprise", time.time() + HOUR))

        async def heard() -> bool:
            return "after-the-surprise" in mirror.jtis

        await until(heard)
        logged = [r for r in caplog.records if "unexpected error" in r.getMessage()]
        assert len(logged) == 1 and logged[0].exc_info is not None, "once per streak, with its traceback"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await store.client.delete(store.jti_key)
        await store.close()
