"""The token service end to end: mint, use, last use and device, list, revoke; JWKS and discovery; the refresh grant
with narrowing, rotation and reuse detection; the admin API's guard and input checks; the CLI. Real gateways on
127.0.0.1, a real Redis (and the embedded memory store), real HTTP."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import redis.asyncio as aioredis
from prometheus_client import generate_latest

from gateway import configfile, oauth, signing
from gateway.config import StoreSettings, TokensSettings
from gateway.store import LastUse, MemoryStore, RedisStore, Revocation, connect_redis
from gateway.token_records import MintError, MintRequest
from gateway.tokens import Issuer, TokenService
from tests.redis_support import PrivateRedis
from tests.support import RunningGateway, Upstream, log_text, refusing_port, start_gateway

ADMIN_TOKEN = "test-admin-token-for-tokens-0123456789"
ADMIN_ENV = "GW_TOKENS_TEST_ADMIN_TOKEN"
ISSUER_URL = "https://gateway.test/"
AUD = "api://tools"
DAY = 86400


@pytest.fixture(autouse=True)
def admin_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ADMIN_ENV, ADMIN_TOKEN)


def key_file(tmp_path: Path, alg: str = "ES256") -> str:
    path = tmp_path / f"signing-{alg}-{uuid.uuid4().hex[:6]}.pem"
    signing.write_private_key(signing.generate(alg), str(path))
    return str(path)


def config(
    upstream: Upstream,
    keys: list[str],
    redis_url: str = "",
    prefix: str = "gw:",
    interval: str = "60s",
    staleness: str = "5s",
) -> str:
    return f"""
admin: {{host: 127.0.0.1, port: 0, token_env: {ADMIN_ENV}}}
listen: {{host: 127.0.0.1, port: 0}}
store: {{redis_url: "{redis_url}", key_prefix: "{prefix}", max_staleness: {staleness}, resync_interval: 30s}}
tokens:
  issuer: {ISSUER_URL}
  signing_key_files: [{", ".join(keys)}]
  audiences: [{AUD}]
  max_lifetime: 365d
  access_token_lifetime: 15m
  last_use_interval: {interval}
routes:
  - name: tools
    match: {{path_prefix: /tools}}
    upstream: {{url: "{upstream.url}"}}
    auth: {{mode: jwt, issuers: [gateway], required_scopes: [tools:read]}}
  - name: everything
    match: {{path_prefix: /}}
    upstream: {{url: "{upstream.url}"}}
    auth: {{mode: none}}
"""


async def running(text: str, tmp_path: Path) -> AsyncIterator[RunningGateway]:
    """start_gateway, then wait until it is ready (with Redis: the revocation mirror has synced once)."""
    async for gw in start_gateway(text, tmp_path):
        async with aiohttp.ClientSession() as http:

            async def ready(gw: RunningGateway = gw) -> bool:
                async with http.get(f"{gw.admin_url}/readyz") as resp:
                    return resp.status == 200

            await until(ready)
        yield gw


@pytest.fixture(params=["memory", "redis", "cluster"])
def store_url(request: pytest.FixtureRequest) -> str:
    """Each test using it runs against the embedded memory store, a real Redis and a real Redis Cluster."""
    if request.param == "memory":
        return ""
    return str(request.getfixturevalue("redis_cluster_url" if request.param == "cluster" else "redis_url"))


@pytest.fixture
async def gw(upstream: Upstream, tmp_path: Path, store_url: str, key_prefix: str) -> AsyncIterator[RunningGateway]:
    async for started in running(config(upstream, [key_file(tmp_path)], store_url, key_prefix), tmp_path):
        yield started


async def admin(
    http: aiohttp.ClientSession, gw: RunningGateway, method: str, path: str, **kwargs: Any
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", **kwargs.pop("headers", {})}
    async with http.request(method, f"{gw.admin_url}{path}", headers=headers, **kwargs) as resp:
        return resp.status, await resp.json()


async def mint(http: aiohttp.ClientSession, gw: RunningGateway, **body: Any) -> tuple[str, dict[str, Any]]:
    code, answer = await admin(http, gw, "POST", "/admin/tokens", json={"subject": "ci-bot", **body})
    assert code == 201, answer
    return answer["token"], answer["metadata"]


async def use(
    http: aiohttp.ClientSession, gw: RunningGateway, token: str, agent: str = "ci-runner/1.0", path: str = "/tools/x"
) -> int:
    headers = {"Authorization": f"Bearer {token}", "User-Agent": agent}
    async with http.get(f"{gw.url}{path}", headers=headers) as resp:
        await resp.read()
        return resp.status


async def exchange(
    http: aiohttp.ClientSession, gw: RunningGateway, **form: str
) -> tuple[int, Any, aiohttp.ClientResponse]:
    async with http.post(f"{gw.url}/oauth/token", data=form, headers={"User-Agent": "agent/2"}) as resp:
        return resp.status, await resp.json(), resp


async def until(condition: Callable[[], Awaitable[bool]], within: float = 10.0) -> float:
    """Wait for a state the system must reach (polling it); fail past `within`. Returns how long it took."""
    started = time.monotonic()
    while not await condition():
        if time.monotonic() - started > within:
            raise AssertionError("condition not reached before the deadline")
        await asyncio.sleep(0.005)
    return time.monotonic() - started


def claims_of(token: str) -> dict[str, Any]:
    return dict(jwt.decode(token, options={"verify_signature": False}))


def issuer_of(gw: RunningGateway) -> tuple[TokenService, Issuer]:
    runtime = gw.server.runtime
    assert runtime is not None and runtime.gateway is not None and runtime.gateway.signer is not None
    tokens = runtime.gateway.settings.tokens
    assert tokens is not None
    return runtime.tokens, runtime.tokens.issuer(tokens, runtime.gateway.signer)


def assert_secret_free(secrets: list[str], gw: RunningGateway, caplog: pytest.LogCaptureFixture) -> None:
    text = log_text(caplog.records)
    exposition = generate_latest(gw.metrics.registry).decode()
    for secret in secrets:
        assert secret not in text, "a token reached the logs"
        assert secret not in exposition, "a token reached the metrics"


# --- Issuing: keys, JWKS, discovery ---------------------------------------------------------------------------------


def test_thumbprint_is_rfc7638() -> None:
    """The RFC 7638 §3.1 example key and its thumbprint."""
    jwk = {
        "kty": "RSA",
        "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMs"
        "tn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n"
        "91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
        "e": "AQAB",
        "alg": "RS256",
        "kid": "2011-04-29",
    }
    assert signing.thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


@pytest.mark.parametrize("alg", ["ES256", "RS256", "EdDSA"])
def test_generated_keys_have_thumbprint_kids(tmp_path: Path, alg: str) -> None:
    key = signing.load_private_key(key_file(tmp_path, alg))
    assert key.alg == alg
    public = {k: v for k, v in key.public_jwk.items() if k not in ("kid", "alg", "use")}
    assert key.kid == signing.thumbprint(public)
    assert "d" not in key.public_jwk


async def test_jwks_and_discovery_are_public_on_both_listeners_before_route_matching(
    upstream: Upstream, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    first, second = key_file(tmp_path, "ES256"), key_file(tmp_path, "RS256")
    async for gw in running(config(upstream, [first, second]), tmp_path):
        for base in (gw.url, gw.admin_url):
            async with http.get(f"{base}/.well-known/jwks.json") as resp:
                assert resp.status == 200
                jwks = await resp.json()
            kids = [signing.load_private_key(p).kid for p in (first, second)]
            assert [k["kid"] for k in jwks["keys"]] == kids
            assert [k["alg"] for k in jwks["keys"]] == ["ES256", "RS256"]
            assert all("d" not in k and "p" not in k for k in jwks["keys"]), "no private members"
            async with http.get(f"{base}/.well-known/openid-configuration") as resp:
                assert resp.status == 200
                discovery = await resp.json()
            assert discovery["issuer"] == ISSUER_URL
            assert discovery["jwks_uri"] == "https://gateway.test/.well-known/jwks.json"
            assert discovery["token_endpoint"] == "https://gateway.test/oauth/token"
            assert discovery["grant_types_supported"] == ["refresh_token"]
        async with http.post(f"{gw.url}/.well-known/jwks.json") as resp:
            assert resp.status == 405
        assert upstream.requests == [], "the catch-all route never saw the token service's paths"
        # The JWKS verifies the gateway's tokens for anyone: a resource server's own check.
        token, _ = await mint(http, gw, scopes="tools:read")
        header = jwt.get_unverified_header(token)
        key = jwt.PyJWK(next(k for k in jwks["keys"] if k["kid"] == header["kid"]))
        verified = jwt.decode(token, key.key, algorithms=[header["alg"]], audience=AUD, issuer=ISSUER_URL)
        assert verified["sub"] == "ci-bot" and header["typ"] == "at+jwt"


async def test_key_rotation_first_key_signs_all_keys_verify(
    upstream: Upstream, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    current, previous = key_file(tmp_path, "ES256"), key_file(tmp_path, "EdDSA")
    async for gw in running(config(upstream, [current, previous]), tmp_path):
        token, meta = await mint(http, gw, scopes=["tools:read"])
        assert jwt.get_unverified_header(token)["kid"] == signing.load_private_key(current).kid
        # A token signed before the rotation, by the key now second in the list, still verifies.
        now = int(time.time())
        old = signing.Signer.from_files((previous,)).sign(
            {"iss": ISSUER_URL, "sub": "old", "aud": AUD, "scope": "tools:read", "iat": now, "exp": now + DAY,
             "jti": str(uuid.uuid4())}
        )  # fmt: skip
        assert jwt.get_unverified_header(old)["kid"] == signing.load_private_key(previous).kid
        assert await use(http, gw, old) == 200
        assert await use(http, gw, token) == 200
        # A key that was dropped from the list no longer verifies.
        stranger = signing.Signer([signing.signing_key(signing.generate("ES256"))])
        forged = stranger.sign({**claims_of(old), "jti": str(uuid.uuid4())})
        assert await use(http, gw, forged) == 401


@pytest.mark.parametrize("alg", ["ES256", "RS256", "EdDSA"])
async def test_each_algorithm_mints_usable_tokens(
    upstream: Upstream, tmp_path: Path, http: aiohttp.ClientSession, alg: str
) -> None:
    async for gw in running(config(upstream, [key_file(tmp_path, alg)]), tmp_path):
        token, _ = await mint(http, gw, scopes="tools:read")
        assert jwt.get_unverified_header(token)["alg"] == alg
        assert await use(http, gw, token) == 200
        refresh, _ = await mint(http, gw, scopes="tools:read", kind="refresh")
        code, body, _ = await exchange(http, gw, grant_type="refresh_token", refresh_token=refresh)
        assert code == 200 and await use(http, gw, body["access_token"]) == 200


# --- Mint, use, list, revoke ----------------------------------------------------------------------------------------


async def test_mint_use_list_revoke(
    gw: RunningGateway, http: aiohttp.ClientSession, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token, meta = await mint(
        http, gw, scopes=["tools:read", "tools:write"], lifetime="90d", note="CI pipeline", claims={"team": "platform"}
    )
    jti = meta["jti"]
    assert meta["kind"] == "access" and meta["status"] == "active"
    assert meta["audience"] == [AUD] and meta["scopes"] == ["tools:read", "tools:write"]
    assert meta["lifetime"] == 90 * DAY and meta["expires_at"] - meta["created_at"] == pytest.approx(90 * DAY, abs=1)
    assert meta["token_sha256"] == hashlib.sha256(token.encode()).hexdigest()
    assert meta["claims"] == claims_of(token) and meta["claims"]["team"] == "platform"
    assert meta["note"] == "CI pipeline" and meta["last_used_at"] is None and meta["last_device"] is None
    assert token not in json.dumps(meta)

    assert await use(http, gw, token, agent="ci-runner/1.0") == 200
    assert upstream.requests[-1]["path"] == "/tools/x"

    async def used() -> bool:
        _, shown = await admin(http, gw, "GET", f"/admin/tokens/{jti}")
        return shown["last_used_at"] is not None

    await until(used)
    code, shown = await admin(http, gw, "GET", f"/admin/tokens/{jti}")
    assert code == 200
    assert shown["last_device"] == {"client": "127.0.0.1", "user_agent": "ci-runner/1.0"}
    assert shown["first_seen"] == shown["last_seen"] == shown["last_used_at"] >= shown["created_at"]
    assert token not in json.dumps(shown)

    code, listing = await admin(http, gw, "GET", "/admin/tokens?subject=ci-bot&status=active")
    assert code == 200 and [i["jti"] for i in listing["items"]] == [jti] and listing["next_offset"] is None
    _, other = await admin(http, gw, "GET", "/admin/tokens?subject=someone-else")
    assert other["items"] == []
    _, by_audience = await admin(http, gw, "GET", f"/admin/tokens?audience={AUD}")
    assert [i["jti"] for i in by_audience["items"]] == [jti]
    code, sessions = await admin(http, gw, "GET", "/admin/sessions")
    assert code == 200
    (session,) = sessions["items"]
    assert session["jti"] == jti and session["subject"] == "ci-bot"
    assert session["scopes"] == ["tools:read", "tools:write"]
    assert session["last_device"]["user_agent"] == "ci-runner/1.0"
    assert session["issued_at"] == claims_of(token)["iat"] and session["expires_at"] == claims_of(token)["exp"]

    code, revoked = await admin(http, gw, "DELETE", f"/admin/tokens/{jti}?reason=leaked+in+a+log&by=alice")
    assert code == 200
    assert revoked["revoked"]["status"] == "revoked" and revoked["revoked"]["revoked_by"] == "alice"
    assert revoked["revoked"]["revoke_reason"] == "leaked in a log"

    async def refused() -> bool:
        return await use(http, gw, token) == 401

    await until(refused, within=5.0)  # the propagation bound: the mirror follows within max_staleness
    _, listing = await admin(http, gw, "GET", "/admin/tokens?status=revoked")
    assert [i["jti"] for i in listing["items"]] == [jti]
    _, sessions = await admin(http, gw, "GET", "/admin/sessions")
    assert sessions["items"] == [], "a revoked token is no longer a session"
    code, again = await admin(http, gw, "DELETE", f"/admin/tokens/{jti}", json={"reason": "twice", "by": "bob"})
    assert code == 200 and again["revoked"]["revoked_by"] == "alice", "the first revoke's record stays"
    _, revocations = await admin(http, gw, "GET", "/admin/revocations")
    assert {"jti": jti, "issuer": "gateway"}.items() <= revocations["items"][0].items()
    assert_secret_free([token], gw, caplog)


async def test_revoke_reaches_another_instance_within_the_bound(
    upstream: Upstream, tmp_path: Path, redis_url: str, key_prefix: str, http: aiohttp.ClientSession
) -> None:
    text = config(upstream, [key_file(tmp_path)], redis_url, key_prefix, staleness="1s")
    async for first in running(text, tmp_path):
        async for second in running(text, tmp_path):
            token, meta = await mint(http, first, scopes="tools:read")
            assert await use(http, second, token, agent="elsewhere/1") == 200

            async def seen_by_first(first: RunningGateway = first, jti: str = meta["jti"]) -> bool:
                _, shown = await admin(http, first, "GET", f"/admin/tokens/{jti}")
                return shown["last_device"] is not None

            await until(seen_by_first)  # a use on one instance shows on the other: the metadata is shared
            _, shown = await admin(http, first, "GET", f"/admin/tokens/{meta['jti']}")
            assert shown["last_device"]["user_agent"] == "elsewhere/1"
            code, _ = await admin(http, first, "DELETE", f"/admin/tokens/{meta['jti']}")
            assert code == 200

            async def refused(second: RunningGateway = second, token: str = token) -> bool:
                return await use(http, second, token) == 401

            took = await until(refused, within=1.0)  # max_staleness is the bound; pub/sub is far faster
            print(f"revocation reached the other instance in {took * 1000:.1f} ms")


async def test_expired_tokens_are_listed_as_expired_and_refused(
    gw: RunningGateway, http: aiohttp.ClientSession
) -> None:
    service, issuer = issuer_of(gw)
    long_ago = time.time() - 3 * DAY
    old = await service.mint(issuer, MintRequest(subject="old-bot", lifetime="1d", scopes=("tools:read",)), long_ago)
    fresh, _ = await mint(http, gw, subject="new-bot", scopes="tools:read")
    _, expired = await admin(http, gw, "GET", "/admin/tokens?status=expired")
    assert [i["jti"] for i in expired["items"]] == [old.record.jti]
    assert expired["items"][0]["status"] == "expired" and expired["items"][0]["expires_at"] < time.time()
    _, active = await admin(http, gw, "GET", "/admin/tokens?status=active")
    assert [i["subject"] for i in active["items"]] == ["new-bot"]
    async with http.get(f"{gw.url}/tools/x", headers={"Authorization": f"Bearer {old.token}"}) as resp:
        assert resp.status == 401 and "expired" in (await resp.json())["error_description"]
    assert await use(http, gw, fresh) == 200


async def test_listing_pages_newest_first(gw: RunningGateway, http: aiohttp.ClientSession) -> None:
    jtis = [(await mint(http, gw, subject=f"bot-{i}"))[1]["jti"] for i in range(5)]
    _, first = await admin(http, gw, "GET", "/admin/tokens?limit=2")
    _, second = await admin(http, gw, "GET", f"/admin/tokens?limit=2&offset={first['next_offset']}")
    _, third = await admin(http, gw, "GET", f"/admin/tokens?limit=2&offset={second['next_offset']}")
    seen = [i["jti"] for page in (first, second, third) for i in page["items"]]
    assert seen == jtis[::-1] and third["next_offset"] is None
    code, body = await admin(http, gw, "GET", "/admin/tokens?status=lost")
    assert code == 400 and "status must be one of" in body["error_description"]
    code, body = await admin(http, gw, "GET", "/admin/tokens?limit=0")
    assert code == 400


BAD_MINTS = [
    ({}, "subject: Field required"),
    ({"subject": "a", "lifetime": "400d"}, "lifetime: 400d is longer than tokens.max_lifetime (365d)"),
    ({"subject": "a", "lifetime": "soon"}, "lifetime: expected a duration"),
    ({"subject": "a", "lifetime": "0s"}, "lifetime: must be 1s or longer"),
    ({"subject": "a", "lifetime": 0.4}, "lifetime: must be 1s or longer"),  # exp == iat: dead on arrival
    ({"subject": "a", "lifetime": 10**400}, "lifetime: a duration of more than 100 years"),
    ({"subject": "a", "lifetime": float("nan")}, "the body is not valid JSON: NaN is not JSON"),
    ({"subject": "a", "claims": {"x": float("inf")}}, "the body is not valid JSON: Infinity is not JSON"),
    ({"subject": "a", "claims": {"iss": "https://evil/"}}, "claims: iss reserved"),
    ({"subject": "a", "claims": {"scope": "admin", "exp": 1}}, "claims: exp, scope reserved"),
    ({"subject": "a", "claims": ["team"]}, "claims: Input should be a valid dictionary"),
    ({"subject": "a", "claims": {"team": "\udcff"}}, "claims: claims must be Unicode text"),
    ({"subject": "a", "rotate": True}, "rotate applies to refresh keys only"),
    ({"subject": "a", "kind": "id_token"}, "kind: Input should be 'access' or 'refresh'"),
    ({"subject": "a", "scopes": ['tools "read"']}, "scopes.0"),
    ({"subject": "a", "colour": "red"}, "colour: Extra inputs are not permitted"),
    ({"subject": "line\nbreak"}, "subject"),
    ({"subject": 7}, "subject: Input should be a valid string"),
    ({"subject": "a", "note": "x" * 2000}, "note"),
]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"subject": "a", "subject": "root"}', "the key 'subject' appears more than once"),
        (b'{"subject": "a", "claims": ' + b'{"x": ' * 3000 + b"1" + b"}" * 3001, "JSON nested too deeply"),
        (b'{"subject": "\xff"}', "the body is not valid JSON"),
        (b'{"subject": "a", "claims": {"x": 1e400}}', "1e400 is not a finite number"),  # json reads it as inf
    ],
    ids=["repeated key", "deep", "not UTF-8", "overflowing number"],
)
async def test_mint_bodies_that_are_not_plain_json_get_400(
    gw: RunningGateway, http: aiohttp.ClientSession, raw: bytes, message: str
) -> None:
    headers = {"Content-Type": "application/json"}
    code, answer = await admin(http, gw, "POST", "/admin/tokens", data=raw, headers=headers)
    assert code == 400 and answer["error_description"].startswith("the body is not valid JSON")
    assert message in answer["error_description"]
    _, listing = await admin(http, gw, "GET", "/admin/tokens")
    assert listing["items"] == [], "nothing was minted"


async def test_a_token_minted_right_after_its_subject_was_revoked_works(
    gw: RunningGateway, http: aiohttp.ClientSession
) -> None:
    """iat is whole seconds: minted in the cut-off's second, a token would count as issued before it."""
    old, old_meta = await mint(http, gw, subject="rotated-bot", scopes="tools:read")
    code, _ = await admin(http, gw, "POST", "/admin/revocations", json={"subject": "rotated-bot"})
    assert code == 201
    new, new_meta = await mint(http, gw, subject="rotated-bot", scopes="tools:read", audience=[AUD, AUD])
    assert await use(http, gw, old) == 401
    assert await use(http, gw, new) == 200
    assert new_meta["audience"] == [AUD], "an audience given twice is kept once"
    # Operators see what the gateway does: the subject revocation covers the old token, not the new one.
    _, listing = await admin(http, gw, "GET", "/admin/tokens?subject=rotated-bot")
    statuses = {item["jti"]: (item["status"], item["revoked_by"]) for item in listing["items"]}
    assert statuses == {old_meta["jti"]: ("revoked", "subject revocation"), new_meta["jti"]: ("active", None)}
    _, shown = await admin(http, gw, "GET", f"/admin/tokens/{old_meta['jti']}")
    assert shown["status"] == "revoked"
    _, sessions = await admin(http, gw, "GET", "/admin/sessions")
    assert old_meta["jti"] not in [item["jti"] for item in sessions["items"]]
    barred_until = time.time() + 3600  # a cut-off ahead: whatever is minted before it is refused
    code, _ = await admin(http, gw, "POST", "/admin/revocations", json={"subject": "barred", "before": barred_until})
    assert code == 201
    code, answer = await admin(http, gw, "POST", "/admin/tokens", json={"subject": "barred"})
    assert code == 400 and "its tokens issued before" in answer["error_description"]


async def test_minting_waits_for_the_second_after_a_cut_off_just_ahead(
    upstream: Upstream, tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    """A cut-off half a second ahead (another instance's clock): minting waits, and the token's iat is past it.
    Cut-offs a bad write left in Redis (NaN, a millisecond timestamp) give a clear refusal, never a 500."""
    store = RedisStore(connect_redis(StoreSettings(redis_url=redis_url)), key_prefix)
    settings = TokensSettings(issuer=ISSUER_URL, signing_key_file=key_file(tmp_path))
    service = TokenService(store)
    issuer = service.issuer(settings, signing.Signer.from_files(settings.key_files))
    try:
        cutoff = time.time() + 0.5
        await store.add(Revocation("subject", "soon", cutoff))
        minted = await service.mint(issuer, MintRequest(subject="soon"))
        assert minted.record.claims["iat"] >= cutoff
        await store.client.hset(store.sub_key, "nan-subject", "nan")
        assert (await service.mint(issuer, MintRequest(subject="nan-subject"))).record.subject == "nan-subject"
        await store.add(Revocation("subject", "ms-subject", 1.7e12))
        with pytest.raises(MintError, match="its tokens issued before 9999-12-31T23:59:59Z are revoked"):
            await service.mint(issuer, MintRequest(subject="ms-subject"))
    finally:
        await store.client.delete(store.sub_key, store.tokens_key)
        await store.close()


async def test_a_minted_token_revoked_stays_revoked(gw: RunningGateway, http: aiohttp.ClientSession) -> None:
    """Its metadata says revoked (and a refresh key's family went with it): removing the entry alone is refused."""
    token, meta = await mint(http, gw)
    code, _ = await admin(http, gw, "DELETE", f"/admin/tokens/{meta['jti']}")
    assert code == 200
    code, answer = await admin(http, gw, "DELETE", f"/admin/revocations?jti={meta['jti']}&issuer=gateway")
    assert code == 409 and "are final: mint a new token" in answer["error_description"]
    code, _ = await admin(http, gw, "DELETE", f"/admin/revocations?jti={meta['jti']}")
    assert code == 404, "an entry for every issuer was never made: the gateway's own is scoped to it"
    assert await use(http, gw, token) == 401


@pytest.mark.parametrize(("body", "message"), BAD_MINTS)
async def test_malformed_mint_requests_get_400_with_a_clear_message(
    upstream: Upstream, tmp_path: Path, http: aiohttp.ClientSession, body: dict[str, Any], message: str
) -> None:
    async for gw in running(config(upstream, [key_file(tmp_path)]), tmp_path):
        code, answer = await admin(http, gw, "POST", "/admin/tokens", json=body)
        assert code == 400 and answer["error"] == "invalid_request"
        assert message in answer["error_description"], answer
        _, listing = await admin(http, gw, "GET", "/admin/tokens")
        assert listing["items"] == [], "nothing was minted"


async def test_the_admin_page_is_static_loads_only_itself_and_calls_only_the_api(
    upstream: Upstream, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """DESIGN's admin page: served without the admin token (it holds no data), under a CSP that lets it load nothing
    but its own files and talk to nothing but this listener; the token it is given goes only to the API."""
    import re

    async for gw in running(config(upstream, [key_file(tmp_path)]), tmp_path):
        texts = {}
        for path, kind in (("/admin", "text/html"), ("/admin.js", "text/javascript"), ("/admin.css", "text/css")):
            async with http.get(f"{gw.admin_url}{path}") as resp:
                assert resp.status == 200 and resp.content_type == kind, path
                csp = dict(part.strip().split(" ", 1) for part in resp.headers["Content-Security-Policy"].split(";"))
                assert csp["default-src"] == "'none'" and csp["script-src"] == "'self'", "no inline or foreign script"
                assert csp["connect-src"] == "'self'" and csp["frame-ancestors"] == "'none'"
                assert resp.headers["X-Content-Type-Options"] == "nosniff"
                texts[path] = await resp.text()
        html, script = texts["/admin"], texts["/admin.js"]
        assert re.findall(r"<script[^>]*>", html) == ['<script src="/admin.js" defer>'], "one script, no inline code"
        assert not re.search(r"\son\w+=", html), "no inline event handlers (the CSP would block them)"
        assert "innerHTML" not in script and "outerHTML" not in script, "API values are written as text only"
        # Every API path the page calls answers an authorized GET or is one of the API's write routes.
        called = set(re.findall(r'"(/admin/[a-z]+)', script)) | set(re.findall(r"`(/admin/[a-z]+)", script))
        assert called == {"/admin/tokens", "/admin/sessions", "/admin/revocations"}, called
        for path in sorted(called):
            code, body = await admin(http, gw, "GET", path)
            assert code == 200 and "items" in body and "next_offset" in body, path
        async with http.get(f"{gw.admin_url}/admin/tokens") as resp:
            assert resp.status == 401, "the page is open; the API behind it is not"


async def test_admin_token_endpoints_need_the_admin_token(
    upstream: Upstream, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async for gw in running(config(upstream, [key_file(tmp_path)]), tmp_path):
        token, meta = await mint(http, gw)
        calls = [
            ("POST", "/admin/tokens", {"json": {"subject": "x"}}),
            ("GET", "/admin/tokens", {}),
            ("GET", f"/admin/tokens/{meta['jti']}", {}),
            ("DELETE", f"/admin/tokens/{meta['jti']}", {}),
            ("GET", "/admin/sessions", {}),
        ]
        for method, path, extra in calls:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {token}"}):
                async with http.request(method, f"{gw.admin_url}{path}", headers=headers, **extra) as resp:
                    assert resp.status == 401, (method, path, headers)
                    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        _, shown = await admin(http, gw, "GET", f"/admin/tokens/{meta['jti']}")
        assert shown["status"] == "active", "no unauthenticated call changed anything"
        code, body = await admin(http, gw, "POST", "/admin/tokens", data=b"{not json")
        assert code == 400 and body["error_description"] == "the body is not valid JSON"
        code, body = await admin(http, gw, "POST", "/admin/tokens", json=["subject"])
        assert code == 400 and "JSON object" in body["error_description"]
        code, body = await admin(http, gw, "DELETE", f"/admin/tokens/{meta['jti']}", json={"why": "x"})
        assert code == 400 and "why: unknown field" in body["error_description"]
        code, body = await admin(http, gw, "DELETE", f"/admin/tokens/{meta['jti']}", json={"reason": 5})
        assert code == 400 and "reason" in body["error_description"]
        for missing in ("no-such-jti", "bad%20jti"):
            code, body = await admin(http, gw, "GET", f"/admin/tokens/{missing}")
            assert code == 404
            code, body = await admin(http, gw, "DELETE", f"/admin/tokens/{missing}")
            assert code == 404 and body["error"] == "not_found"


# --- The refresh grant ----------------------------------------------------------------------------------------------


async def test_refresh_key_exchange_and_narrowing(
    gw: RunningGateway, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    refresh, meta = await mint(http, gw, kind="refresh", scopes="tools:read tools:write", claims={"team": "ml"})
    assert meta["kind"] == "refresh" and meta["family"] == meta["jti"]
    assert jwt.get_unverified_header(refresh)["typ"] == "rt+jwt"
    assert claims_of(refresh)["aud"] == ISSUER_URL, "a refresh key is addressed to the token endpoint only"
    async with http.get(f"{gw.url}/tools/x", headers={"Authorization": f"Bearer {refresh}"}) as resp:
        assert resp.status == 401, "a refresh key is not a bearer token"
        assert (await resp.json())["error_description"] == "the token type is not accepted here"

    code, body, resp = await exchange(http, gw, grant_type="refresh_token", refresh_token=refresh)
    assert code == 200
    assert resp.headers["Cache-Control"] == "no-store" and resp.headers["Pragma"] == "no-cache"
    assert body["token_type"] == "Bearer" and body["expires_in"] in (899, 900)
    assert body["scope"] == "tools:read tools:write" and "refresh_token" not in body
    access = body["access_token"]
    claims = claims_of(access)
    assert jwt.get_unverified_header(access)["typ"] == "at+jwt"
    assert claims["aud"] == AUD and claims["sub"] == "ci-bot" and claims["team"] == "ml"
    assert claims["exp"] - claims["iat"] == 900
    assert await use(http, gw, access) == 200

    code, narrow, _ = await exchange(http, gw, grant_type="refresh_token", refresh_token=refresh, scope="tools:read")
    assert code == 200 and narrow["scope"] == "tools:read"
    assert claims_of(narrow["access_token"])["scope"] == "tools:read"
    code, wide, resp = await exchange(
        http, gw, grant_type="refresh_token", refresh_token=refresh, scope="tools:read tools:admin"
    )
    assert code == 400 and wide["error"] == "invalid_scope" and resp.headers["Cache-Control"] == "no-store"

    async def exchange_recorded() -> bool:
        _, shown = await admin(http, gw, "GET", f"/admin/tokens/{meta['jti']}")
        return shown["last_device"] is not None

    await until(exchange_recorded)
    _, shown = await admin(http, gw, "GET", f"/admin/tokens/{meta['jti']}")
    assert shown["last_device"]["user_agent"] == "agent/2"

    code, _ = await admin(http, gw, "DELETE", f"/admin/tokens/{meta['jti']}?reason=offboarded")
    assert code == 200

    async def key_refused() -> bool:
        status, _, _ = await exchange(http, gw, grant_type="refresh_token", refresh_token=refresh)
        return status == 400

    await until(key_refused)
    code, body, _ = await exchange(http, gw, grant_type="refresh_token", refresh_token=refresh)
    assert body["error"] == "invalid_grant" and body["error_description"] == "the refresh key has been revoked"

    async def access_refused() -> bool:
        return await use(http, gw, access) == 401

    await until(access_refused)  # revoking a refresh key takes the access tokens minted from it along
    assert_secret_free([refresh, access, narrow["access_token"]], gw, caplog)


async def test_token_endpoint_errors_follow_rfc6749(
    upstream: Upstream, tmp_path: Path, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async for gw in running(config(upstream, [key_file(tmp_path)]), tmp_path):
        service, issuer = issuer_of(gw)
        access, _ = await mint(http, gw, scopes="tools:read")
        expired = await service.mint(
            issuer, MintRequest(subject="s", kind="refresh", lifetime="1d"), time.time() - 2 * DAY
        )
        # Expired 5 s ago: within the signature check's leeway, but a key's life ends at its exp.
        just_expired = await service.mint(
            issuer, MintRequest(subject="s", kind="refresh", lifetime="1d"), time.time() - DAY - 5
        )
        now = int(time.time())
        stranger = signing.Signer([signing.signing_key(signing.generate("ES256"))])
        foreign = stranger.sign(
            {"iss": ISSUER_URL, "sub": "s", "aud": ISSUER_URL, "iat": now, "exp": now + DAY, "jti": "f-1"}, typ="rt+jwt"
        )
        unknown = issuer.signer.sign(  # signed by the gateway's key, but never minted (no metadata)
            {"iss": ISSUER_URL, "sub": "s", "aud": ISSUER_URL, "iat": now, "exp": now + DAY, "jti": "u-1"}, typ="rt+jwt"
        )
        cases: list[tuple[Any, str, str]] = [
            ({"grant_type": "refresh_token"}, "invalid_request", "refresh_token is required"),
            ({"refresh_token": "x"}, "invalid_request", "grant_type is required"),
            ({"grant_type": "password", "username": "u"}, "unsupported_grant_type", "refresh_token"),
            ({"grant_type": "refresh_token", "refresh_token": "not-a-jwt"}, "invalid_grant", "malformed"),
            ({"grant_type": "refresh_token", "refresh_token": access}, "invalid_grant", "not a refresh key"),
            ({"grant_type": "refresh_token", "refresh_token": foreign}, "invalid_grant", "not signed by this gateway"),
            ({"grant_type": "refresh_token", "refresh_token": unknown}, "invalid_grant", "not known"),
            ({"grant_type": "refresh_token", "refresh_token": expired.token}, "invalid_grant", "expired"),
            ({"grant_type": "refresh_token", "refresh_token": just_expired.token}, "invalid_grant", "expired"),
            ({"grant_type": "refresh_token", "refresh_token": expired.token, "scope": ""}, "invalid_grant", "expired"),
            ("grant_type=refresh_token&grant_type=refresh_token&refresh_token=x", "invalid_request", "repeated"),
        ]
        for form, error, description in cases:
            headers = {"Content-Type": "application/x-www-form-urlencoded"}
            async with http.post(f"{gw.url}/oauth/token", data=form, headers=headers) as resp:
                assert resp.status == 400, form
                body = await resp.json()
                assert resp.headers["Cache-Control"] == "no-store"
                assert body["error"] == error and description in body["error_description"], (form, body)
                text = json.dumps(body)
                assert all(t not in text for t in (access, foreign, unknown, expired.token))
        async with http.post(f"{gw.url}/oauth/token", json={"grant_type": "refresh_token"}) as resp:
            assert resp.status == 400
            assert "x-www-form-urlencoded" in (await resp.json())["error_description"]
        async with http.get(f"{gw.url}/oauth/token") as resp:
            assert resp.status == 405 and resp.headers["Allow"] == "POST"
        async with http.post(f"{gw.url}/oauth/token", data={"grant_type": "x" * 20000}) as resp:
            assert resp.status == 400 and (await resp.json())["error_description"] == "the body is too large"
        assert_secret_free([access, foreign, unknown, expired.token], gw, caplog)


async def test_a_token_request_whose_body_never_arrives_gets_408_and_the_connection_ends(
    upstream: Upstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that announces a form and sends part of it is answered 408 once FORM_TIMEOUT passes, and the
    connection ends (what was not read cannot be taken for the next request): it holds neither for ever."""
    monkeypatch.setattr(oauth, "FORM_TIMEOUT", 0.2)
    async for gw in running(config(upstream, [key_file(tmp_path)]), tmp_path):
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.ports.proxy_port)
        writer.write(
            b"POST /oauth/token HTTP/1.1\r\nHost: gw\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: 100\r\n\r\ngrant_type="
        )
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)  # to the end: the gateway says it is done writing
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ") and b"Connection: close" in head
    assert json.loads(body) == {
        "error": "invalid_request",
        "error_description": "the request body did not arrive in time",
    }


async def test_rotation_and_reuse_detection_revoke_the_whole_family(
    gw: RunningGateway, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    first, meta = await mint(http, gw, kind="refresh", rotate=True, scopes="tools:read", lifetime="30d")
    code, one, _ = await exchange(http, gw, grant_type="refresh_token", refresh_token=first)
    assert code == 200 and "refresh_token" in one
    second = one["refresh_token"]
    code, two, _ = await exchange(http, gw, grant_type="refresh_token", refresh_token=second)
    assert code == 200
    third = two["refresh_token"]
    assert len({first, second, third}) == 3
    assert await use(http, gw, one["access_token"]) == 200 and await use(http, gw, two["access_token"]) == 200

    second_jti, third_jti = claims_of(second)["jti"], claims_of(third)["jti"]
    _, shown = await admin(http, gw, "GET", f"/admin/tokens/{meta['jti']}")
    assert shown["status"] == "retired" and shown["replaced_by"] == second_jti
    _, shown = await admin(http, gw, "GET", f"/admin/tokens/{third_jti}")
    assert shown["status"] == "active" and shown["parent"] == second_jti and shown["family"] == meta["jti"]
    assert shown["expires_at"] == meta["expires_at"], "rotation never extends the family's life"

    # The first key again: it was already exchanged, so someone else holds it.
    code, reused, resp = await exchange(http, gw, grant_type="refresh_token", refresh_token=first)
    assert code == 400 and reused["error"] == "invalid_grant" and resp.headers["Cache-Control"] == "no-store"
    events = [r for r in caplog.records if getattr(r, "event", None) == "refresh_token_reuse"]
    assert len(events) == 1 and events[0].levelno == logging.WARNING and events[0].__dict__["jti"] == meta["jti"]

    async def family_refused() -> bool:
        statuses = [await use(http, gw, t) for t in (one["access_token"], two["access_token"])]
        return statuses == [401, 401]

    await until(family_refused)
    code, body, _ = await exchange(http, gw, grant_type="refresh_token", refresh_token=third)
    assert code == 400 and body["error"] == "invalid_grant", "the newest key of the family is revoked as well"
    _, revoked = await admin(http, gw, "GET", "/admin/tokens?status=revoked&kind=refresh")
    assert {i["jti"] for i in revoked["items"]} == {meta["jti"], second_jti, third_jti}
    assert {i["revoke_reason"] for i in revoked["items"]} == {"refresh key reuse detected"}
    assert_secret_free([first, second, third, one["access_token"], two["access_token"]], gw, caplog)


async def test_concurrent_exchanges_of_one_rotating_key_let_one_win(
    gw: RunningGateway, http: aiohttp.ClientSession
) -> None:
    key, _ = await mint(http, gw, kind="refresh", rotate=True, scopes="tools:read")
    results = await asyncio.gather(
        *(exchange(http, gw, grant_type="refresh_token", refresh_token=key) for _ in range(8))
    )
    codes = [code for code, _, _ in results]
    assert codes.count(200) <= 1 and codes.count(400) >= 7, "one exchange at most; the others are reuse"
    for code, body, _ in results:
        if code == 200:
            access = body["access_token"]

            async def refused(access: str = access) -> bool:
                return await use(http, gw, access) == 401

            await until(refused)  # a replayed key is reuse: the family goes, the winner's tokens with it
        else:
            assert body["error"] == "invalid_grant"


# --- Concurrency, and the cost of last-use tracking -----------------------------------------------------------------


async def test_concurrent_revokes_and_uses_lose_no_metadata(store_url: str, key_prefix: str, tmp_path: Path) -> None:
    store: RedisStore | MemoryStore
    shared = StoreSettings(redis_url=store_url, key_prefix=key_prefix)
    store = RedisStore(connect_redis(shared), key_prefix) if store_url else MemoryStore()
    settings = TokensSettings(issuer=ISSUER_URL, signing_key_file=key_file(tmp_path))
    service = TokenService(store)
    issuer = service.issuer(settings, signing.Signer.from_files(settings.key_files))
    try:
        minted = [
            await service.mint(issuer, MintRequest(subject=f"s{i}", kind="refresh", rotate=True)) for i in range(40)
        ]
        base = time.time()
        uses = {m.record.jti: [base + random.random() for _ in range(20)] for m in minted}
        work: list[Awaitable[Any]] = []
        for m in minted:
            jti = m.record.jti
            work += [
                store.record_uses({jti: LastUse(at, f"10.0.0.{int(at * 1000) % 250}", f"ua-{at!r}")})
                for at in uses[jti]
            ]
            work += [service.revoke(jti, f"op-{jti}", "because", now=base)]
            work += [store.retire_token(jti, base, "next")]
        random.shuffle(work)
        gate = asyncio.Semaphore(50)  # interleaved, within the client's connection pool

        async def run(step: Awaitable[Any]) -> None:
            async with gate:
                await step

        await asyncio.gather(*(run(step) for step in work))
        for m in minted:
            record = await service.show(m.record.jti)
            assert record is not None
            assert record.fields() == m.record.fields(), "the minted fields are untouched"
            latest = max(uses[m.record.jti])
            assert record.last_used_at == latest and record.first_seen == min(uses[m.record.jti])
            assert record.last_user_agent == f"ua-{latest!r}", "the device fields belong to the latest use"
            assert record.revoked_at == base and record.revoked_by == f"op-{m.record.jti}"
            assert record.retired_at == base and record.replaced_by == "next"
    finally:
        if isinstance(store, RedisStore):
            keys = [k async for k in store.client.scan_iter(f"{key_prefix}*")]
            if keys:
                await store.client.delete(*keys)
        await store.close()


async def _commandstats(client: aioredis.Redis) -> dict[str, int]:
    """Calls that ran, per command (Redis 7 counts a failed call in both calls and failed_calls)."""
    info = await client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) - int(v.get("failed_calls", 0)) for name, v in info.items()}


async def test_ten_thousand_uses_cost_at_most_two_redis_writes(
    upstream: Upstream, tmp_path: Path, private_redis: PrivateRedis, http: aiohttp.ClientSession
) -> None:
    """Counted by Redis itself (INFO commandstats on a Redis of this test's own), not by the tracker."""
    observer = aioredis.Redis.from_url(private_redis.url)
    started = time.monotonic()
    try:
        async for gw in running(config(upstream, [key_file(tmp_path)], private_redis.url, "gw:"), tmp_path):
            token, meta = await mint(http, gw, scopes="tools:read")
            before = await _commandstats(observer)
            connector = aiohttp.TCPConnector(limit=32)
            async with aiohttp.ClientSession(connector=connector) as client:
                headers = {"Authorization": f"Bearer {token}", "User-Agent": "burst/1"}

                async def burst(n: int, gw: RunningGateway = gw, headers: dict[str, str] = headers) -> list[int]:
                    codes = []
                    for _ in range(n):
                        async with client.get(f"{gw.url}/tools/x", headers=headers) as resp:
                            await resp.read()
                            codes.append(resp.status)
                    return codes

                codes = [
                    c for batch in await asyncio.gather(*(burst(10000 // 32 + 1) for _ in range(32))) for c in batch
                ]
            last_request = time.time()
            assert len(codes) >= 10000 and set(codes) == {200}
            runtime = gw.server.runtime
            assert runtime is not None
            tracker = runtime.usage
        # The gateway has stopped: its final flush has written what was pending.
        after = await _commandstats(observer)
        elapsed = time.monotonic() - started
        scripts = sum(after.get(c, 0) - before.get(c, 0) for c in ("evalsha", "eval", "evalsha_ro", "eval_ro"))
        # Redis counts the commands a script runs as well: the script's HSETs (first_seen, last use) and nothing else.
        hash_writes = {c: after.get(c, 0) - before.get(c, 0) for c in ("hset", "hsetnx", "hmset", "hdel", "del")}
        print(f"{len(codes)} uses in {elapsed:.1f} s: {scripts} last-use script calls, {tracker.writes} tracker writes")
        print(
            "every Redis command meanwhile:",
            {c: n - before.get(c, 0) for c, n in after.items() if n > before.get(c, 0)},
        )
        assert elapsed < 60, "the burst must fit in one minute for the claim to be tested"
        assert 1 <= scripts <= 2 and tracker.writes == scripts
        assert hash_writes["hset"] <= 2 * scripts and sum(hash_writes.values()) == hash_writes["hset"]
        stored = await observer.hgetall(f"gw:token:{meta['jti']}")
        assert stored[b"last_user_agent"] == b"burst/1" and float(stored[b"last_used_at"]) <= last_request
        assert float(stored[b"last_used_at"]) > float(stored[b"first_seen"]), "the final flush wrote the latest use"
    finally:
        await observer.aclose()


# --- The CLI --------------------------------------------------------------------------------------------------------


def _cli(*args: str, config_path: Path) -> subprocess.CompletedProcess[str]:
    return _gateway_cli("tokens", *args, config_path=config_path)


def _gateway_cli(*args: str, config_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args, "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, ADMIN_ENV: ADMIN_TOKEN},
    )


async def test_cli_mints_lists_shows_and_revokes_against_redis(
    upstream: Upstream, tmp_path: Path, redis_url: str, key_prefix: str, http: aiohttp.ClientSession
) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(config(upstream, [key_file(tmp_path)], redis_url, key_prefix))
    async for gw in running(path.read_text(), tmp_path):
        done = await asyncio.to_thread(
            _cli, "mint", "--subject", "deploy-bot", "--scope", "tools:read", "--lifetime", "30d",
            "--note", "from the CLI", "--claim", "team=ops", "--claim", "tier=3", config_path=path,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        minted = json.loads(done.stdout)
        token, jti = minted["token"], minted["metadata"]["jti"]
        assert minted["metadata"]["claims"]["tier"] == 3 and minted["metadata"]["claims"]["team"] == "ops"
        assert await use(http, gw, token) == 200, "a running gateway accepts what the CLI minted"
        _, shown = await admin(http, gw, "GET", f"/admin/tokens/{jti}")
        assert shown["note"] == "from the CLI"

        listed = await asyncio.to_thread(_cli, "list", "--subject", "deploy-bot", config_path=path)
        assert listed.returncode == 0 and [json.loads(line)["jti"] for line in listed.stdout.splitlines()] == [jti]
        assert token not in listed.stdout
        shown_cli = await asyncio.to_thread(_cli, "show", jti, config_path=path)
        assert json.loads(shown_cli.stdout)["status"] == "active"
        revoked = await asyncio.to_thread(_cli, "revoke", jti, "--reason", "rotated", "--by", "ops", config_path=path)
        assert revoked.returncode == 0, revoked.stderr
        assert json.loads(revoked.stdout)["revoked"]["revoked_by"] == "ops"

        async def refused(gw: RunningGateway = gw, token: str = token) -> bool:
            return await use(http, gw, token) == 401

        await until(refused)
        undo = await asyncio.to_thread(
            _gateway_cli, "revocations", "delete", "--jti", jti, "--issuer", "gateway", config_path=path
        )
        assert undo.returncode == 2 and "are final" in undo.stderr
        assert await use(http, gw, token) == 401
        # A subject revocation covers what was minted before it: `show` says so.
        other = json.loads((await asyncio.to_thread(_cli, "mint", "--subject", "old-bot", config_path=path)).stdout)
        cut = await asyncio.to_thread(_gateway_cli, "revoke", "--subject", "old-bot", config_path=path)
        assert cut.returncode == 0, cut.stderr
        shown_cli = await asyncio.to_thread(_cli, "show", other["metadata"]["jti"], config_path=path)
        assert json.loads(shown_cli.stdout)["status"] == "revoked"
        past = await asyncio.to_thread(
            _gateway_cli, "revoke", "--jti", "x", "--expires-at", "2020-01-01T00:00:00Z", config_path=path
        )
        assert past.returncode == 2 and "expired long enough ago" in past.stderr
        missing = await asyncio.to_thread(_cli, "show", "no-such", config_path=path)
        assert missing.returncode == 1 and "no such token" in missing.stderr
        bad = await asyncio.to_thread(_cli, "mint", "--subject", "x", "--lifetime", "900d", config_path=path)
        assert bad.returncode == 2 and "max_lifetime" in bad.stderr
        reserved = await asyncio.to_thread(_cli, "mint", "--subject", "x", "--claim", "sub=root", config_path=path)
        assert reserved.returncode == 2 and "sub reserved" in reserved.stderr
    memory = tmp_path / "memory.yaml"
    memory.write_text(config(upstream, [key_file(tmp_path)]))
    refused_cli = await asyncio.to_thread(_cli, "list", config_path=memory)
    assert refused_cli.returncode == 1 and "use its admin API (/admin/tokens)" in refused_cli.stderr


async def test_cli_refuses_claims_that_are_not_json_as_rfc_8259_has_it(
    upstream: Upstream, tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    """NaN and Infinity (which Python's json takes) and a repeated key are refused, and nothing is minted; text that
    is not JSON at all is still the claim's text."""
    path = tmp_path / "gw.yaml"
    path.write_text(config(upstream, [key_file(tmp_path)], redis_url, key_prefix))
    refusals = {
        "x=NaN": "--claim x: NaN is not JSON",
        "x=-Infinity": "--claim x: -Infinity is not JSON",
        'x={"role": "user", "role": "admin"}': "--claim x: the key 'role' appears more than once",
        "x=" + "[" * 5000 + "]" * 5000: "--claim x: JSON nested too deeply",
    }
    runs = await asyncio.gather(
        *(asyncio.to_thread(_cli, "mint", "--subject", "x", "--claim", claim, config_path=path) for claim in refusals)
    )
    for done, message in zip(runs, refusals.values(), strict=True):
        assert done.returncode == 2 and done.stdout == "" and f"tokens mint: {message}" in done.stderr, done.stderr
    client = aioredis.Redis.from_url(redis_url)
    try:
        assert [k async for k in client.scan_iter(f"{key_prefix}*")] == [], "nothing was minted"
    finally:
        await client.aclose()
    done = await asyncio.to_thread(_cli, "mint", "--subject", "x", "--claim", "x=nan", config_path=path)
    assert done.returncode == 0 and json.loads(done.stdout)["metadata"]["claims"]["x"] == "nan", done.stderr


async def test_revocations_may_be_scoped_to_the_gateways_own_issuer_only_if_it_mints(
    gw: RunningGateway, http: aiohttp.ClientSession
) -> None:
    """The admin API knows the issuer `gateway` from the tokens: section (this config has no issuers: of its own)."""
    code, body = await admin(http, gw, "POST", "/admin/revocations", json={"jti": "own-1", "issuer": "gateway"})
    assert code == 201 and body["revoked"]["issuer"] == "gateway"
    code, body = await admin(http, gw, "POST", "/admin/revocations", json={"jti": "own-1", "issuer": "corp"})
    assert code == 400 and body["error_description"] == "issuer: unknown issuer 'corp'"


async def test_cli_names_an_unreachable_redis_without_its_password(upstream: Upstream, tmp_path: Path) -> None:
    """The store's URL is named in the error, less what may hold a password: userinfo and query string."""
    secret = "s3cr3t-pw"
    with refusing_port() as port:
        urls = {
            f"redis://ops-user:{secret}@127.0.0.1:{port}/0?password={secret}": f"redis://127.0.0.1:{port}/0 failed: ",
            f"redis+sentinel://:{secret}@127.0.0.1:{port}/mymaster": f"redis+sentinel://127.0.0.1:{port}/mymaster failed: ",
        }
        paths = []
        for i, url in enumerate(urls):
            paths.append(tmp_path / f"unreachable-{i}.yaml")
            paths[-1].write_text(config(upstream, [key_file(tmp_path)], url))
        runs = await asyncio.gather(*(asyncio.to_thread(_cli, "list", config_path=path) for path in paths))
    for done, shown in zip(runs, urls.values(), strict=True):
        assert done.returncode == 1 and f"Redis at {shown}" in done.stderr, done.stderr
        assert secret not in done.stdout + done.stderr and "ops-user" not in done.stderr


async def test_token_endpoint_fails_closed_when_the_store_is_down(
    upstream: Upstream, tmp_path: Path, private_redis: PrivateRedis, http: aiohttp.ClientSession
) -> None:
    """A refresh key that cannot be checked against the revocation set and its metadata is not exchanged: 503."""
    text = config(upstream, [key_file(tmp_path)], private_redis.url, "gw:", staleness="300ms")
    async for gw in running(text, tmp_path):
        refresh, _ = await mint(http, gw, kind="refresh", scopes="tools:read")
        private_redis.stop()

        async def unavailable(gw: RunningGateway = gw, refresh: str = refresh) -> bool:
            status, _, _ = await exchange(http, gw, grant_type="refresh_token", refresh_token=refresh)
            return status == 503

        await until(unavailable)
        code, body, resp = await exchange(http, gw, grant_type="refresh_token", refresh_token=refresh)
        assert body["error"] == "temporarily_unavailable" and resp.headers["Cache-Control"] == "no-store"
        assert resp.headers["Retry-After"].isdigit() and refresh not in json.dumps(body)
        private_redis.start()


async def test_a_store_that_does_not_answer_in_time_may_have_made_the_change(
    upstream: Upstream, tmp_path: Path, private_redis: PrivateRedis, http: aiohttp.ClientSession
) -> None:
    """A mint sent to a Redis that then stops answering may have been written: the 503 must not say otherwise,
    or a client retries and mints a second token. redis-py retries on a new connection, so what it raises last
    (here: refused, once Redis is gone) says nothing about the first attempt. A read just says unavailable."""
    async for gw in running(config(upstream, [key_file(tmp_path)], private_redis.url, "gw:"), tmp_path):
        process = private_redis.process
        assert process is not None
        process.send_signal(signal.SIGSTOP)  # accepts connections, answers nothing
        try:
            code, answer = await admin(http, gw, "POST", "/admin/tokens", json={"subject": "hung"})
            assert code == 503 and "which may have been made: look before retrying" in answer["error_description"]
            code, answer = await admin(http, gw, "GET", "/admin/tokens")
            assert code == 503 and answer["error_description"].startswith("the store (Redis) is unavailable")
        finally:
            process.send_signal(signal.SIGCONT)
        private_redis.stop()
        code, answer = await admin(http, gw, "POST", "/admin/revocations", json={"jti": "x"})
        assert code == 503 and "which may have been made" in answer["error_description"]
        private_redis.start()


async def test_a_key_file_the_loader_cannot_read_is_a_refused_reload_and_a_check_config_problem(
    upstream: Upstream, tmp_path: Path
) -> None:
    """A passphrase-protected key raises TypeError in cryptography: it escaped the reload's error handling (no log
    line, no failure count, so the alert on failed reloads could not fire) and crashed check-config."""
    from cryptography.hazmat.primitives import serialization

    from gateway.checks import compile_check

    good = key_file(tmp_path)
    async for gw in running(config(upstream, [good]), tmp_path):
        protected = tmp_path / "protected.pem"
        protected.write_bytes(
            signing.generate("ES256").private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"passphrase"),
            )
        )
        path = gw.server.config_path
        assert path is not None
        path.write_text(path.read_text().replace(good, str(protected)))
        assert await gw.server.reload() is False
        assert gw.metric("gateway_config_reloads_total", outcome="failure") == 1
        problem = await asyncio.to_thread(compile_check, configfile.load(path))
        assert problem is not None and "encrypted" in problem
