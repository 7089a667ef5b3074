"""Forwarding through a live gateway: headers in and out, identity, credential removal, paths, upstream failures."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import aiohttp
import pytest
from multidict import CIMultiDict
from yarl import URL

from gateway import configfile, proxy
from gateway.identity import Identity
from gateway.listener import RequestView
from tests.support import (
    AUDIENCE,
    ISSUER,
    IdP,
    Key,
    RichUpstream,
    RunningGateway,
    gateway_to_raw_upstream,
    open_route_config,
    pattern_bytes,
    raw_http_request,
    read_answer,
    refusing_port,
    start_gateway,
    unresponsive_port,
)


def config(idp: IdP, up: str, refused: int) -> str:
    return f"""
issuers:
  - name: corp
    issuer: {ISSUER}
    jwks_uri: {idp.url}/jwks
    audiences: [{AUDIENCE}]
    algorithms: [RS256, ES256, EdDSA]
routes:
  - name: api
    match: {{path_prefix: /api}}
    upstream: {{url: "{up}", strip_prefix: /api}}
    auth: {{mode: jwt, issuers: [corp]}}
    forward: {{identity_headers: {{X-Auth-Subject: sub, X-Auth-Scopes: scp, X-Auth-Admin: admin, X-Auth-Aud: aud}}}}
  - name: keep
    match: {{path_prefix: /keep}}
    upstream: {{url: "{up}"}}
    auth: {{mode: jwt, issuers: [corp]}}
    forward: {{remove_credential: false}}
  - name: header-token
    match: {{path_prefix: /hdr}}
    upstream: {{url: "{up}"}}
    auth: {{mode: jwt, issuers: [corp], token: {{source: header, name: X-Api-Token}}}}
  - name: cookie-token
    match: {{path_prefix: /ck}}
    upstream: {{url: "{up}"}}
    auth: {{mode: jwt, issuers: [corp], token: {{source: cookie, name: session}}}}
  - name: query-token
    match: {{path_prefix: /qt}}
    upstream: {{url: "{up}"}}
    auth: {{mode: jwt, issuers: [corp], token: {{source: query, name: access_token}}}}
  - name: strip
    match: {{path_prefix: /svc}}
    upstream: {{url: "{up}/base/", strip_prefix: /svc}}
    auth: {{mode: none}}
  - name: based
    match: {{path_prefix: /based}}
    upstream: {{url: "{up}/v2"}}
    auth: {{mode: none}}
  - name: kept-host
    match: {{path_prefix: /kept-host}}
    upstream: {{url: "{up}", preserve_host: true}}
    auth: {{mode: none}}
  - name: refused
    match: {{path_prefix: /refused}}
    upstream: {{url: "http://127.0.0.1:{refused}"}}
    auth: {{mode: none}}
  - name: impatient
    match: {{path_prefix: /slow}}
    upstream: {{url: "{up}", timeout: 300ms, idle_timeout: 300ms}}
    auth: {{mode: none}}
  - name: open
    match: {{path_prefix: /}}
    upstream: {{url: "{up}"}}
    auth: {{mode: none}}
"""


@pytest.fixture
async def gw(idp: IdP, rich_upstream: RichUpstream, tmp_path: Path) -> AsyncIterator[RunningGateway]:
    with refusing_port() as refused:
        async for running in start_gateway(config(idp, rich_upstream.url, refused), tmp_path):
            yield running


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def values(header_list: list[tuple[bytes, bytes]], name: str) -> list[str]:
    """Every value of header `name` (any case) as the upstream received them."""
    return [v.decode() for k, v in header_list if k.decode().lower() == name.lower()]


# --- request headers ---------------------------------------------------------------------------------------------


async def test_hop_by_hop_and_connection_named_headers_removed(
    gw: RunningGateway, rich_upstream: RichUpstream, rsa_key: Key, http: aiohttp.ClientSession
) -> None:
    headers = {
        **bearer(rsa_key.sign()),
        "Connection": "close, X-Secret",
        "X-Secret": "1",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Trailer": "X-Checksum",
        "Upgrade": "h2c",
        "Proxy-Authorization": "Basic c2VjcmV0OnNlY3JldA==",
        "Proxy-Connection": "keep-alive",
        "X-Kept": "kept",
    }
    async with http.get(f"{gw.url}/api/echo", headers=headers) as resp:
        assert resp.status == 200
    seen = rich_upstream.requests[-1]["header_list"]
    names = {k.decode().lower() for k, _ in seen}
    for gone in ("x-secret", "keep-alive", "te", "trailer", "upgrade", "proxy-authorization", "proxy-connection"):
        assert gone not in names, gone
    assert values(seen, "Connection") in ([], ["keep-alive"])  # the gateway's own hop to the upstream, if any
    assert values(seen, "X-Kept") == ["kept"]


async def test_a_request_trailer_is_no_header_and_is_dropped(gw: RunningGateway, rich_upstream: RichUpstream) -> None:
    """A trailer field naming a header the head had (Content-Type) was refused as 'appears more than once': a 400
    mid-forward for a valid chunked upload."""
    head = "POST /hash HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n"
    body = b"5\r\nhello\r\n0\r\nContent-Type: text/x\r\nX-Checksum: abc\r\n\r\n"
    status, _, answer = await raw_http_request(gw.ports.proxy_port, head, body)
    assert status == 200 and json.loads(answer)["length"] == 5
    names = {k.decode().lower() for k, _ in rich_upstream.requests[-1]["header_list"]}
    assert "x-checksum" not in names


async def test_upgrade_other_than_websocket_is_not_forwarded(gw: RunningGateway, rich_upstream: RichUpstream) -> None:
    status, _, _ = await raw_http_request(
        gw.ports.proxy_port, "GET /echo HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n"
    )
    assert status == 200
    names = {k.decode().lower() for k, _ in rich_upstream.requests[-1]["header_list"]}
    assert "upgrade" not in names


async def test_x_forwarded_headers(
    gw: RunningGateway, rich_upstream: RichUpstream, http: aiohttp.ClientSession
) -> None:
    headers = {
        "X-Forwarded-For": "203.0.113.7",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "evil.example",
        "Host": "shop.example:8443",
    }
    async with http.get(f"{gw.url}/echo", headers=headers) as resp:
        assert resp.status == 200
    seen = rich_upstream.requests[-1]["header_list"]
    assert values(seen, "X-Forwarded-For") == ["203.0.113.7, 127.0.0.1"]
    assert values(seen, "X-Forwarded-Proto") == ["http"]  # the client's claim is overwritten
    assert values(seen, "X-Forwarded-Host") == ["shop.example:8443"]


SPOOFABLE = {
    "Forwarded": "for=6.6.6.6;proto=https;host=evil.example",
    "X-Forwarded-Port": "443",
    "X-Forwarded-Prefix": "/evil",
    "X-Forwarded-Server": "evil",
    "X-Real-IP": "6.6.6.6",
}


async def test_forwarding_headers_of_an_untrusted_client_are_removed(
    gw: RunningGateway, rich_upstream: RichUpstream, http: aiohttp.ClientSession
) -> None:
    """Spring, ProxyFix and Express build links and client addresses from these: a client could set them."""
    async with http.get(f"{gw.url}/echo", headers=SPOOFABLE) as resp:
        assert resp.status == 200
    names = {k.decode().lower() for k, _ in rich_upstream.requests[-1]["header_list"]}
    assert names.isdisjoint(name.lower() for name in SPOOFABLE), names


async def test_a_trusted_proxys_forwarding_headers_are_passed_on(
    rich_upstream: RichUpstream, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """Behind a load balancer that terminated TLS, the upstream must be told https (force-HTTPS redirects looped,
    secure cookies were refused) and the public host."""
    config = open_route_config(rich_upstream.url, listen="trusted_proxies: [127.0.0.1/32]")
    async for gw in start_gateway(config, tmp_path):
        headers = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "shop.example", "X-Forwarded-For": "203.0.113.9"}
        async with http.get(f"{gw.url}/echo", headers={**headers, **SPOOFABLE}) as resp:
            assert resp.status == 200
        seen = rich_upstream.requests[-1]["header_list"]
        assert values(seen, "X-Forwarded-Proto") == ["https"] and values(seen, "X-Forwarded-Host") == ["shop.example"]
        assert values(seen, "X-Forwarded-For") == ["203.0.113.9, 127.0.0.1"]
        for name, value in SPOOFABLE.items():
            assert values(seen, name) == [value], name


async def test_x_forwarded_for_joins_several_incoming_headers(gw: RunningGateway, rich_upstream: RichUpstream) -> None:
    status, _, _ = await raw_http_request(
        gw.ports.proxy_port,
        "GET /echo HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 198.51.100.1\r\nX-Forwarded-For: 198.51.100.2\r\n",
    )
    assert status == 200
    seen = rich_upstream.requests[-1]["header_list"]
    assert values(seen, "X-Forwarded-For") == ["198.51.100.1, 198.51.100.2, 127.0.0.1"]


async def test_x_forwarded_for_set_when_absent(
    gw: RunningGateway, rich_upstream: RichUpstream, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{gw.url}/echo") as resp:
        assert resp.status == 200
    seen = rich_upstream.requests[-1]["header_list"]
    assert values(seen, "X-Forwarded-For") == ["127.0.0.1"]
    assert values(seen, "X-Forwarded-Proto") == ["http"]
    assert values(seen, "X-Forwarded-Host") == [f"127.0.0.1:{gw.ports.proxy_port}"]


# --- identity and credential -------------------------------------------------------------------------------------


async def test_identity_headers_from_claims_and_spoofs_removed(
    gw: RunningGateway, rich_upstream: RichUpstream, rsa_key: Key
) -> None:
    # Raw request: several spellings of the same header name, as a client trying to impersonate would send them.
    token = rsa_key.sign(scp=["orders:read", "orders:write"], scope=None, admin=None, aud=[AUDIENCE, "other"])
    head = (
        "GET /api/who HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {token}\r\n"
        "x-auth-subject: mallory\r\nX-AUTH-SUBJECT: eve\r\nX-Auth-Scopes: root\r\nX-Auth-Admin: true\r\n"
    )
    status, _, _ = await raw_http_request(gw.ports.proxy_port, head)
    assert status == 200
    seen = rich_upstream.requests[-1]["header_list"]
    assert values(seen, "X-Auth-Subject") == ["alice"]
    assert values(seen, "X-Auth-Scopes") == ["orders:read orders:write"]  # a list claim, joined with spaces
    assert values(seen, "X-Auth-Aud") == [f"{AUDIENCE} other"]
    assert values(seen, "X-Auth-Admin") == []  # no such claim: the client's value is still removed
    assert rich_upstream.requests[-1]["raw_path"] == "/who"  # strip_prefix /api


async def test_underscore_spellings_of_headers_the_gateway_sets_are_removed(
    gw: RunningGateway, rich_upstream: RichUpstream, rsa_key: Key
) -> None:
    """An upstream that maps header names CGI-style (X_Auth_Subject and X-Auth-Subject both HTTP_X_AUTH_SUBJECT)
    could take a client's underscore spelling for the gateway's own header; other underscore names pass."""
    head = (
        f"GET /api/who HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {rsa_key.sign()}\r\n"
        "X_Auth_Subject: mallory\r\nx_forwarded_for: 10.9.9.9\r\nX_Custom: kept\r\n"
    )
    status, _, _ = await raw_http_request(gw.ports.proxy_port, head)
    assert status == 200
    seen = rich_upstream.requests[-1]["header_list"]
    assert values(seen, "X_Auth_Subject") == [] and values(seen, "x_forwarded_for") == []
    assert values(seen, "X-Auth-Subject") == ["alice"]
    assert values(seen, "X_Custom") == ["kept"]


def test_a_configured_underscore_name_is_not_imitated_with_dashes() -> None:
    """The other way round: identity header X_User configured, a client's X-User removed (both HTTP_X_USER)."""
    settings = configfile.loads(
        "issuers: [{name: corp, issuer: https://idp.test/, jwks_uri: https://idp.test/jwks, audiences: [api]}]\n"
        "routes: [{name: r, match: {path_prefix: /}, upstream: {url: 'http://127.0.0.1:9'},\n"
        "  auth: {mode: jwt, issuers: [corp]}, forward: {identity_headers: {X_User: sub}}}]\n",
        env={},
    )
    route = proxy.Upstream.compile(settings.routes[0])

    class Client:
        headers = CIMultiDict([("Host", "gw"), ("X-User", "admin"), ("X-Other", "kept")])
        host, remote, scheme = "gw", "127.0.0.1", "http"

    identity = Identity("alice", frozenset(), {"sub": "alice"}, "corp", "jwt")
    forwarded = route.headers(cast(RequestView, Client()), identity)
    assert [(n, v) for n, v in forwarded if n.lower() in ("x-user", "x_user", "x-other")] == [
        ("X-Other", "kept"),
        ("X_User", "alice"),
    ]


async def test_identity_header_non_ascii_claim_forwarded_as_utf8(
    gw: RunningGateway, rich_upstream: RichUpstream, rsa_key: Key, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{gw.url}/api/who", headers=bearer(rsa_key.sign(sub="josé\tø"))) as resp:
        assert resp.status == 200
    seen = rich_upstream.requests[-1]["header_list"]
    assert [v for k, v in seen if k.lower() == b"x-auth-subject"] == ["josé\tø".encode()]


async def test_identity_header_scalar_claims(
    gw: RunningGateway, rich_upstream: RichUpstream, rsa_key: Key, http: aiohttp.ClientSession
) -> None:
    token = rsa_key.sign(sub="svc-42", admin=True, scp="a b")
    async with http.get(f"{gw.url}/api/who", headers=bearer(token)) as resp:
        assert resp.status == 200
    seen = rich_upstream.requests[-1]["header_list"]
    assert values(seen, "X-Auth-Subject") == ["svc-42"]
    assert values(seen, "X-Auth-Admin") == ["true"]
    assert values(seen, "X-Auth-Scopes") == ["a b"]


@pytest.mark.parametrize(
    "sub", ["alice\r\nX-Injected: 1", "alice\nX-Injected: 1", "al\x00ice", "al\x1bice", "al\x7fice"]
)
async def test_identity_header_claim_with_control_characters_is_not_forwarded(
    gw: RunningGateway, rich_upstream: RichUpstream, rsa_key: Key, http: aiohttp.ClientSession, sub: str
) -> None:
    token = rsa_key.sign(sub=sub)
    async with http.get(f"{gw.url}/api/who", headers={**bearer(token), "X-Auth-Subject": "mallory"}) as resp:
        assert resp.status == 200
    seen = rich_upstream.requests[-1]["header_list"]
    assert values(seen, "X-Auth-Subject") == []
    assert values(seen, "X-Injected") == []


async def test_invalid_token_never_reaches_upstream(
    gw: RunningGateway, rich_upstream: RichUpstream, ec_key: Key, http: aiohttp.ClientSession
) -> None:
    token = ec_key.sign(aud="api://someone-else")
    async with http.get(f"{gw.url}/api/x", headers=bearer(token)) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"] == "invalid_token"
        assert token not in await resp.text()
    async with http.get(f"{gw.url}/api/x") as resp:
        assert resp.status == 401
    assert rich_upstream.requests == []


async def test_credential_removed_by_default_and_kept_when_asked(
    gw: RunningGateway, rich_upstream: RichUpstream, rsa_key: Key, http: aiohttp.ClientSession
) -> None:
    token = rsa_key.sign()
    async with http.get(f"{gw.url}/api/x", headers=bearer(token)) as resp:
        assert resp.status == 200
    assert values(rich_upstream.requests[-1]["header_list"], "Authorization") == []
    async with http.get(f"{gw.url}/keep/x", headers=bearer(token)) as resp:
        assert resp.status == 200
    assert values(rich_upstream.requests[-1]["header_list"], "Authorization") == [f"Bearer {token}"]


async def test_credential_in_named_header_removed(
    gw: RunningGateway, rich_upstream: RichUpstream, rsa_key: Key, http: aiohttp.ClientSession
) -> None:
    token = rsa_key.sign()
    async with http.get(f"{gw.url}/hdr/x", headers={"X-Api-Token": token, "Authorization": "Basic eDp5"}) as resp:
        assert resp.status == 200
    seen = rich_upstream.requests[-1]["header_list"]
    assert values(seen, "X-Api-Token") == []
    assert values(seen, "Authorization") == ["Basic eDp5"]  # not this route's credential


async def test_credential_cookie_removed_other_cookies_kept(
    gw: RunningGateway, rich_upstream: RichUpstream, rsa_key: Key
) -> None:
    token = rsa_key.sign()
    head = f"GET /ck/x HTTP/1.1\r\nHost: x\r\nCookie: theme=dark; session={token}; lang=en\r\n"
    status, _, _ = await raw_http_request(gw.ports.proxy_port, head)
    assert status == 200
    assert values(rich_upstream.requests[-1]["header_list"], "Cookie") == ["theme=dark; lang=en"]


@pytest.mark.parametrize("name", ["access_token", "access%5Ftoken"])
async def test_credential_query_parameter_removed_rest_of_query_verbatim(
    gw: RunningGateway, rich_upstream: RichUpstream, rsa_key: Key, name: str
) -> None:
    token = rsa_key.sign()
    query = f"a=%2F%20b&{name}={token}&c=d+e&empty=&flag&utf=%C3%A9"
    status, _, _ = await raw_http_request(gw.ports.proxy_port, f"GET /qt/x?{query} HTTP/1.1\r\nHost: x\r\n")
    assert status == 200
    assert rich_upstream.requests[-1]["raw_path"] == "/qt/x?a=%2F%20b&c=d+e&empty=&flag&utf=%C3%A9"


# --- paths, query, host ------------------------------------------------------------------------------------------


async def test_strip_prefix_and_base_path(
    gw: RunningGateway, rich_upstream: RichUpstream, http: aiohttp.ClientSession
) -> None:
    for sent, expected in [
        ("/svc/items/1", "/base/items/1"),
        ("/svc", "/base/"),
        ("/svc/", "/base/"),
        ("/based/x", "/v2/based/x"),
    ]:
        async with http.get(f"{gw.url}{sent}") as resp:
            assert resp.status == 200, sent
        assert rich_upstream.requests[-1]["raw_path"] == expected, sent


@pytest.mark.parametrize("sent", ["/%73vc/items/1", "/svc%2Fitems", "/svc;v=1/items", "/%73vc"])
async def test_a_prefix_to_strip_spelt_otherwise_is_refused_not_forwarded_unstripped(
    gw: RunningGateway, rich_upstream: RichUpstream, sent: str
) -> None:
    """The route matched it as under /svc (matching decodes and drops ;parameters), but its raw path does not start
    with /svc: forwarded unstripped, /%73vc/items/1 reached the upstream as /base/%73vc/items/1, which it reads as
    /base/svc/items/1, the very prefix meant to be removed."""
    seen = len(rich_upstream.requests)
    status, _, body = await raw_http_request(gw.ports.proxy_port, f"GET {sent} HTTP/1.1\r\nHost: x\r\n")
    assert status == 400 and b"prefix to strip" in body, body
    assert len(rich_upstream.requests) == seen


async def test_query_string_passes_through_unchanged(gw: RunningGateway, rich_upstream: RichUpstream) -> None:
    target = "/svc/search?q=%2Fetc%2Fpasswd&x=a+b&y=%20&z=%C3%A9&a=1&a=2&empty=&bare&sym=%26%3D%3F"
    status, _, _ = await raw_http_request(gw.ports.proxy_port, f"GET {target} HTTP/1.1\r\nHost: x\r\n")
    assert status == 200
    assert rich_upstream.requests[-1]["raw_path"] == "/base/search?" + target.split("?", 1)[1]


async def test_encoded_path_passes_through_raw(
    gw: RunningGateway, rich_upstream: RichUpstream, http: aiohttp.ClientSession
) -> None:
    async with http.get(URL(f"{gw.url}/files/a%2Fb/%C3%A9%20x", encoded=True)) as resp:
        assert resp.status == 200
    assert rich_upstream.requests[-1]["raw_path"] == "/files/a%2Fb/%C3%A9%20x"


async def test_preserve_host(gw: RunningGateway, rich_upstream: RichUpstream, http: aiohttp.ClientSession) -> None:
    upstream_host = URL(rich_upstream.url).raw_authority
    async with http.get(f"{gw.url}/kept-host/x", headers={"Host": "public.example:8443"}) as resp:
        assert resp.status == 200
    assert values(rich_upstream.requests[-1]["header_list"], "Host") == ["public.example:8443"]
    async with http.get(f"{gw.url}/echo", headers={"Host": "public.example:8443"}) as resp:
        assert resp.status == 200
    assert values(rich_upstream.requests[-1]["header_list"], "Host") == [upstream_host]


async def test_each_header_the_gateway_sets_reaches_the_upstream_once(
    gw: RunningGateway, rich_upstream: RichUpstream
) -> None:
    """Forwarded headers are a list, not a dict that would replace: a client-sent copy of anything the gateway sets
    (in any spelling) must be gone, and the gateway's own appear exactly once, with a chunked body intact."""
    status, _, _ = await raw_http_request(
        gw.ports.proxy_port,
        "POST /kept-host/echo HTTP/1.1\r\nHost: public.example\r\nx-forwarded-for: 10.0.0.1\r\n"
        "X-FORWARDED-PROTO: ftp\r\nx-forwarded-host: evil.example\r\nTransfer-Encoding: chunked\r\n",
        b"5\r\nhello\r\n0\r\n\r\n",
    )
    assert status == 200
    seen = rich_upstream.requests[-1]
    header_list = seen["header_list"]
    assert values(header_list, "Host") == ["public.example"]
    assert values(header_list, "X-Forwarded-For") == ["10.0.0.1, 127.0.0.1"]
    assert values(header_list, "X-Forwarded-Proto") == ["http"]
    assert values(header_list, "X-Forwarded-Host") == ["public.example"]
    assert values(header_list, "Transfer-Encoding") == ["chunked"]
    assert values(header_list, "Content-Length") == []
    assert seen["body"] == b"hello"


async def test_preserve_host_without_a_client_host_sends_the_upstreams_own(
    gw: RunningGateway, rich_upstream: RichUpstream
) -> None:
    """HTTP/1.0 allows a request without Host: a preserve_host route then names the upstream rather than sending an
    HTTP/1.1 request with no Host at all (which a strict upstream refuses), and sets no empty X-Forwarded-Host."""
    status, _, _ = await raw_http_request(gw.ports.proxy_port, "GET /kept-host/x HTTP/1.0\r\n")
    assert status == 200
    header_list = rich_upstream.requests[-1]["header_list"]
    assert values(header_list, "Host") == [URL(rich_upstream.url).raw_authority]
    assert values(header_list, "X-Forwarded-Host") == []


@pytest.mark.parametrize("method", ["GET", "HEAD", "DELETE"])
async def test_repeated_header_in_several_spellings_reaches_the_upstream_whole(
    gw: RunningGateway, rich_upstream: RichUpstream, method: str
) -> None:
    """Nothing a client sends is lost on the way: a header repeated under two spellings keeps both values, in order,
    on the lean client (GET, DELETE) and on aiohttp's (HEAD), whose header merge kept only the last spelling."""
    status, _, _ = await raw_http_request(
        gw.ports.proxy_port, f"{method} /echo HTTP/1.1\r\nHost: x\r\nx-multi: a\r\nX-Multi: b\r\nX-MULTI: c\r\n"
    )
    assert status == 200
    assert rich_upstream.requests[-1]["method"] == method
    assert values(rich_upstream.requests[-1]["header_list"], "X-Multi") == ["a", "b", "c"]


# --- bodies, statuses, response headers --------------------------------------------------------------------------


async def test_post_body_byte_exact(
    gw: RunningGateway, rich_upstream: RichUpstream, http: aiohttp.ClientSession
) -> None:
    body = os.urandom(300_000)
    async with http.post(f"{gw.url}/hash", data=body, headers={"Content-Type": "application/x-thing"}) as resp:
        assert resp.status == 200
        answer = await resp.json()
    assert answer == {"sha256": hashlib.sha256(body).hexdigest(), "length": len(body)}
    seen = rich_upstream.requests[-1]["header_list"]
    assert values(seen, "Content-Length") == [str(len(body))]
    assert values(seen, "Content-Type") == ["application/x-thing"]

    small = b"\x00\x01binary\r\n\r\nnot a header\xff"
    async with http.put(f"{gw.url}/echo", data=small) as resp:
        assert resp.status == 200
    assert rich_upstream.requests[-1]["body"] == small
    assert rich_upstream.requests[-1]["method"] == "PUT"


async def test_no_content_type_invented(gw: RunningGateway, rich_upstream: RichUpstream) -> None:
    status, _, _ = await raw_http_request(
        gw.ports.proxy_port, "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n", b"abc"
    )
    assert status == 200
    seen = rich_upstream.requests[-1]
    assert seen["body"] == b"abc"
    names = {k.decode().lower() for k, _ in seen["header_list"]}
    assert not names & {"content-type", "user-agent", "accept", "accept-encoding"}


@pytest.mark.parametrize("code", [200, 201, 204, 304, 404, 500, 503])
async def test_upstream_status_passes_through(gw: RunningGateway, http: aiohttp.ClientSession, code: int) -> None:
    async with http.get(f"{gw.url}/status/{code}", headers={"If-None-Match": '"v1"'}) as resp:
        assert resp.status == code
        assert resp.headers["X-Upstream"] == "yes"
        assert resp.headers["ETag"] == '"v1"'
        body = await resp.read()
    assert body == (b"" if code in (204, 304) else f"status {code}".encode())


async def test_response_hop_by_hop_headers_removed(gw: RunningGateway, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{gw.url}/hop") as resp:
        assert resp.status == 200
        assert await resp.text() == "hop"
        assert resp.headers["X-Upstream"] == "yes"
        for gone in ("X-Internal", "Keep-Alive", "Proxy-Authenticate", "Trailer", "Upgrade"):
            assert gone not in resp.headers, gone


@pytest.mark.parametrize("size", [0, 1000, 65536, 65537, 1_000_000])
async def test_response_content_length_preserved(gw: RunningGateway, http: aiohttp.ClientSession, size: int) -> None:
    async with http.get(f"{gw.url}/bytes/{size}") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(size)
        assert "Transfer-Encoding" not in resp.headers
        assert await resp.read() == pattern_bytes(size)


async def test_compressed_response_passes_through_untouched(gw: RunningGateway, http: aiohttp.ClientSession) -> None:
    expected = gzip.compress(pattern_bytes(200_000), mtime=0)
    async with http.get(f"{gw.url}/bytes/200000?gzip=1", headers={"Accept-Encoding": "gzip"}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Encoding"] == "gzip"
        assert resp.headers["Content-Length"] == str(len(expected))
        assert await resp.read() == expected  # the session does not decompress: these are the wire bytes


async def test_chunked_response_stays_chunked(gw: RunningGateway, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{gw.url}/bytes/300000?chunked=1") as resp:
        assert resp.status == 200
        assert resp.headers.get("Transfer-Encoding") == "chunked"
        assert await resp.read() == pattern_bytes(300000)


@pytest.mark.parametrize("size", [10, 1_000_000])
async def test_head_request(gw: RunningGateway, rich_upstream: RichUpstream, size: int) -> None:
    status, headers, body = await raw_http_request(gw.ports.proxy_port, f"HEAD /bytes/{size} HTTP/1.1\r\nHost: x\r\n")
    assert status == 200
    assert headers["content-length"] == str(size)
    assert body == b""  # read until the server closed: not one body byte was sent
    assert headers["x-upstream"] == "yes"
    assert rich_upstream.requests[-1]["method"] == "HEAD"


async def test_a_204_is_relayed_without_content_length_and_its_connection_reused(tmp_path: Path) -> None:
    """RFC 9110 §8.6: a 204 carries no Content-Length, even when the upstream sent one; and a bodyless answer
    leaves its upstream connection ready for the next request (each 204 used to close it)."""
    connections = 0
    writers: list[asyncio.StreamWriter] = []

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        writers.append(writer)
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nX-Upstream: yes\r\n\r\n")
                await writer.drain()
        writer.close()

    try:
        async for gw in gateway_to_raw_upstream(upstream, tmp_path):
            for _ in range(3):
                reader, writer = await asyncio.open_connection("127.0.0.1", gw.ports.proxy_port)
                writer.write(b"DELETE /items/1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                answer = await asyncio.wait_for(reader.read(), 10)
                writer.close()
                await writer.wait_closed()
                head = answer.decode("latin-1").lower()
                assert head.startswith("http/1.1 204") and "x-upstream: yes" in head
                assert "content-length" not in head and "transfer-encoding" not in head
        assert connections == 1
    finally:
        for upstream_writer in writers:  # the pooled connection's handler, still reading
            upstream_writer.close()
            with contextlib.suppress(ConnectionError):
                await upstream_writer.wait_closed()


# --- upstream failures -------------------------------------------------------------------------------------------


async def test_upstream_refused_is_502(gw: RunningGateway, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{gw.url}/refused/x") as resp:
        assert resp.status == 502
        assert resp.content_type == "application/json"
        assert (await resp.json())["error"] == "bad_gateway"
    assert gw.metric("gateway_http_requests_total", route="refused", method="GET", code="502") == 1


async def test_upstream_slower_than_timeout_is_504(
    gw: RunningGateway, rich_upstream: RichUpstream, http: aiohttp.ClientSession
) -> None:
    started = time.monotonic()
    async with http.get(f"{gw.url}/slow?s=5") as resp:
        assert resp.status == 504
        assert (await resp.json())["error"] == "gateway_timeout"
    assert time.monotonic() - started < 3
    # The gateway gave up on the upstream request too: the upstream handler is cancelled.
    async with asyncio.timeout(5):
        await rich_upstream.slow_cancelled.wait()


async def test_a_client_body_that_stops_arriving_is_408_not_504(gw: RunningGateway) -> None:
    """The route's idle_timeout ran out while the gateway waited on the client's body: the client is told it was
    slow (408), not that the upstream was (504)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.ports.proxy_port)
    try:
        writer.write(b"POST /slow/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhello")  # 5 of 10
        async with asyncio.timeout(10):
            status, _, body = await read_answer(reader)
        assert status == 408
        assert json.loads(body)["error"] == "request_timeout"
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_an_upstream_that_stops_taking_the_body_is_504_not_408(tmp_path: Path) -> None:
    """The client sent its whole body at once; the upstream takes some and then no more for longer than the route's
    idle_timeout: the upstream was the stalled side (504), even though the gateway stopped reading the client."""
    handlers: list[asyncio.StreamWriter] = []
    release = asyncio.Event()

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.append(writer)
        with contextlib.suppress(ConnectionError):
            await reader.read(16 * 1024)
            await release.wait()  # takes nothing more

    try:
        async for gw in gateway_to_raw_upstream(upstream, tmp_path, "timeout: 30s, idle_timeout: 500ms"):
            size = 16 * 1024 * 1024
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.ports.proxy_port)
            writer.write(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
            writer.write(b"x" * size)  # all of it, at once
            async with asyncio.timeout(15):
                status, _, body = await read_answer(reader)
            assert (status, json.loads(body)["error"]) == (504, "gateway_timeout")
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
    finally:
        release.set()
        for handler in handlers:
            handler.close()


async def test_a_slow_steady_upload_outlives_the_routes_timeout(tmp_path: Path, rich_upstream: RichUpstream) -> None:
    """The route's timeout is the wait for the answer once the request is sent; a body that keeps arriving is
    timed only by idle_timeout between its pieces. An upload longer than the timeout used to be cut with 408."""
    config = open_route_config(rich_upstream.url).replace('"}', '", timeout: 400ms, idle_timeout: 2s}', 1)
    async for gw in start_gateway(config, tmp_path):
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.ports.proxy_port)
        pieces = [bytes([65 + i]) * 1000 for i in range(8)]
        writer.write(b"POST /hash HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % sum(map(len, pieces)))
        for piece in pieces:  # 8 x 150 ms: three times the route's timeout, never idle for long
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.15)
        async with asyncio.timeout(10):
            status, _, body = await read_answer(reader)
        whole = b"".join(pieces)
        assert status == 200 and json.loads(body) == {"sha256": hashlib.sha256(whole).hexdigest(), "length": len(whole)}
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_an_answer_body_that_stalls_is_504_or_cut(tmp_path: Path) -> None:
    """After its head the upstream sends part of the body and then nothing: past idle_timeout a small answer (not yet
    begun to the client) is 504, a large one (already streaming) is cut short. It used to hang for as long as the
    upstream liked."""
    release = asyncio.Event()

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\nabc" % (10 if small.is_set() else 10_000_000))
        await writer.drain()
        await release.wait()
        writer.close()

    small = asyncio.Event()
    try:
        async for gw in gateway_to_raw_upstream(upstream, tmp_path, "idle_timeout: 300ms"):
            small.set()
            status, _, body = await raw_http_request(gw.ports.proxy_port, "GET /a HTTP/1.1\r\nHost: x\r\n")
            assert (status, json.loads(body)["error"]) == (504, "gateway_timeout")
            small.clear()
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.ports.proxy_port)
            writer.write(b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
            async with asyncio.timeout(10):
                received = await reader.read()  # to EOF: the gateway closes a cut answer
            head, _, rest = received.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: 10000000" in head and rest == b"abc"
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            assert gw.metric("gateway_http_requests_total", route="open", method="GET", code="504") == 2
    finally:
        release.set()


async def test_an_early_2xx_answer_does_not_stop_the_upload(tmp_path: Path) -> None:
    """An upstream may answer 200 before it has read the whole body (it streams while it consumes): only an answer
    of 400 or more ends the upload (RFC 9112 §9.3). Any early answer used to, so the upstream got half a body."""
    answered = asyncio.Event()

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await writer.drain()
        answered.set()
        body = await reader.readexactly(length)
        report = b"got %d bytes, %s" % (len(body), hashlib.sha256(body).hexdigest().encode())
        writer.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(report), report))
        await writer.drain()
        writer.close()

    async for gw in gateway_to_raw_upstream(upstream, tmp_path):
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.ports.proxy_port)
        writer.write(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n" + b"a" * 1000)
        async with asyncio.timeout(10):
            await answered.wait()  # the upstream has answered 200 with half the body in
            writer.write(b"b" * 1000)
            status, _, body = await read_answer(reader)
        expected = hashlib.sha256(b"a" * 1000 + b"b" * 1000).hexdigest().encode()
        assert (status, body) == (200, b"got 2000 bytes, " + expected)
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_upstream_connect_timeout_is_502(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    # connect_timeout 200ms against a port that never answers the SYN; the route's total timeout is 20 s.
    with unresponsive_port() as port:
        route = f"""
routes:
  - name: blackhole
    match: {{path_prefix: /}}
    upstream: {{url: "http://127.0.0.1:{port}", connect_timeout: 200ms, timeout: 20s}}
    auth: {{mode: none}}
"""
        async for gw in start_gateway(route, tmp_path):
            started = time.monotonic()
            async with http.get(f"{gw.url}/x") as resp:
                assert resp.status == 502
                assert (await resp.json())["error"] == "bad_gateway"
            assert time.monotonic() - started < 5
            assert gw.metric("gateway_http_requests_total", route="blackhole", method="GET", code="502") == 1


# --- config ------------------------------------------------------------------------------------------------------


def test_identity_headers_on_mode_none_route_rejected(tmp_path: Path) -> None:
    text = """
routes:
  - name: open
    match: {path_prefix: /}
    upstream: {url: "http://127.0.0.1:1"}
    auth: {mode: none}
    forward: {identity_headers: {X-Auth-Subject: sub}}
"""
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(configfile.ConfigError) as info:
        configfile.load(path)
    assert info.value.problems == ["routes[0].forward.identity_headers: mode none has no identity to forward"]
    assert str(path) in str(info.value)


# --- Expect: 100-continue, and framing the gateway must not pass on ----------------------------------------------


async def expect_continue(port: int, path: str, headers: str, body: bytes) -> tuple[bytes, bytes]:
    """Send headers with `Expect: 100-continue`, read the gateway's first answer line; send the body only after a
    100. Returns (first status line, rest of the answer)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\nExpect: 100-continue\r\n{headers}"
            "Connection: close\r\n\r\n".encode()
        )
        await writer.drain()
        async with asyncio.timeout(10):
            first = await reader.readline()
            if not first.startswith(b"HTTP/1.1 100"):
                # A final answer straight away: the body is not sent (and the server, still owed it, may keep the
                # connection open for a while, so read the header block only).
                return first, await reader.readuntil(b"\r\n\r\n")
            await reader.readline()  # the blank line ending the interim answer
            writer.write(body)
            await writer.drain()
            rest = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    return first, rest


async def test_expect_100_continue_answered_after_the_token_is_judged(
    gw: RunningGateway, rich_upstream: RichUpstream, rsa_key: Key
) -> None:
    body = os.urandom(200_000)
    first, rest = await expect_continue(
        gw.ports.proxy_port, "/api/hash", f"Authorization: Bearer {rsa_key.sign()}\r\n", body
    )
    assert first.startswith(b"HTTP/1.1 100")
    assert rest.startswith(b"HTTP/1.1 200")
    assert hashlib.sha256(body).hexdigest().encode() in rest
    assert values(rich_upstream.requests[-1]["header_list"], "Expect") == []


async def test_expect_100_continue_refused_upload_never_sent(gw: RunningGateway, rich_upstream: RichUpstream) -> None:
    first, rest = await expect_continue(gw.ports.proxy_port, "/api/hash", "", os.urandom(1000))
    assert first.startswith(b"HTTP/1.1 401")  # straight to the final answer: the body was never asked for
    assert b"WWW-Authenticate: Bearer" in rest
    assert rich_upstream.requests == []


@pytest.mark.parametrize(
    "framing",
    [
        "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        "Content-Length: 5\r\nContent-Length: 6\r\n",
        "Transfer-Encoding: gzip, chunked\r\nTransfer-Encoding: identity\r\n",
    ],
)
async def test_ambiguous_request_framing_refused(gw: RunningGateway, rich_upstream: RichUpstream, framing: str) -> None:
    # Request smuggling: a proxy and its upstream must never disagree on where a request ends.
    status, headers, body = await raw_http_request(
        gw.ports.proxy_port, f"POST /echo HTTP/1.1\r\nHost: x\r\n{framing}", b"0\r\n\r\nGET /admin HTTP/1.1\r\n\r\n"
    )
    assert status == 400
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body)["error"] == "invalid_request"
    assert rich_upstream.requests == []
