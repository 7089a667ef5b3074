"""The proxy listener's HTTP/1.1 (gateway/listener.py) on the wire: keep-alive and pipelining, HTTP/1.0,
request-target forms, Upgrade and CONNECT, refused uploads, broken bodies and idle connections. Raw sockets
throughout, so the bytes are exactly what a client sent."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from gateway.listener import Listener, Request
from tests.support import (
    AUDIENCE,
    ISSUER,
    STREAM_CHUNK,
    IdP,
    RichUpstream,
    RunningGateway,
    open_route_config,
    raw_http_request,
    read_answer,
    start_gateway,
)


@pytest.fixture
async def gw(idp: IdP, rich_upstream: RichUpstream, tmp_path: Path) -> AsyncIterator[RunningGateway]:
    config = f"""
listen: {{host: 127.0.0.1, port: 0, idle_timeout: 1s}}
admin: {{host: 127.0.0.1, port: 0}}
issuers:
  - name: corp
    issuer: {ISSUER}
    jwks_uri: {idp.url}/jwks
    audiences: [{AUDIENCE}]
    algorithms: [RS256]
routes:
  - name: secured
    match: {{path_prefix: /secured}}
    upstream: {{url: "{rich_upstream.url}"}}
    auth: {{mode: jwt, issuers: [corp]}}
  - name: open
    match: {{path_prefix: /}}
    upstream: {{url: "{rich_upstream.url}"}}
    auth: {{mode: none}}
"""
    async for running in start_gateway(config, tmp_path):
        yield running


@contextlib.asynccontextmanager
async def connection(gw: RunningGateway) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.ports.proxy_port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def closed_by_server(reader: asyncio.StreamReader) -> bytes:
    """Everything the server still sends, up to its closing the connection."""
    async with asyncio.timeout(10):
        return await reader.read()


async def test_keep_alive_serves_requests_one_after_another(gw: RunningGateway, rich_upstream: RichUpstream) -> None:
    async with connection(gw) as (reader, writer):
        for i in range(3):
            writer.write(f"GET /n/{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            async with asyncio.timeout(10):
                status, headers, body = await read_answer(reader)
            assert status == 200 and "connection" not in headers
            assert json.loads(body)["path"] == f"/n/{i}"
        assert [r["path"] for r in rich_upstream.requests] == ["/n/0", "/n/1", "/n/2"]


async def test_pipelined_requests_are_answered_in_order(gw: RunningGateway, rich_upstream: RichUpstream) -> None:
    async with connection(gw) as (reader, writer):
        # The first is slow upstream: the second must still be answered after it, not before.
        writer.write(b"GET /slow?s=0.2 HTTP/1.1\r\nHost: x\r\n\r\nGET /second HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(10):
            first = await read_answer(reader)
            second = await read_answer(reader)
        assert first[0] == 200 and first[2] == b"late"
        assert second[0] == 200 and json.loads(second[2])["path"] == "/second"


@pytest.mark.parametrize(
    ("garbage", "description"),
    [
        (b"GET no-slash HTTP/1.1\r\nHost: x\r\n\r\n", "malformed HTTP request"),
        (b"GET /c HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", "request header fields too large"),
    ],
    ids=["unparseable", "oversized header"],
)
async def test_requests_pipelined_before_a_malformed_one_are_answered_first(
    garbage: bytes, description: str, gw: RunningGateway, rich_upstream: RichUpstream
) -> None:
    """RFC 9112 §9.3.2: answers in the order the requests came, the refusal last, and only it says close."""
    async with connection(gw) as (reader, writer):
        writer.write(b"GET /slow?s=0.2 HTTP/1.1\r\nHost: x\r\n\r\nGET /second HTTP/1.1\r\nHost: x\r\n\r\n" + garbage)
        async with asyncio.timeout(10):
            first = await read_answer(reader)
            second = await read_answer(reader)
            refusal = await read_answer(reader)
        assert first[0] == 200 and first[2] == b"late" and "connection" not in first[1]
        assert second[0] == 200 and json.loads(second[2])["path"] == "/second" and "connection" not in second[1]
        assert refusal[0] in (400, 431) and refusal[1]["connection"] == "close"
        assert json.loads(refusal[2])["error_description"] == description
        assert await closed_by_server(reader) == b""
    assert [r["path"] for r in rich_upstream.requests] == ["/slow?s=0.2", "/second"]


async def test_a_pipelined_request_whose_body_breaks_is_refused_once(
    gw: RunningGateway, rich_upstream: RichUpstream
) -> None:
    """Its own answer is the refusal: no second 400 follows it."""
    async with connection(gw) as (reader, writer):
        writer.write(
            b"GET /slow?s=0.2 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nZZ\r\n"
        )
        async with asyncio.timeout(10):
            first = await read_answer(reader)
            second = await read_answer(reader)
        assert first[0] == 200 and first[2] == b"late"
        assert second[0] == 400 and second[1]["connection"] == "close"
        assert await closed_by_server(reader) == b""


async def test_a_draining_gateway_answers_the_requests_it_already_read(
    rich_upstream: RichUpstream, tmp_path: Path
) -> None:
    """A pipelined request read before the drain began is answered too; one sent after it is not (a client
    pipelining on could keep a draining gateway serving it until drain_timeout). Only the last answer says close."""
    async for running in start_gateway(open_route_config(rich_upstream.url), tmp_path):
        async with connection(running) as (reader, writer), aiohttp.ClientSession() as http:
            writer.write(b"GET /slow?s=0.3 HTTP/1.1\r\nHost: x\r\n\r\nGET /second HTTP/1.1\r\nHost: x\r\n\r\n")
            async with asyncio.timeout(10):
                await rich_upstream.slow_started.wait()
            stopping = asyncio.create_task(running.server.stop())
            async with http.get(f"http://127.0.0.1:{running.ports.admin_port}/readyz") as ready:
                assert "draining" in (await ready.json())["problems"]  # the drain has begun
            writer.write(b"GET /third HTTP/1.1\r\nHost: x\r\n\r\n")
            async with asyncio.timeout(10):
                first = await read_answer(reader)
                second = await read_answer(reader)
                assert await closed_by_server(reader) == b""
                await stopping
        assert first[0] == 200 and "connection" not in first[1]
        assert second[0] == 200 and second[1]["connection"] == "close"
        assert [r["path"] for r in rich_upstream.requests] == ["/slow?s=0.3", "/second"]


async def test_http_1_0_closes_unless_keep_alive_is_asked(gw: RunningGateway) -> None:
    async with connection(gw) as (reader, writer):
        writer.write(b"GET /a HTTP/1.0\r\n\r\n")
        status, headers, _ = await read_answer(reader)
        assert status == 200 and headers["connection"] == "close"
        assert await closed_by_server(reader) == b""

    async with connection(gw) as (reader, writer):
        for path in ("/b", "/c"):
            writer.write(f"GET {path} HTTP/1.0\r\nConnection: keep-alive\r\n\r\n".encode())
            async with asyncio.timeout(10):
                status, headers, body = await read_answer(reader)
            assert status == 200 and headers["connection"] == "keep-alive"
            assert json.loads(body)["path"] == path


async def test_http_1_0_streamed_answer_ends_with_the_connection(gw: RunningGateway) -> None:
    """No chunked framing for a 1.0 client: an answer of unknown length is delimited by closing."""
    async with connection(gw) as (reader, writer):
        writer.write(b"GET /bytes/200000?chunked=1 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        async with asyncio.timeout(10):
            status, headers, body = await read_answer(reader)
        assert status == 200 and "transfer-encoding" not in headers and headers["connection"] == "close"
        assert len(body) == 200000


async def test_absolute_form_target_is_routed_by_its_path(gw: RunningGateway, rich_upstream: RichUpstream) -> None:
    async with connection(gw) as (reader, writer):
        writer.write(b"GET http://gw.example/abs/path?a=1&b=%20 HTTP/1.1\r\nHost: gw.example\r\n\r\n")
        async with asyncio.timeout(10):
            status, _, body = await read_answer(reader)
        assert status == 200
        assert rich_upstream.requests[-1]["raw_path"] == "/abs/path?a=1&b=%20"


def private_and_open_hosts(idp: IdP, upstream: RichUpstream) -> str:
    """A JWT route for the host private.example, then an open route for every other host."""
    return f"""
issuers:
  - name: corp
    issuer: {ISSUER}
    jwks_uri: {idp.url}/jwks
    audiences: [{AUDIENCE}]
routes:
  - name: private
    match: {{host: private.example, path_prefix: /}}
    upstream: {{url: "{upstream.url}"}}
    auth: {{mode: jwt, issuers: [corp]}}
  - name: open
    match: {{path_prefix: /}}
    upstream: {{url: "{upstream.url}"}}
    auth: {{mode: none}}
"""


async def test_absolute_form_target_names_the_host_whatever_host_says(
    idp: IdP, rich_upstream: RichUpstream, tmp_path: Path
) -> None:
    """RFC 9112 §3.2.2: the authority of an absolute-form target is the request's host and Host is ignored, so a
    Host naming an open route cannot carry a request for a protected host past its route's judge."""
    config = private_and_open_hosts(idp, rich_upstream)
    async for running in start_gateway(config, tmp_path):
        async with connection(running) as (reader, writer):
            writer.write(b"GET http://private.example/x HTTP/1.1\r\nHost: public.example\r\n\r\n")
            async with asyncio.timeout(10):
                status, _, _ = await read_answer(reader)
            assert status == 401
            assert rich_upstream.requests == []
            writer.write(b"GET http://Public.example:8080/y HTTP/1.1\r\nHost: private.example\r\n\r\n")
            async with asyncio.timeout(10):
                status, _, _ = await read_answer(reader)
            assert status == 200
            assert rich_upstream.requests[-1]["headers"]["X-Forwarded-Host"] == "Public.example:8080"
        async with connection(running) as (reader, writer):  # HTTP/1.0 without Host: the target names it
            writer.write(b"GET http://private.example/z HTTP/1.0\r\n\r\n")
            async with asyncio.timeout(10):
                status, _, _ = await read_answer(reader)
            assert status == 401


async def test_an_absolute_form_websocket_handshake_is_routed_by_its_authority_too(
    idp: IdP, rich_upstream: RichUpstream, tmp_path: Path
) -> None:
    """aiohttp, which serves WebSocket handshakes, takes the host from an absolute-form target as the listener
    does."""
    config = private_and_open_hosts(idp, rich_upstream)
    handshake = (
        b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    async for running in start_gateway(config, tmp_path):
        async with connection(running) as (reader, writer):
            writer.write(b"GET http://private.example/ws HTTP/1.1\r\nHost: public.example\r\n" + handshake)
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 401 ")
        async with connection(running) as (reader, writer):
            writer.write(b"GET http://public.example/ws?q=1 HTTP/1.1\r\nHost: private.example\r\n" + handshake)
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101 ")


@pytest.mark.parametrize(
    ("request_line", "description"),
    [
        ("GET no-slash HTTP/1.1", "malformed HTTP request"),  # refused by llhttp itself
        ("GET http:///no-host HTTP/1.1", "malformed request target"),  # passed by llhttp, refused by us
        ("GET http://h:99999999/x HTTP/1.1", "malformed request target"),
        ("GET http://user@gw.example/x HTTP/1.1", "malformed request target"),  # userinfo (RFC 9110 §4.2.4)
        ("CONNECT gw.example:443 HTTP/1.1", "CONNECT is not supported"),
    ],
)
async def test_unusable_request_lines_get_400_and_the_connection_closes(
    request_line: str, description: str, gw: RunningGateway, rich_upstream: RichUpstream
) -> None:
    async with connection(gw) as (reader, writer):
        writer.write(f"{request_line}\r\nHost: gw.example\r\n\r\n".encode())
        async with asyncio.timeout(10):
            status, headers, body = await read_answer(reader)
        assert status == 400 and headers["connection"] == "close" and headers["content-type"] == "application/json"
        assert json.loads(body) == {"error": "invalid_request", "error_description": description}
        assert await closed_by_server(reader) == b""
        assert rich_upstream.requests == []


@pytest.mark.parametrize(
    ("head", "description"),
    [
        ("GET /a HTTP/1.1\r\n", "an HTTP/1.1 request needs a Host header"),
        ("GET /a HTTP/1.1\r\nHost: x\r\nHost: y\r\n", "Host appears more than once"),
        ("GET /a HTTP/1.1\r\nHost: x\r\nUser-Agent: a\r\nUser-Agent: b\r\n", "User-Agent appears more than once"),
        # llhttp would find this only after the head went upstream
        ("POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n", "Transfer-Encoding must end in chunked"),
        (
            "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n",
            "malformed HTTP request",  # refused by llhttp itself
        ),
        # Forwarded as X-Forwarded-Host: an upstream building links from it would take whatever follows
        ("GET /a HTTP/1.1\r\nHost: gw evil\r\n", "the Host header is not a host and port"),
        ("GET /a HTTP/1.1\r\nHost: gw/evil\r\n", "the Host header is not a host and port"),
        ("GET /a HTTP/1.0\r\nHost: gw:80@evil\r\n", "the Host header is not a host and port"),
    ],
)
async def test_heads_llhttp_passes_but_http_forbids_get_400(
    head: str, description: str, gw: RunningGateway, rich_upstream: RichUpstream
) -> None:
    async with connection(gw) as (reader, writer):
        writer.write(head.encode() + b"\r\n5\r\nhello\r\n0\r\n\r\n")
        async with asyncio.timeout(10):
            status, headers, body = await read_answer(reader)
        assert status == 400 and headers["connection"] == "close"
        assert json.loads(body) == {"error": "invalid_request", "error_description": description}
        assert await closed_by_server(reader) == b""
    assert rich_upstream.requests == []


@pytest.mark.parametrize("codings", ["gzip, chunked", "gzip\r\nTransfer-Encoding: chunked"])
async def test_a_transfer_coding_besides_chunked_gets_501(
    codings: str, gw: RunningGateway, rich_upstream: RichUpstream
) -> None:
    """The gateway re-frames request bodies: a gzip coding under chunked would reach the upstream undeclared."""
    async with connection(gw) as (reader, writer):
        writer.write(f"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: {codings}\r\n\r\n0\r\n\r\n".encode())
        async with asyncio.timeout(10):
            status, headers, _ = await read_answer(reader)
        assert status == 501 and headers["connection"] == "close"
    assert rich_upstream.requests == []


@pytest.mark.parametrize(
    "host",
    ["gw.example", "gw.example:8443", "127.0.0.1:80", "[::1]:8080", "xn--bcher-kva.de", "[fe80::1%25eth0]:80", "gw."],
)
async def test_ordinary_hosts_pass(host: str, gw: RunningGateway, rich_upstream: RichUpstream) -> None:
    status, _, _ = await raw_http_request(gw.ports.proxy_port, f"GET /a HTTP/1.1\r\nHost: {host}\r\n")
    assert status != 400
    assert rich_upstream.requests[-1]["headers"]["X-Forwarded-Host"] == host


@pytest.mark.parametrize(
    ("request_line", "status", "description"),
    [
        ("BREW /a HTTP/1.1", 501, "request method not supported"),  # RFC 9110 §9.1
        ("GET /a HTTP/9.9", 505, "HTTP version not supported: HTTP/1.1 or HTTP/1.0 only"),  # refused by llhttp
        ("GET /a HTTP/2.0", 505, "HTTP version not supported: HTTP/1.1 or HTTP/1.0 only"),  # passed by llhttp
        ("GET /a HTTP/0.9", 505, "HTTP version not supported: HTTP/1.1 or HTTP/1.0 only"),
    ],
)
async def test_unknown_methods_get_501_and_other_http_versions_505(
    request_line: str, status: int, description: str, gw: RunningGateway, rich_upstream: RichUpstream
) -> None:
    async with connection(gw) as (reader, writer):
        writer.write(f"{request_line}\r\nHost: gw.example\r\n\r\n".encode())
        async with asyncio.timeout(10):
            answer = await read_answer(reader)
        assert answer[0] == status and answer[1]["connection"] == "close"
        assert json.loads(answer[2]) == {"error": "invalid_request", "error_description": description}
        assert await closed_by_server(reader) == b""
    assert rich_upstream.requests == []
    # Counted, though no route was matched and no method can be named.
    assert gw.metric("gateway_http_requests_total", route="unmatched", method="other", code=str(status)) == 1


@pytest.mark.parametrize(
    ("head", "status", "description"),
    [
        (b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n", 414, "request target too long"),
        (b"GET /a HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n", 431, "request header fields too large"),
    ],
)
async def test_a_target_over_the_limit_gets_414_and_a_header_431(
    head: bytes, status: int, description: str, gw: RunningGateway, rich_upstream: RichUpstream
) -> None:
    """RFC 9110 §15.5.15 and RFC 6585 §5: over listen.max_header_bytes (16 KiB by default)."""
    async with connection(gw) as (reader, writer):
        writer.write(head + b"\r\n")
        async with asyncio.timeout(10):
            answer = await read_answer(reader)
        assert answer[0] == status and answer[1]["connection"] == "close"
        assert json.loads(answer[2]) == {"error": "invalid_request", "error_description": description}
    assert rich_upstream.requests == []


async def test_too_many_headers_get_431(gw: RunningGateway, rich_upstream: RichUpstream) -> None:
    async with connection(gw) as (reader, writer):
        writer.write(b"GET /a HTTP/1.1\r\nHost: x\r\n" + b"a: b\r\n" * 200 + b"\r\n")
        async with asyncio.timeout(10):
            status, _, body = await read_answer(reader)
        assert status == 431 and json.loads(body)["error_description"] == "request header fields too large"
    assert rich_upstream.requests == []


async def test_http_1_0_client_is_never_told_100_continue(gw: RunningGateway) -> None:
    async with connection(gw) as (reader, writer):
        writer.write(b"POST /e HTTP/1.0\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        await writer.drain()
        writer.write(b"hello")  # a 1.0 client sends its body without waiting
        async with asyncio.timeout(10):
            status, _, body = await read_answer(reader)
        assert status == 200 and json.loads(body)["body_length"] == 5  # the first answer is the final one


async def test_body_answered_unread_does_not_stall_the_connection(
    gw: RunningGateway, rich_upstream: RichUpstream
) -> None:
    """A whole body larger than the read buffer arrives, the answer (401) never reads it: the connection stays
    usable for the next request (reading was paused while the body waited, and must resume)."""
    body = b"x" * 600_000
    async with connection(gw) as (reader, writer):
        writer.write(b"POST /secured/x HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        async with asyncio.timeout(10):
            status, headers, _ = await read_answer(reader)
            assert status == 401
            if headers.get("connection") == "close":  # the body had not all arrived when the answer went out
                assert await closed_by_server(reader) == b""
                return
            writer.write(b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, answer = await read_answer(reader)
        assert status == 200 and json.loads(answer)["path"] == "/after"


async def test_upgrade_to_another_protocol_is_answered_in_http_1_1(
    gw: RunningGateway, rich_upstream: RichUpstream
) -> None:
    """Upgrade: h2c is optional to honour: the request is served as a plain one, without the Upgrade header, and
    the connection goes on in HTTP/1.1."""
    async with connection(gw) as (reader, writer):
        writer.write(b"GET /h2c HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\r\n")
        async with asyncio.timeout(10):
            status, _, _ = await read_answer(reader)
            writer.write(b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n")
            after, _, body = await read_answer(reader)
        assert status == 200 and after == 200 and json.loads(body)["path"] == "/after"
        seen = {name.lower() for name, _ in rich_upstream.requests[0]["header_list"]}
        assert "upgrade" not in seen and "http2-settings" not in seen


async def test_upgrade_with_a_body_is_refused(gw: RunningGateway, rich_upstream: RichUpstream) -> None:
    async with connection(gw) as (reader, writer):
        writer.write(
            b"POST /h2c HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\nContent-Length: 3\r\n\r\nabc"
        )
        async with asyncio.timeout(10):
            status, _, body = await read_answer(reader)
        assert status == 400 and "Upgrade" in json.loads(body)["error_description"]
        assert await closed_by_server(reader) == b""
        assert rich_upstream.requests == []


async def test_refused_upload_closes_the_connection_instead_of_reading_the_body(
    gw: RunningGateway, rich_upstream: RichUpstream
) -> None:
    """A 401 to a POST whose (large) body has not arrived: the unread body must not be taken for the next request,
    so the answer says Connection: close and the connection ends; nothing reached the upstream."""
    async with connection(gw) as (reader, writer):
        writer.write(b"POST /secured/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n" + b"x" * 1000)
        async with asyncio.timeout(10):
            status, headers, body = await read_answer(reader)
        assert status == 401 and headers["connection"] == "close"
        assert await closed_by_server(reader) == b""
        assert rich_upstream.requests == []


async def test_refused_expect_continue_upload_never_asks_for_the_body(gw: RunningGateway) -> None:
    async with connection(gw) as (reader, writer):
        writer.write(b"PUT /secured/f HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        async with asyncio.timeout(10):
            status, headers, _ = await read_answer(reader)
        assert status == 401 and headers["connection"] == "close"  # not "100 Continue" first
        assert await closed_by_server(reader) == b""


async def test_small_refused_body_already_read_keeps_the_connection(gw: RunningGateway) -> None:
    async with connection(gw) as (reader, writer):
        writer.write(b"POST /secured/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
        async with asyncio.timeout(10):
            status, headers, _ = await read_answer(reader)
            assert status == 401 and "connection" not in headers
            writer.write(b"GET /open HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, _ = await read_answer(reader)
        assert status == 200


async def test_broken_chunked_body_mid_upload_is_400_and_the_upstream_request_is_dropped(
    gw: RunningGateway, rich_upstream: RichUpstream
) -> None:
    async with connection(gw) as (reader, writer):
        writer.write(b"POST /hash HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        writer.write(b"zz\r\nnot a chunk size\r\n")
        async with asyncio.timeout(10):
            status, headers, body = await read_answer(reader)
        assert status == 400 and headers["connection"] == "close"
        assert json.loads(body)["error_description"] == "malformed request body"
        assert await closed_by_server(reader) == b""
        # The upstream's request never ended: /hash records only a body it read to the end.
        assert rich_upstream.requests == []


async def test_idle_connection_is_closed_after_idle_timeout(gw: RunningGateway) -> None:
    """idle_timeout is 1 s here: a connection that says nothing, one that trickles a head and never ends it, and a
    kept-alive one after its answer are all closed by the server."""
    async with connection(gw) as (silent_reader, _), connection(gw) as (partial_reader, partial):
        partial.write(b"GET /never-finished HTTP/1.1\r\nHost: x\r\n")
        async with connection(gw) as (kept_reader, kept):
            kept.write(b"GET /once HTTP/1.1\r\nHost: x\r\n\r\n")
            async with asyncio.timeout(10):
                status, _, _ = await read_answer(kept_reader)
            assert status == 200
            assert await closed_by_server(silent_reader) == b""
            assert await closed_by_server(partial_reader) == b""
            assert await closed_by_server(kept_reader) == b""


async def test_client_leaving_mid_request_cancels_the_upstream_request(
    gw: RunningGateway, rich_upstream: RichUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """And it is counted and logged, as nginx's 499: a hung upstream whose clients give up must still show."""
    caplog.set_level(logging.INFO, logger="gateway.access")
    async with connection(gw) as (reader, writer):
        writer.write(b"GET /slow?s=30 HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(10):
            await rich_upstream.slow_started.wait()
            writer.close()
            await rich_upstream.slow_cancelled.wait()  # the gateway dropped its upstream connection
    assert gw.metric("gateway_http_requests_total", route="open", method="GET", code="499") == 1
    access = [r for r in caplog.records if r.name == "gateway.access" and getattr(r, "path", "") == "/slow"]
    assert [(getattr(r, "status", None), getattr(r, "reason", None)) for r in access] == [(499, "client_gone")]


async def test_a_client_that_stops_reading_is_cut_off_after_send_timeout(
    rich_upstream: RichUpstream, tmp_path: Path
) -> None:
    """A client that asks for a long answer and reads none of it would hold its task and upstream connection for
    ever: once the answer has waited send_timeout for the socket to drain, the connection is aborted, and with it
    the upstream request."""
    config = open_route_config(rich_upstream.url, "send_timeout: 300ms")
    async for gw in start_gateway(config, tmp_path):
        async with connection(gw) as (reader, writer):
            writer.write(b"GET /stream/512 HTTP/1.1\r\nHost: x\r\n\r\n")
            async with asyncio.timeout(10):
                await rich_upstream.stream_cut.wait()  # the gateway gave up and dropped the upstream request
            received = 0
            with contextlib.suppress(ConnectionError):
                async with asyncio.timeout(10):
                    while chunk := await reader.read(1 << 20):  # what was already in flight, then the end
                        received += len(chunk)
            assert 0 < received < 512 * len(STREAM_CHUNK)


@pytest.mark.skipif(sys.platform != "linux", reason="counts the kernel's send queue by SIOCOUTQ (Linux)")
async def test_a_slow_reader_that_keeps_taking_some_gets_the_whole_answer(
    rich_upstream: RichUpstream, tmp_path: Path
) -> None:
    """send_timeout cuts off a client that takes nothing for that long, not one that reads slowly: each time the
    stall watch fires and finds some of the answer taken, it starts again. The client takes at most 32 KiB off its
    socket every 20 ms (the pace is what is under test, hence the sleeps) through a 32 KiB receive buffer: writing
    stays paused for longer than send_timeout while the kernel's send queue drains. Counting only the transport's
    buffer, the gateway took this client for one that had stopped and cut it off."""
    config = open_route_config(rich_upstream.url, "send_timeout: 300ms")
    mib = 4
    loop = asyncio.get_running_loop()
    answer = bytearray()
    async for gw in start_gateway(config, tmp_path):
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)  # before connecting: no autotuning
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", gw.ports.proxy_port))
            await loop.sock_sendall(sock, b"GET /stream/%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % mib)
            async with asyncio.timeout(60):
                # Straight off the socket: a StreamReader would take megabytes at once, then nothing for a while.
                while chunk := await loop.sock_recv(sock, 32 * 1024):
                    answer += chunk
                    await asyncio.sleep(0.02)
    received = asyncio.StreamReader()
    received.feed_data(bytes(answer))
    received.feed_eof()
    status, headers, body = await read_answer(received)
    assert (status, headers["transfer-encoding"]) == (200, "chunked")
    assert body == STREAM_CHUNK * mib
    assert not rich_upstream.stream_cut.is_set()


async def test_pipelined_answers_wait_for_the_one_before_to_leave(rich_upstream: RichUpstream, tmp_path: Path) -> None:
    """A client that pipelines requests for 64 KiB answers and reads 32 KiB per round keeps taking some, so it is not
    cut off; the gateway must then not answer ahead of it: its write buffer stays at about one answer (it grew by
    ~2.8 MB/s while answers were written whether or not the one before had left)."""
    config = open_route_config(rich_upstream.url, "send_timeout: 300ms")
    loop = asyncio.get_running_loop()
    async for gw in start_gateway(config, tmp_path):
        assert gw.server._listener is not None
        connections = gw.server._listener.connections
        peak = received = 0
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", gw.ports.proxy_port))
            async with asyncio.timeout(30):
                for _ in range(20):  # 2 s at 10 rounds a second (the pace is what is under test)
                    await loop.sock_sendall(sock, b"GET /bytes/65536 HTTP/1.1\r\nHost: x\r\n\r\n" * 5)
                    with contextlib.suppress(BlockingIOError):
                        chunk = sock.recv(32 * 1024)
                        assert chunk, "the gateway closed the connection of a client that kept reading"
                        received += len(chunk)
                    for connection in connections:
                        if connection.transport is not None:
                            peak = max(peak, connection.transport.get_write_buffer_size())
                    await asyncio.sleep(0.1)
    assert received > 0
    assert peak < 512 * 1024, f"{peak} bytes waited in the gateway's write buffer"


async def test_a_websocket_handed_over_while_the_socket_is_full_is_not_taken_for_a_stalled_client(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The answer before a WebSocket handshake may still fill the socket when the connection is handed to aiohttp:
    the stall watch ends with the handover, and aiohttp is told to wait for the socket (it used to be aborted
    send_timeout later, while in use)."""

    async def serve(request: Request) -> None:
        request.respond(200, "OK", [], b"x" * (8 << 20))  # one write, far over the high-water mark

    async def echo(request: web.BaseRequest) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            await ws.send_str(message.data)
        return ws

    send_timeout = 0.1
    aiohttp_server = web.Server(echo)
    listener = Listener(serve, aiohttp_server, 16384, 60.0, send_timeout)
    port = await listener.start("127.0.0.1", 0, False)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        async with asyncio.timeout(10):
            status, _, body = await read_answer(reader)
            assert status == 200 and len(body) == 8 << 20
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
        await asyncio.sleep(3 * send_timeout)  # past send_timeout: a stall watch left running would have fired
        writer.write(bytes([0x81, 0x82, 1, 2, 3, 4]) + bytes(b ^ m for b, m in zip(b"hi", b"\x01\x02", strict=True)))
        async with asyncio.timeout(10):
            assert await reader.readexactly(4) == b"\x81\x02hi"  # echoed, unmasked
        writer.close()
    finally:
        await listener.stop(1.0)
        await aiohttp_server.shutdown(1.0)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_websocket_handshake_after_a_plain_request_on_the_same_connection(
    gw: RunningGateway, rich_upstream: RichUpstream
) -> None:
    """A WebSocket handshake pipelined behind a plain request waits for that answer, then the connection is
    handed to the WebSocket relay with the handshake intact."""
    async with connection(gw) as (reader, writer):
        handshake = (
            b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Protocol: chat.v2\r\n\r\n"
        )
        writer.write(b"GET /slow?s=0.2 HTTP/1.1\r\nHost: x\r\n\r\n" + handshake)
        async with asyncio.timeout(10):
            first = await read_answer(reader)
            switching = await reader.readuntil(b"\r\n\r\n")
        assert first[0] == 200 and first[2] == b"late"
        assert switching.startswith(b"HTTP/1.1 101 ")
        assert b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in switching  # RFC 6455's accept value for that key


async def test_answers_carry_one_date(gw: RunningGateway) -> None:
    """RFC 9110 §6.6.1: the gateway's own answers get a Date; relayed ones keep the upstream's, never two."""
    async with connection(gw) as (reader, writer):
        for path in ("/secured/x", "/open"):  # a 401 made here, a 200 relayed from the upstream
            writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            async with asyncio.timeout(10):
                _, headers, _ = await read_answer(reader)
            assert headers["date"].endswith(" GMT") and headers["date"].count("GMT") == 1


async def test_trusted_proxies_change_at_a_restart_not_at_a_reload(
    rich_upstream: RichUpstream, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """As the reload's own warning says of listen settings: a reload that trusts every address must not start
    believing X-Forwarded-For (nor skip the warning a start gives for it)."""
    caplog.set_level(logging.INFO, logger="gateway.access")
    async for gw in start_gateway(open_route_config(rich_upstream.url), tmp_path):
        path = gw.server.config_path
        assert path is not None
        path.write_text(path.read_text().replace("port: 0}", "port: 0, trusted_proxies: [0.0.0.0/0]}", 1))
        assert "trusted_proxies" in path.read_text()
        assert await gw.server.reload()
        async with connection(gw) as (reader, writer):
            writer.write(b"GET /who HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n")
            async with asyncio.timeout(10):
                assert (await read_answer(reader))[0] == 200
    clients = [getattr(r, "client", None) for r in caplog.records if getattr(r, "path", "") == "/who"]
    assert clients == ["127.0.0.1"]
