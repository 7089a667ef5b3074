"""Where the token is found, per route (Authorization, a named header, a cookie, a query parameter), and that the
credential is taken out of the request before it is forwarded, while everything else reaches the upstream."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import pytest

from tests.support import AUDIENCE, ISSUER, IdP, Key, RunningGateway, Upstream, log_text, start_gateway


@pytest.fixture
async def gw(idp: IdP, upstream: Upstream, tmp_path: Path) -> AsyncIterator[RunningGateway]:
    config = f"""
issuers:
  - name: corp
    issuer: {ISSUER}
    jwks_uri: {idp.url}/jwks
    audiences: [{AUDIENCE}]
    algorithms: [RS256, ES256, EdDSA]
routes:
  - name: header
    match: {{path_prefix: /header}}
    upstream: {{url: "{upstream.url}"}}
    auth: {{mode: jwt, issuers: [corp], token: {{source: header, name: X-Api-Token}}}}
  - name: cookie
    match: {{path_prefix: /cookie}}
    upstream: {{url: "{upstream.url}"}}
    auth: {{mode: jwt, issuers: [corp], token: {{source: cookie, name: access_token}}}}
  - name: query
    match: {{path_prefix: /query}}
    upstream: {{url: "{upstream.url}"}}
    auth: {{mode: jwt, issuers: [corp], token: {{source: query, name: access_token}}}}
  - name: kept
    match: {{path_prefix: /kept}}
    upstream: {{url: "{upstream.url}"}}
    auth: {{mode: jwt, issuers: [corp], token: {{source: header, name: X-Api-Token}}}}
    forward: {{remove_credential: false}}
  - name: bearer
    match: {{path_prefix: /bearer}}
    upstream: {{url: "{upstream.url}"}}
    auth: {{mode: jwt, issuers: [corp]}}
"""
    async for running in start_gateway(config, tmp_path):
        yield running


@pytest.fixture
def token(rsa_key: Key) -> str:
    return rsa_key.sign()


async def get(
    http: aiohttp.ClientSession, gw: RunningGateway, path: str, headers: list[tuple[str, str]] | None = None
) -> tuple[int, dict[str, str], str]:
    async with http.get(gw.url + path, headers=headers or [], allow_redirects=False) as resp:
        return resp.status, dict(resp.headers), await resp.text()


def assert_no_token_anywhere(token: str, upstream: Upstream, caplog: pytest.LogCaptureFixture) -> None:
    for seen in upstream.requests:
        assert token not in seen["path"]
        assert all(token not in value for value in seen["headers"].values())
    assert token not in log_text(caplog.records)


# --- a named header ---


@pytest.mark.parametrize("prefix", ["", "Bearer ", "bearer ", "BEARER  "])
async def test_named_header_carries_the_token_and_is_removed(
    prefix: str,
    token: str,
    gw: RunningGateway,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    headers = [("X-Api-Token", prefix + token), ("X-Other", "kept"), ("Authorization", "Basic dXBzdHJlYW06cHc=")]
    status, _, _ = await get(http, gw, "/header/1", headers)
    assert status == 200
    seen = upstream.requests[0]["headers"]
    assert "X-Api-Token" not in seen
    assert seen["X-Other"] == "kept"
    assert seen["Authorization"] == "Basic dXBzdHJlYW06cHc="  # not this route's credential: left for the upstream
    assert_no_token_anywhere(token, upstream, caplog)


async def test_named_header_route_ignores_the_authorization_header(
    token: str, gw: RunningGateway, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    status, headers, _ = await get(http, gw, "/header/1", [("Authorization", f"Bearer {token}")])
    assert status == 401
    assert headers["WWW-Authenticate"] == 'Bearer realm="gateway"'
    assert upstream.requests == []


async def test_named_header_twice_is_a_bad_request(
    token: str, gw: RunningGateway, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    status, _, body = await get(http, gw, "/header/1", [("X-Api-Token", token), ("X-Api-Token", token)])
    assert status == 400 and '"invalid_request"' in body
    assert token not in body
    assert upstream.requests == []


async def test_named_header_is_forwarded_when_remove_credential_is_off(
    token: str, gw: RunningGateway, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    status, _, _ = await get(http, gw, "/kept/1", [("X-Api-Token", token)])
    assert status == 200
    assert upstream.requests[0]["headers"]["X-Api-Token"] == token


# --- a cookie ---


async def test_cookie_carries_the_token_and_only_it_is_removed(
    token: str,
    gw: RunningGateway,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    cookie = f"session=abc123; access_token={token}; theme=dark"
    status, _, _ = await get(http, gw, "/cookie/1", [("Cookie", cookie)])
    assert status == 200
    forwarded = upstream.requests[0]["headers"]["Cookie"]
    assert sorted(c.strip() for c in forwarded.split(";")) == ["session=abc123", "theme=dark"]
    assert_no_token_anywhere(token, upstream, caplog)


async def test_cookie_header_with_only_the_credential_is_dropped(
    token: str, gw: RunningGateway, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    status, _, _ = await get(http, gw, "/cookie/1", [("Cookie", f"access_token={token}")])
    assert status == 200
    assert "Cookie" not in upstream.requests[0]["headers"]


async def test_cookie_route_without_the_cookie_is_401(
    token: str, gw: RunningGateway, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    status, headers, _ = await get(
        http, gw, "/cookie/1", [("Cookie", "session=abc123"), ("Authorization", f"Bearer {token}")]
    )
    assert status == 401
    assert headers["WWW-Authenticate"] == 'Bearer realm="gateway"'
    assert upstream.requests == []


async def test_credential_cookie_twice_is_a_bad_request(
    token: str, rsa_key: Key, gw: RunningGateway, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    """Which of two same-named cookies wins is up to the parser; a tossed-in second credential is refused."""
    cookie = f"access_token={token}; theme=dark; access_token={rsa_key.sign(sub='mallory')}"
    status, headers, body = await get(http, gw, "/cookie/1", [("Cookie", cookie)])
    assert status == 400 and '"invalid_request"' in body
    assert 'error="invalid_request"' in headers["WWW-Authenticate"]
    assert token not in body
    assert upstream.requests == []


# --- a query parameter ---


async def test_query_parameter_carries_the_token_and_is_removed(
    token: str,
    gw: RunningGateway,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    status, _, _ = await get(http, gw, f"/query/items?page=2&access_token={token}&q=a%20b")
    assert status == 200
    forwarded = urlsplit(upstream.requests[0]["path"])
    assert forwarded.path == "/query/items"
    assert parse_qsl(forwarded.query) == [("page", "2"), ("q", "a b")]
    assert_no_token_anywhere(token, upstream, caplog)


async def test_query_parameter_with_an_encoded_name_is_still_removed(
    token: str, gw: RunningGateway, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    """access%5Ftoken decodes to access_token: the gateway reads it as the credential, so it must also strip it."""
    status, _, _ = await get(http, gw, f"/query/items?access%5Ftoken={token}&keep=1")
    assert status == 200
    assert token not in upstream.requests[0]["path"]
    assert parse_qsl(urlsplit(upstream.requests[0]["path"]).query) == [("keep", "1")]


async def test_query_parameter_twice_is_a_bad_request(
    token: str, gw: RunningGateway, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    status, _, body = await get(http, gw, f"/query/1?access_token={token}&access_token={token}")
    assert status == 400 and '"invalid_request"' in body
    assert upstream.requests == []


async def test_query_route_without_the_parameter_is_401(
    gw: RunningGateway, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    status, _, _ = await get(http, gw, "/query/1?page=2")
    assert status == 401
    assert upstream.requests == []


# --- Authorization: Bearer ---


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
async def test_bearer_scheme_is_case_insensitive(
    scheme: str, token: str, gw: RunningGateway, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    status, _, _ = await get(http, gw, "/bearer/1", [("Authorization", f"{scheme} {token}")])
    assert status == 200
    assert "Authorization" not in upstream.requests[0]["headers"]
    assert gw.metric("gateway_auth_decisions_total", route="bearer", outcome="allow", reason="ok") == 1


@pytest.mark.parametrize(
    ("value", "status"),
    [("Bearer\tTOKEN", 400), ("", 400), ("Bearer,TOKEN", 400), ("Basic dXNlcjpwdw==", 401), ("Negotiate", 401)],
)
async def test_an_authorization_header_that_is_no_scheme_is_malformed(
    value: str, status: int, token: str, gw: RunningGateway, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    """DESIGN: a malformed Authorization header is 400 invalid_request. Another scheme (Basic) is a credential this
    route does not take: 401 with a bare challenge. A value that is no scheme at all used to be taken as one."""
    code, headers, _ = await get(http, gw, "/bearer/1", [("Authorization", value.replace("TOKEN", token))])
    assert code == status
    challenge = headers["WWW-Authenticate"]
    assert ('error="invalid_request"' in challenge) is (status == 400)
    assert upstream.requests == []


async def test_a_forged_token_in_any_location_is_refused(
    ec_key: Key, gw: RunningGateway, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    """Every location feeds the same verification: a rogue key's token fails wherever it is carried."""
    rogue = Key.ec("ec-1").sign()
    for path, headers in [
        ("/header/1", [("X-Api-Token", rogue)]),
        ("/cookie/1", [("Cookie", f"access_token={rogue}")]),
        (f"/query/1?access_token={rogue}", []),
        ("/bearer/1", [("Authorization", f"Bearer {rogue}")]),
    ]:
        status, response_headers, body = await get(http, gw, path, headers)
        assert status == 401 and '"invalid_token"' in body, path
        assert 'error="invalid_token"' in response_headers["WWW-Authenticate"]
    assert upstream.requests == []
    assert (await get(http, gw, "/cookie/1", [("Cookie", f"access_token={ec_key.sign()}")]))[0] == 200


def test_cookie_credential_removal_keeps_unparsable_neighbours() -> None:
    from gateway.proxy import _without_cookie

    # SimpleCookie cannot parse a\c: every other cookie used to be dropped with the credential.
    assert _without_cookie("access_token=T; a=b\\c; theme=dark", "access_token") == "a=b\\c; theme=dark"
    assert _without_cookie("access_token=T", "access_token") == ""
    assert _without_cookie("x=1;access_token=T;y", "access_token") == "x=1; y"
