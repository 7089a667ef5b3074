"""The per-issuer key cache against a real JWKS server: start-up fetch, discovery, static keys, rotation, unknown-kid
refetch with cool-down, an IdP that is down (at start, or later), Cache-Control, key removal, and the
verified-token cache.

Waiting is done on events (the IdP's `fetched` event and fetch counter) or through the gateway's public
`IssuerKeys.refresh()`; where expiry is tested, the verifier is built directly with an injected clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway import errors, signing
from gateway.config import IssuerSettings, StaticKey
from gateway.metrics import Metrics
from gateway.server import new_session
from gateway.verify.cache import TokenCache
from gateway.verify.jwks import IssuerKeys
from gateway.verify.jwt_local import JwtVerifier, Verified
from gateway.verify.keys import KeySet, from_pem_file
from tests.support import (
    AUDIENCE,
    ISSUER,
    IdP,
    Key,
    RunningGateway,
    ScriptedIdP,
    Upstream,
    claims_for,
    self_signed_cert,
    serve_app,
    sign_jws,
    start_gateway,
    wait_for_fetches,
)

CORP = frozenset({"corp"})


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def scripted_idp(rsa_key: Key, ec_key: Key, ed_key: Key) -> AsyncIterator[ScriptedIdP]:
    provider = ScriptedIdP(keys=[rsa_key, ec_key, ed_key])
    runner, provider.url = await serve_app(provider.app())
    provider.issuer = provider.url + "/"
    yield provider
    provider.gate.set()  # never leave a fetch hanging at teardown
    await runner.cleanup()


def config_for(idp: ScriptedIdP, upstream: Upstream, **issuer: Any) -> str:
    """A one-route gateway whose `corp` issuer reads `idp`'s JWKS; keyword arguments add issuer settings."""
    extra = "".join(f"    {name}: {value}\n" for name, value in issuer.items())
    source = "" if "discovery" in issuer or "keys" in issuer else f"    jwks_uri: {idp.url}/jwks\n"
    iss = idp.issuer if "discovery" in issuer else ISSUER
    return f"""
issuers:
  - name: corp
    issuer: "{iss}"
{source}    audiences: [{AUDIENCE}]
    algorithms: [RS256, ES256, EdDSA]
{extra}routes:
  - name: orders
    match: {{path_prefix: /orders}}
    upstream: {{url: "{upstream.url}"}}
    auth: {{mode: jwt, issuers: [corp]}}
"""


async def call(http: aiohttp.ClientSession, gw: RunningGateway, token: str) -> tuple[int, dict[str, Any], Any]:
    async with http.get(f"{gw.url}/orders/1", headers={"Authorization": f"Bearer {token}"}) as resp:
        body = await resp.json() if resp.content_type == "application/json" else {}
        return resp.status, body, resp.headers.copy()


async def readyz(http: aiohttp.ClientSession, gw: RunningGateway) -> tuple[int, dict[str, Any]]:
    async with http.get(f"{gw.admin_url}/readyz") as resp:
        return resp.status, await resp.json()


def issuer_keys(gw: RunningGateway, name: str = "corp") -> IssuerKeys:
    assert gw.server.runtime is not None and gw.server.runtime.gateway is not None
    return gw.server.runtime.gateway.issuers[name]


@contextlib.asynccontextmanager
async def gateway(config: str, tmp_path: Path) -> AsyncIterator[RunningGateway]:
    async for running in start_gateway(config, tmp_path):
        yield running


@pytest.fixture
async def gw(scripted_idp: ScriptedIdP, upstream: Upstream, tmp_path: Path) -> AsyncIterator[RunningGateway]:
    async with gateway(config_for(scripted_idp, upstream), tmp_path) as running:
        yield running


# --- start-up, discovery, static keys ---


async def test_keys_are_fetched_once_at_start_and_the_gateway_is_ready(
    gw: RunningGateway, scripted_idp: ScriptedIdP, rsa_key: Key, ec_key: Key, ed_key: Key, http: aiohttp.ClientSession
) -> None:
    assert scripted_idp.fetches == 1
    assert await readyz(http, gw) == (200, {"ready": True, "problems": []})
    assert gw.metric("gateway_jwks_keys", issuer="corp") == 3
    assert gw.metric("gateway_jwks_refreshes_total", issuer="corp", outcome="success") == 1
    for key in (rsa_key, ec_key, ed_key):
        status, _, _ = await call(http, gw, key.sign())
        assert status == 200
    assert scripted_idp.fetches == 1  # requests are verified from the cache: no fetch per request


async def test_oidc_discovery_finds_the_jwks_once(
    scripted_idp: ScriptedIdP, upstream: Upstream, rsa_key: Key, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    config = config_for(scripted_idp, upstream, discovery="true")
    async with gateway(config, tmp_path) as gw:
        status, _, _ = await call(http, gw, rsa_key.sign(iss=scripted_idp.issuer))
        assert status == 200
        assert (scripted_idp.discovery_fetches, scripted_idp.fetches) == (1, 1)
        assert await issuer_keys(gw).refresh() is True
        assert (scripted_idp.discovery_fetches, scripted_idp.fetches) == (1, 2)  # jwks_uri is remembered
        status, _, _ = await call(http, gw, rsa_key.sign())  # iss of another issuer: not this one's token
        assert status == 401


async def test_discovery_document_naming_another_issuer_is_not_trusted(
    scripted_idp: ScriptedIdP, upstream: Upstream, rsa_key: Key, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    config = config_for(scripted_idp, upstream, discovery="true")
    configured = scripted_idp.issuer
    scripted_idp.issuer = "https://impostor.test/"  # the document now claims to describe another issuer
    async with gateway(config, tmp_path) as gw:
        status, body = await readyz(http, gw)
        assert status == 503 and body["problems"] == ["issuer corp has no keys"]
        status, body, headers = await call(http, gw, rsa_key.sign(iss=configured))
        assert (status, body["error"]) == (503, "temporarily_unavailable")
        assert "Retry-After" in headers
        assert scripted_idp.fetches == 0  # the JWKS it names was never fetched
        assert gw.metric("gateway_jwks_refreshes_total", issuer="corp", outcome="failure") == 1


async def test_static_pem_keys_verify_without_any_fetch(
    scripted_idp: ScriptedIdP,
    upstream: Upstream,
    rsa_key: Key,
    ec_key: Key,
    ed_key: Key,
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    (tmp_path / "rsa.pem").write_bytes(rsa_key.public_pem())
    (tmp_path / "ec-cert.pem").write_bytes(self_signed_cert(ec_key, "idp"))  # a certificate works too
    keys = "[{pem_file: rsa.pem, kid: rsa-1}, {pem_file: ec-cert.pem}]"
    async with gateway(config_for(scripted_idp, upstream, keys=keys), tmp_path) as gw:
        assert await readyz(http, gw) == (200, {"ready": True, "problems": []})
        assert gw.metric("gateway_jwks_keys", issuer="corp") == 2
        assert (await call(http, gw, rsa_key.sign()))[0] == 200
        assert (await call(http, gw, ec_key.sign()))[0] == 200  # the kid-less EC key verifies any ES256 kid
        status, body, _ = await call(http, gw, ed_key.sign())
        assert (status, body["error"]) == (401, "invalid_token")
        assert gw.metric("gateway_auth_decisions_total", route="orders", outcome="deny", reason="unknown_kid") == 1
        assert (await call(http, gw, Key.rsa("rsa-1").sign()))[0] == 401  # another RSA key under its kid
        assert await issuer_keys(gw).refresh() is False  # static keys are never fetched
    assert scripted_idp.fetches == 0


# --- rotation and unknown kids ---


async def test_rotation_mid_run_fails_no_valid_request(
    scripted_idp: ScriptedIdP, upstream: Upstream, rsa_key: Key, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """The IdP publishes a new key and signs with it while requests flow: every request with a token whose key
    is published passes, before, during and after the rotation; old tokens pass until their key is withdrawn."""
    new_key = Key.rsa("rsa-2")
    scripted_idp.keys = [rsa_key]
    # No cool-down, so the first token signed with the new kid fetches the JWKS at once.
    config = config_for(scripted_idp, upstream, jwks_min_refresh_interval="0s")
    async with gateway(config, tmp_path) as gw:
        old_token, new_token = rsa_key.sign(), new_key.sign()
        tokens = [old_token]
        results: list[tuple[str, int]] = []
        batches = 0
        batch_done = asyncio.Event()
        stop = asyncio.Event()

        async def hammer() -> None:
            nonlocal batches
            while not stop.is_set():
                batch = [tokens[i % len(tokens)] for i in range(10)]
                statuses = await asyncio.gather(*(call(http, gw, t) for t in batch))
                results.extend(("new" if t == new_token else "old", s[0]) for t, s in zip(batch, statuses, strict=True))
                batches += 1
                batch_done.set()

        async def wait_batches(n: int) -> None:
            target = batches + n
            async with asyncio.timeout(10):
                while batches < target:
                    batch_done.clear()
                    await batch_done.wait()

        task = asyncio.create_task(hammer())
        try:
            await wait_batches(2)
            scripted_idp.keys = [rsa_key, new_key]  # rotation: the new key is published and used from now on
            tokens.append(new_token)
            burst = await asyncio.gather(*(call(http, gw, t) for t in [old_token, new_token] * 25))
            await wait_batches(3)
        finally:
            stop.set()
            await task
        assert [s for s, _, _ in burst] == [200] * 50
        assert {s for _, s in results} == {200}
        assert {kind for kind, _ in results} == {"old", "new"}
        assert scripted_idp.fetches == 2  # the start-up fetch, then one for the new kid

        scripted_idp.keys = [new_key]  # the old key is withdrawn
        assert await issuer_keys(gw).refresh() is True
        assert (await call(http, gw, new_token))[0] == 200
        status, body, _ = await call(http, gw, rsa_key.sign())
        assert (status, body["error"]) == (401, "invalid_token")


async def test_newly_published_kid_is_fetched_once_for_50_concurrent_requests(
    scripted_idp: ScriptedIdP, upstream: Upstream, rsa_key: Key, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    new_key = Key.ec("ec-2")
    config = config_for(scripted_idp, upstream, jwks_min_refresh_interval="0s")
    async with gateway(config, tmp_path) as gw:
        scripted_idp.keys.append(new_key)
        scripted_idp.gate.clear()  # hold the JWKS answer so that concurrent requests pile up on one fetch
        scripted_idp.fetched.clear()
        pending = [asyncio.create_task(call(http, gw, new_key.sign())) for _ in range(50)]
        async with asyncio.timeout(10):
            await scripted_idp.fetched.wait()
        scripted_idp.gate.set()
        statuses = [s for s, _, _ in await asyncio.gather(*pending)]
        assert statuses == [200] * 50
        assert scripted_idp.fetches == 2


async def test_unknown_kid_refetch_is_coalesced_and_rate_limited(scripted_idp: ScriptedIdP, rsa_key: Key) -> None:
    """50 concurrent verifications naming the same unknown kid cause ONE fetch; none within the cool-down after;
    one more once the cool-down has passed (the cool-down is measured on an injected clock)."""
    clock = FakeClock(1000.0)
    settings = IssuerSettings(
        name="corp",
        issuer=ISSUER,
        jwks_uri=f"{scripted_idp.url}/jwks",
        audiences=(AUDIENCE,),
        algorithms=("RS256",),
        jwks_min_refresh_interval=10.0,
    )
    metrics = Metrics()
    async with new_session() as session:
        keys = IssuerKeys(settings, session, metrics, clock=clock)
        verifier = JwtVerifier({"corp": keys}, TokenCache[Verified](100, metrics))
        assert await keys.refresh() is True
        ghost = sign_jws(Key.rsa().private, "RS256", {"alg": "RS256", "kid": "ghost"}, claims_for())

        async def attempts(n: int) -> list[BaseException | Any]:
            return await asyncio.gather(*(verifier.verify(ghost, CORP) for _ in range(n)), return_exceptions=True)

        clock.now += 10.0  # the start-up fetch's cool-down is over
        scripted_idp.gate.clear()
        scripted_idp.fetched.clear()
        burst = asyncio.ensure_future(attempts(50))
        async with asyncio.timeout(10):
            await scripted_idp.fetched.wait()  # the one fetch is under way, held by the IdP
        scripted_idp.gate.set()
        outcomes = await burst
        assert all(isinstance(o, errors.UnknownKey) for o in outcomes)
        assert scripted_idp.fetches == 2

        clock.now += 9.9  # still within the cool-down of that fetch
        assert all(isinstance(o, errors.UnknownKey) for o in await attempts(50))
        assert scripted_idp.fetches == 2

        clock.now += 0.1
        assert all(isinstance(o, errors.UnknownKey) for o in await attempts(50))
        assert scripted_idp.fetches == 3
        assert (
            metrics.registry.get_sample_value("gateway_jwks_refreshes_total", {"issuer": "corp", "outcome": "success"})
            == 3
        )
        assert (await verifier.verify(rsa_key.sign(), CORP)).subject == "alice"  # known kids are unaffected


async def test_unknown_kid_within_the_cool_down_is_refused_without_a_fetch(
    scripted_idp: ScriptedIdP, upstream: Upstream, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    config = config_for(scripted_idp, upstream, jwks_min_refresh_interval="60s")
    async with gateway(config, tmp_path) as gw:
        ghost = Key.rsa("ghost").sign()
        answers = await asyncio.gather(*(call(http, gw, ghost) for _ in range(50)))
        assert {(s, b["error"]) for s, b, _ in answers} == {(401, "invalid_token")}
        assert gw.metric("gateway_auth_decisions_total", route="orders", outcome="deny", reason="unknown_kid") == 50
        assert scripted_idp.fetches == 1  # only the start-up fetch, whose cool-down is still running


# --- an IdP that is down ---


async def test_idp_down_at_start_gives_503_then_the_gateway_heals(
    scripted_idp: ScriptedIdP, upstream: Upstream, rsa_key: Key, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    scripted_idp.fail = True
    config = config_for(scripted_idp, upstream, jwks_min_refresh_interval="50ms")
    async with gateway(config, tmp_path) as gw:
        token = rsa_key.sign()
        status, body = await readyz(http, gw)
        assert status == 503 and body["problems"] == ["issuer corp has no keys"]
        answers = await asyncio.gather(*(call(http, gw, token) for _ in range(5)))
        for status, body, headers in answers:
            assert (status, body["error"]) == (503, "temporarily_unavailable")  # never 401: the token may be fine
            assert int(headers["Retry-After"]) > 0
            assert "WWW-Authenticate" not in headers
        assert (
            gw.metric("gateway_auth_decisions_total", route="orders", outcome="error", reason="keys_unavailable") == 5
        )
        assert upstream.requests == []

        scripted_idp.fail = False
        await wait_for_fetches(scripted_idp, scripted_idp.fetches + 1)  # the background refresher retries soon
        assert (await call(http, gw, token))[0] == 200  # joins that fetch if it is still under way
        assert await readyz(http, gw) == (200, {"ready": True, "problems": []})
        assert gw.metric("gateway_jwks_refreshes_total", issuer="corp", outcome="failure") >= 1
        assert gw.metric("gateway_jwks_refreshes_total", issuer="corp", outcome="success") == 1


async def test_a_failing_endpoint_is_retried_with_back_off_even_without_a_cool_down(
    scripted_idp: ScriptedIdP, upstream: Upstream, tmp_path: Path
) -> None:
    """jwks_min_refresh_interval 0 must not turn the refresher into a loop hammering a failing IdP: retries back
    off from 100 ms (measured between the IdP's own fetch events; a lower bound, so never flaky)."""
    scripted_idp.fail = True
    config = config_for(scripted_idp, upstream, jwks_min_refresh_interval="0s", jwks_refresh_interval="300s")
    async with gateway(config, tmp_path):
        seen: list[float] = []
        for count in (2, 3, 4):
            await wait_for_fetches(scripted_idp, count)
            seen.append(time.monotonic())
        gaps = [later - earlier for earlier, later in zip(seen, seen[1:], strict=False)]
        assert gaps[0] >= 0.19 and gaps[1] >= 0.39  # 100 ms, 200 ms, 400 ms, ...
        assert scripted_idp.fetches == 4


class FailingJwks(ScriptedIdP):
    """Serves the real JWKS until `mode` names a way of failing."""

    mode: str = ""
    redirect: str = ""

    async def _jwks(self, request: web.Request) -> web.Response:
        if not self.mode:
            return await super()._jwks(request)
        self.fetches += 1
        self.fetched.set()
        if self.mode == "status":
            return web.Response(status=503, text="maintenance")
        if self.mode == "not-json":
            return web.Response(text="<html>login</html>", content_type="text/html")
        if self.mode == "json-array":
            return web.json_response([k.public_jwk() for k in self.keys])
        if self.mode == "no-keys-member":
            return web.json_response({"jwks": [k.public_jwk() for k in self.keys]})
        if self.mode == "only-unusable-keys":
            return web.json_response(
                {"keys": [{"kty": "oct", "k": "c2VjcmV0"}, {**self.keys[0].public_jwk(), "use": "enc"}]}
            )
        if self.mode == "over-1-mib":
            return web.json_response({"keys": [k.public_jwk() for k in self.keys], "pad": "x" * (1 << 20)})
        if self.mode == "redirect":
            raise web.HTTPFound(self.redirect)
        assert self.mode == "slow", self.mode
        await self.gate.wait()  # held past the gateway's jwks_timeout
        return web.Response(status=504)


@pytest.mark.parametrize(
    "mode",
    ["status", "not-json", "json-array", "no-keys-member", "only-unusable-keys", "over-1-mib", "redirect", "slow"],
)
async def test_last_good_keys_survive_a_failing_endpoint(
    mode: str,
    upstream: Upstream,
    rsa_key: Key,
    ec_key: Key,
    ed_key: Key,
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    idp = FailingJwks(keys=[rsa_key, ec_key, ed_key])
    runner, idp.url = await serve_app(idp.app())
    attacker = Upstream()
    attacker_runner, attacker.url = await serve_app(attacker.app())
    idp.redirect = f"{attacker.url}/jwks"
    try:
        config = config_for(idp, upstream, jwks_timeout="200ms")
        async with gateway(config, tmp_path) as gw:
            idp.mode = mode
            idp.gate.clear()  # only "slow" waits on it: past jwks_timeout
            assert await issuer_keys(gw).refresh() is False
            assert gw.metric("gateway_jwks_refreshes_total", issuer="corp", outcome="failure") == 1
            assert gw.metric("gateway_jwks_keys", issuer="corp") == 3
            assert (await readyz(http, gw))[0] == 200
            for key in (rsa_key, ec_key, ed_key):  # fresh tokens: verified against the kept keys, not a cache
                assert (await call(http, gw, key.sign()))[0] == 200
        assert attacker.requests == []  # a redirect is never followed
    finally:
        idp.gate.set()
        await runner.cleanup()
        await attacker_runner.cleanup()


async def test_a_jwks_larger_than_one_read_is_read_whole(
    scripted_idp: ScriptedIdP, upstream: Upstream, rsa_key: Key, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """A JWKS of ~700 KB (many keys, most for encryption) arrives in several reads; it is read to the end."""
    filler = {**Key.rsa("filler").public_jwk(), "use": "enc"}
    scripted_idp.extra_jwks = [{**filler, "kid": f"enc-{i}"} for i in range(1500)]
    scripted_idp.keys = [rsa_key]
    async with gateway(config_for(scripted_idp, upstream), tmp_path) as gw:
        assert gw.metric("gateway_jwks_refreshes_total", issuer="corp", outcome="success") == 1
        assert gw.metric("gateway_jwks_keys", issuer="corp") == 1
        assert (await call(http, gw, rsa_key.sign()))[0] == 200


async def test_an_odd_key_in_the_jwks_does_not_stop_the_others(
    scripted_idp: ScriptedIdP, upstream: Upstream, rsa_key: Key, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """One key pyjwt cannot load for an unexpected reason (alg none on an RSA key) is skipped, not fatal."""
    scripted_idp.extra_jwks = [{**rsa_key.public_jwk(), "kid": "odd", "alg": "none"}, "not a key", 7]
    async with gateway(config_for(scripted_idp, upstream), tmp_path) as gw:
        assert await readyz(http, gw) == (200, {"ready": True, "problems": []})
        assert gw.metric("gateway_jwks_keys", issuer="corp") == 3
        assert (await call(http, gw, rsa_key.sign()))[0] == 200


async def test_a_weak_rsa_key_in_the_jwks_verifies_nothing(
    scripted_idp: ScriptedIdP, upstream: Upstream, rsa_key: Key, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """A 1024-bit RSA key is skipped at load (pyjwt would only warn, on every verification, and accept)."""
    weak = Key(rsa.generate_private_key(public_exponent=65537, key_size=1024), "weak", "RS256")  # noqa: S505
    scripted_idp.keys = [rsa_key, weak]
    async with gateway(config_for(scripted_idp, upstream), tmp_path) as gw:
        assert gw.metric("gateway_jwks_keys", issuer="corp") == 1
        token = sign_jws(weak.private, "RS256", {"alg": "RS256", "kid": "weak"}, claims_for())  # jwt.encode warns
        status, body, _ = await call(http, gw, token)
        assert (status, body["error"]) == (401, "invalid_token")
        assert gw.metric("gateway_auth_decisions_total", route="orders", outcome="deny", reason="unknown_kid") == 1
        assert (await call(http, gw, rsa_key.sign()))[0] == 200


# --- Cache-Control ---


async def test_cache_control_max_age_shortens_the_refresh_interval(
    scripted_idp: ScriptedIdP, upstream: Upstream, tmp_path: Path
) -> None:
    """With max-age=0 the refresher refetches at the cool-down (50 ms) instead of every 300 s."""
    scripted_idp.cache_control = "public, max-age=0"
    config = config_for(scripted_idp, upstream, jwks_refresh_interval="300s", jwks_min_refresh_interval="50ms")
    async with gateway(config, tmp_path):
        await wait_for_fetches(scripted_idp, 4, within=5.0)


@pytest.mark.parametrize(
    ("cache_control", "expected"),
    [
        (None, 300.0),
        ("public, max-age=120", 120.0),
        ("max-age=100000", 300.0),  # never lengthens the configured interval
        ("max-age=0", 5.0),  # never below the cool-down
        ("no-cache", 300.0),
        ("s-maxage=10", 300.0),  # a shared-cache directive, not ours
    ],
)
async def test_next_refresh_follows_cache_control(
    cache_control: str | None,
    expected: float,
    scripted_idp: ScriptedIdP,
    upstream: Upstream,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.verify.jwks")
    scripted_idp.cache_control = cache_control
    config = config_for(scripted_idp, upstream, jwks_refresh_interval="300s", jwks_min_refresh_interval="5s")
    async with gateway(config, tmp_path):
        loaded = [r for r in caplog.records if r.getMessage() == "JWKS loaded"]
        assert [getattr(r, "next_refresh_s") for r in loaded] == [expected]  # noqa: B009


# --- key removal and the verified-token cache ---


async def test_a_removed_key_stops_verifying_even_a_cached_token(
    gw: RunningGateway, scripted_idp: ScriptedIdP, rsa_key: Key, ec_key: Key, http: aiohttp.ClientSession
) -> None:
    token = ec_key.sign()
    assert (await call(http, gw, token))[0] == 200
    assert (await call(http, gw, token))[0] == 200
    assert gw.metric("gateway_token_cache_requests_total", result="hit") == 1

    scripted_idp.keys = [rsa_key]  # the EC key is withdrawn
    assert await issuer_keys(gw).refresh() is True
    status, body, _ = await call(http, gw, token)
    assert (status, body["error"]) == (401, "invalid_token")
    assert (await call(http, gw, rsa_key.sign()))[0] == 200


async def test_a_kid_republished_with_another_key_stops_verifying_a_cached_token(
    gw: RunningGateway, scripted_idp: ScriptedIdP, rsa_key: Key, ec_key: Key, ed_key: Key, http: aiohttp.ClientSession
) -> None:
    """An IdP that reuses a kid for a new key (after a compromise, say): tokens of the old key, even cached, fail."""
    token = ec_key.sign()
    assert (await call(http, gw, token))[0] == 200
    replacement = Key.ec(ec_key.kid)
    scripted_idp.keys = [rsa_key, replacement, ed_key]
    assert await issuer_keys(gw).refresh() is True
    status, body, _ = await call(http, gw, token)
    assert (status, body["error"]) == (401, "invalid_token")
    assert gw.metric("gateway_auth_decisions_total", route="orders", outcome="deny", reason="bad_signature") == 1
    assert (await call(http, gw, replacement.sign()))[0] == 200


async def test_keys_of_two_types_sharing_a_kid_both_verify(
    gw: RunningGateway, scripted_idp: ScriptedIdP, rsa_key: Key, ec_key: Key, http: aiohttp.ClientSession
) -> None:
    # RFC 7517 §4.5 allows one kid on keys of different types; the EC key after the RSA one must not hide it.
    shared = [Key(rsa_key.private, "shared", rsa_key.alg), Key(ec_key.private, "shared", ec_key.alg)]
    scripted_idp.keys = shared
    assert await issuer_keys(gw).refresh() is True
    for key in shared:
        assert (await call(http, gw, key.sign()))[0] == 200


async def test_a_token_without_kid_is_tried_against_each_key_for_its_alg(
    gw: RunningGateway, scripted_idp: ScriptedIdP, rsa_key: Key, http: aiohttp.ClientSession
) -> None:
    # kid is optional (RFC 7515 §4.1.4); mid-rotation the issuer publishes two RSA keys, and signs with either.
    old, new = rsa_key, Key.rsa(kid="rsa-2")
    scripted_idp.keys = [old, new]
    assert await issuer_keys(gw).refresh() is True
    by_old, by_new, by_stranger = (
        sign_jws(key.private, "RS256", {"alg": "RS256"}, claims_for()) for key in (old, new, Key.rsa())
    )
    for token in (by_old, by_new):
        assert (await call(http, gw, token))[0] == 200
        assert (await call(http, gw, token))[0] == 200  # cached with the key that verified it
    assert gw.metric("gateway_token_cache_requests_total", result="hit") == 2
    assert (await call(http, gw, by_stranger))[0] == 401
    assert gw.metric("gateway_auth_decisions_total", route="orders", outcome="deny", reason="bad_signature") == 1
    # A cached token stops at once when the key that verified it is withdrawn, though another RSA key remains.
    scripted_idp.keys = [old]
    assert await issuer_keys(gw).refresh() is True
    assert (await call(http, gw, by_old))[0] == 200
    assert (await call(http, gw, by_new))[0] == 401


async def test_verified_token_cache_counts_hits_and_misses(
    gw: RunningGateway, rsa_key: Key, http: aiohttp.ClientSession
) -> None:
    first, second = rsa_key.sign(), rsa_key.sign()
    for token in (first, first, first, second):
        assert (await call(http, gw, token))[0] == 200
    assert gw.metric("gateway_token_cache_requests_total", result="hit") == 2
    assert gw.metric("gateway_token_cache_requests_total", result="miss") == 2


@pytest.mark.parametrize("leeway", [0.0, 30.0])
async def test_a_cached_token_is_refused_once_expired(leeway: float, rsa_key: Key, tmp_path: Path) -> None:
    """Expiry is checked on every cache hit, against the verifier's clock (injected here), honouring leeway."""
    pem = tmp_path / "rsa.pem"
    pem.write_bytes(rsa_key.public_pem())
    settings = IssuerSettings(
        name="corp",
        issuer=ISSUER,
        keys=(StaticKey(pem_file=str(pem), kid=rsa_key.kid),),
        audiences=(AUDIENCE,),
        leeway=leeway,
    )
    metrics = Metrics()
    static = KeySet(from_pem_file(k.pem_file, k.kid) for k in settings.keys)
    keys = IssuerKeys(settings, None, metrics, static=static)
    exp = int(time.time()) + 600
    clock = FakeClock(time.time())
    verifier = JwtVerifier({"corp": keys}, TokenCache[Verified](10, metrics), clock=clock)
    token = rsa_key.sign(exp=exp)

    identity = await verifier.verify(token, CORP)  # signature and claims checked by pyjwt, then cached
    assert identity.expires_at == exp
    clock.now = exp + leeway - 0.001
    assert await verifier.verify(token, CORP) == identity  # a cache hit, still valid
    clock.now = exp + leeway
    with pytest.raises(errors.Expired):
        await verifier.verify(token, CORP)
    assert metrics.registry.get_sample_value("gateway_token_cache_requests_total", {"result": "hit"}) == 2


# --- issuers sharing one URL ---


def shared_url_config(idp: IdP, upstream: Upstream, tokens: str = "") -> str:
    """Two issuers with one URL and one JWKS, an audience each (one IdP, an audience per API), a route each."""
    routes = "".join(
        f"""  - name: {name}
    match: {{path_prefix: /{name}}}
    upstream: {{url: "{upstream.url}"}}
    auth: {{mode: jwt, issuers: [{name}]}}
"""
        for name in ("orders", "billing")
    )
    issuers = "".join(
        f"""  - name: {name}
    issuer: {ISSUER}
    jwks_uri: {idp.url}/jwks
    audiences: [api://{name}]
"""
        for name in ("orders", "billing")
    )
    return f"issuers:\n{issuers}routes:\n{routes}{tokens}"


async def call_at(http: aiohttp.ClientSession, gw: RunningGateway, path: str, token: str) -> tuple[int, str]:
    async with http.get(f"{gw.url}{path}", headers={"Authorization": f"Bearer {token}"}) as resp:
        return resp.status, (await resp.json()).get("error_description", "") if resp.status != 200 else ""


async def test_issuers_sharing_a_url_are_told_apart_by_the_route(
    idp: IdP, upstream: Upstream, rsa_key: Key, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    orders, billing = rsa_key.sign(aud="api://orders"), rsa_key.sign(aud="api://billing")
    both = rsa_key.sign(aud=["api://orders", "api://billing"])
    wrong_audience = (401, errors.WrongAudience.description)
    async with gateway(shared_url_config(idp, upstream), tmp_path) as gw:
        # Each twice: the second is judged from the verified-token cache, which must give the same answer.
        for _ in range(2):
            assert await call_at(http, gw, "/orders", orders) == (200, "")
            assert await call_at(http, gw, "/billing", billing) == (200, "")
            assert await call_at(http, gw, "/billing", orders) == wrong_audience
            assert await call_at(http, gw, "/orders", billing) == wrong_audience
            assert await call_at(http, gw, "/orders", both) == (200, "")
            assert await call_at(http, gw, "/billing", both) == (200, "")


async def test_an_issuer_sharing_the_gateways_own_url_keeps_its_tokens(
    idp: IdP, upstream: Upstream, rsa_key: Key, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    signing.write_private_key(signing.generate(), str(tmp_path / "signing.pem"))
    tokens = f"tokens: {{issuer: {ISSUER}, signing_key_file: {tmp_path / 'signing.pem'}}}\n"
    async with gateway(shared_url_config(idp, upstream, tokens), tmp_path) as gw:
        # Not one of the gateway's own (always long-lived, so needing a jti): a short-lived token without one passes.
        assert await call_at(http, gw, "/orders", rsa_key.sign(aud="api://orders", jti=None)) == (200, "")


# --- required claims ---


@pytest.mark.parametrize(
    ("claims", "status"),
    [
        ({"admin": True, "level": 1}, 200),
        ({"admin": [False, True], "level": 1.0}, 200),  # JSON has one number type: 1 and 1.0 are the same
        ({"admin": 1, "level": 1}, 403),  # Python's True == 1, but JSON's true is not a number
        ({"admin": 1.0, "level": 1}, 403),
        ({"admin": [1], "level": 1}, 403),
        ({"admin": "true", "level": 1}, 403),
        ({"admin": True, "level": True}, 403),
        ({"admin": True, "level": [True]}, 403),
    ],
)
async def test_required_claims_tell_booleans_from_numbers(
    claims: dict[str, Any],
    status: int,
    idp: IdP,
    upstream: Upstream,
    rsa_key: Key,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    rule = "required_claims: {admin: true, level: 1}"
    assert await status_under(rule, rsa_key.sign(claims), idp, upstream, http, tmp_path) == status


@pytest.mark.parametrize(
    ("claims", "status"),
    [
        ({"scope": "orders:read"}, 200),
        ({"scope": None, "scp": ["orders:read"]}, 200),  # a null scope is no scope: scp is read
        ({"scp": "orders:read"}, 200),  # no scope at all
        ({"scope": "other", "scp": ["orders:read"]}, 403),  # scope, when present, decides
    ],
)
async def test_scopes_come_from_scp_when_scope_is_absent_or_null(
    claims: dict[str, Any],
    status: int,
    idp: IdP,
    upstream: Upstream,
    rsa_key: Key,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    rule = "required_scopes: [orders:read]"
    assert await status_under(rule, rsa_key.sign(claims, scope=None), idp, upstream, http, tmp_path) == status


async def status_under(
    rule: str, token: str, idp: IdP, upstream: Upstream, http: aiohttp.ClientSession, tmp_path: Path
) -> int:
    """The status of one request with `token` on the route of config_for with `rule` added to its auth."""
    config = config_for(idp, upstream).replace("issuers: [corp]}", f"issuers: [corp], {rule}}}")
    async with gateway(config, tmp_path) as gw:
        return (await call(http, gw, token))[0]


# --- reload ---


async def test_a_reload_reads_static_key_files_again(
    scripted_idp: ScriptedIdP, upstream: Upstream, rsa_key: Key, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """Replacing a PEM file and reloading is how a withdrawn key stops being trusted."""
    successor = Key.rsa("rsa-1")
    (tmp_path / "rsa.pem").write_bytes(rsa_key.public_pem())
    async with gateway(config_for(scripted_idp, upstream, keys="[{pem_file: rsa.pem, kid: rsa-1}]"), tmp_path) as gw:
        assert (await call(http, gw, rsa_key.sign()))[0] == 200
        (tmp_path / "rsa.pem").write_bytes(successor.public_pem())
        assert await gw.server.reload()
        assert (await call(http, gw, rsa_key.sign()))[0] == 401
        assert (await call(http, gw, successor.sign()))[0] == 200


async def test_a_reload_during_the_idps_outage_keeps_the_last_good_keys(
    scripted_idp: ScriptedIdP, upstream: Upstream, rsa_key: Key, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """Changing an issuer's audiences or leeway does not change its key set: a config push while the JWKS endpoint
    is down must not leave every replica without keys."""
    scripted_idp.keys = [rsa_key]
    async with gateway(config_for(scripted_idp, upstream), tmp_path) as gw:
        assert (await call(http, gw, rsa_key.sign()))[0] == 200
        scripted_idp.fail = True
        path = gw.server.config_path
        assert path is not None
        path.write_text(path.read_text().replace("    algorithms:", "    leeway: 10s\n    algorithms:"))
        assert await gw.server.reload()
        assert (await call(http, gw, rsa_key.sign()))[0] == 200
        assert await readyz(http, gw) == (200, {"ready": True, "problems": []})
        assert gw.metric("gateway_jwks_keys", issuer="corp") == 1


async def test_the_key_gauge_shows_an_issuer_without_keys_and_forgets_a_removed_one(
    scripted_idp: ScriptedIdP, upstream: Upstream, rsa_key: Key, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """gateway_jwks_keys == 0 is what the shipped alert watches: an issuer that never got keys must show as 0."""
    scripted_idp.keys = [rsa_key]
    scripted_idp.fail = True
    config = config_for(scripted_idp, upstream).replace("routes:", _SECOND_ISSUER + "routes:")
    async with gateway(config, tmp_path) as gw:
        assert key_gauges(gw) == {"corp": 0.0, "spare": 0.0}
        path = gw.server.config_path
        assert path is not None
        path.write_text(path.read_text().replace(_SECOND_ISSUER, ""))
        assert await gw.server.reload()
        assert key_gauges(gw) == {"corp": 0.0}


def key_gauges(gw: RunningGateway) -> dict[str, float]:
    return {
        sample.labels["issuer"]: sample.value
        for metric in gw.metrics.registry.collect()
        if metric.name == "gateway_jwks_keys"
        for sample in metric.samples
    }


_SECOND_ISSUER = """  - name: spare
    issuer: "https://spare.test/"
    jwks_uri: "http://127.0.0.1:9/jwks"
    audiences: [spare]
"""


async def _line_with(stream: asyncio.StreamReader, text: bytes) -> bytes:
    while True:
        line = await stream.readline()
        assert line, f"no line with {text!r} before the stream ended"
        if text in line:
            return line


async def test_a_sighup_while_the_gateway_starts_is_ignored_not_fatal(
    scripted_idp: ScriptedIdP, upstream: Upstream, tmp_path: Path
) -> None:
    """A reload asked for while the process is still fetching its keys (no handler of its own yet) used to kill
    it: SIGHUP's default action. A config manager that signals just after a start must not take capacity away."""
    import signal
    import sys

    scripted_idp.gate.clear()  # JWKS answers held: the gateway stays in its start-up
    path = tmp_path / "gateway.yaml"
    path.write_text(
        "listen: {host: 127.0.0.1, port: 0}\nadmin: {host: 127.0.0.1, port: 0}\n" + config_for(scripted_idp, upstream)
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "run", "--config", str(path),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stderr is not None
    try:
        async with asyncio.timeout(20):
            await scripted_idp.fetched.wait()
            process.send_signal(signal.SIGHUP)
            scripted_idp.gate.set()
            while b"gateway listening" not in await process.stderr.readline():
                assert not process.stderr.at_eof(), "the gateway died"
            # Once started, SIGHUP reloads (until its handler is installed it is still ignored: send until it is).
            reloaded = asyncio.create_task(_line_with(process.stderr, b"config reloaded"))
            while not reloaded.done():
                process.send_signal(signal.SIGHUP)
                await asyncio.wait([reloaded], timeout=0.2)
            await reloaded
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
