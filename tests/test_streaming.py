"""Bodies stream both ways: chunked uploads, large downloads, SSE as produced, WebSocket, a 1 GB upload in flat
memory (gateway in a subprocess), and a client that leaves cancelling the upstream request."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.support import (
    AUDIENCE,
    ISSUER,
    STREAM_CHUNK,
    IdP,
    Key,
    RichUpstream,
    RunningGateway,
    gateway_process,
    raw_http_request,
    serve_app_cancelling,
    start_gateway,
    stream_digest,
)

MIB = 1 << 20


def routes(idp: IdP, up: str) -> str:
    return f"""
issuers:
  - name: corp
    issuer: {ISSUER}
    jwks_uri: {idp.url}/jwks
    audiences: [{AUDIENCE}]
routes:
  - name: ws
    match: {{path: /ws}}
    upstream: {{url: "{up}"}}
    auth: {{mode: jwt, issuers: [corp]}}
    forward: {{identity_headers: {{X-Auth-Subject: sub}}}}
  - name: ws-big
    match: {{path: /big/ws}}
    upstream: {{url: "{up}", strip_prefix: /big, websocket_max_message_bytes: 8388608}}
    auth: {{mode: jwt, issuers: [corp]}}
  - name: open
    match: {{path_prefix: /}}
    upstream: {{url: "{up}", timeout: 60s}}
    auth: {{mode: none}}
"""


@pytest.fixture
async def gw(idp: IdP, rich_upstream: RichUpstream, tmp_path: Path) -> AsyncIterator[RunningGateway]:
    async for running in start_gateway(routes(idp, rich_upstream.url), tmp_path):
        yield running


# --- request bodies ----------------------------------------------------------------------------------------------


async def test_chunked_request_body_arrives_byte_exact(
    gw: RunningGateway, rich_upstream: RichUpstream, http: aiohttp.ClientSession
) -> None:
    pieces = [os.urandom(n) for n in (1, 17, 65536, 100_000, 3, 250_000)]

    async def body() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece

    async with http.post(f"{gw.url}/hash", data=body()) as resp:
        assert resp.status == 200
        answer = await resp.json()
    whole = b"".join(pieces)
    assert answer == {"sha256": hashlib.sha256(whole).hexdigest(), "length": len(whole)}
    seen = rich_upstream.requests[-1]["headers"]
    assert seen.get("Transfer-Encoding") == "chunked"  # streamed on: the gateway did not buffer to count it
    assert "Content-Length" not in seen


async def test_empty_chunked_body(gw: RunningGateway, http: aiohttp.ClientSession) -> None:
    async def nothing() -> AsyncIterator[bytes]:
        for _ in ():
            yield b""

    async with http.post(f"{gw.url}/hash", data=nothing()) as resp:
        assert resp.status == 200
        assert (await resp.json())["length"] == 0


# --- response bodies ---------------------------------------------------------------------------------------------


async def test_large_streamed_response_byte_exact(gw: RunningGateway, http: aiohttp.ClientSession) -> None:
    digest = hashlib.sha256()
    length = 0
    async with http.get(f"{gw.url}/stream/50") as resp:
        assert resp.status == 200
        assert resp.headers.get("Transfer-Encoding") == "chunked"
        async for chunk in resp.content.iter_chunked(MIB):
            digest.update(chunk)
            length += len(chunk)
    assert length == 50 * MIB
    assert digest.hexdigest() == stream_digest(50)


async def test_upstream_dying_mid_body_is_not_passed_off_as_complete(tmp_path: Path) -> None:
    """An upstream that breaks off a chunked answer: the client must see a broken answer, not a short complete one."""

    async def broken(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b"first part;")
        assert request.transport is not None
        request.transport.abort()  # the upstream process dies: no terminating chunk
        return response

    app = web.Application()
    app.router.add_get("/broken", broken)
    runner, url = await serve_app_cancelling(app)
    try:
        config = f"""
routes:
  - name: open
    match: {{path_prefix: /}}
    upstream: {{url: "{url}"}}
    auth: {{mode: none}}
"""
        async for gw in start_gateway(config, tmp_path):
            async with aiohttp.ClientSession() as http, http.get(f"{gw.url}/broken") as resp:
                assert resp.status == 200  # the status line had already gone out
                with pytest.raises(aiohttp.ClientPayloadError):
                    await resp.read()
            # Counted as what it was: the upstream failed.
            assert gw.metric("gateway_http_requests_total", route="open", method="GET", code="502") == 1
    finally:
        await runner.cleanup()


# --- server-sent events ------------------------------------------------------------------------------------------


async def test_sse_events_delivered_as_produced(tmp_path: Path) -> None:
    produce = [asyncio.Event() for _ in range(3)]
    produced: list[int] = []

    async def sse(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        for i, go in enumerate(produce):
            await go.wait()
            produced.append(i)
            await response.write(f"id: {i}\ndata: event {i}\n\n".encode())
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/events", sse)
    runner, url = await serve_app_cancelling(app)
    config = f"""
routes:
  - name: events
    match: {{path: /events}}
    upstream: {{url: "{url}"}}
    auth: {{mode: none}}
"""
    try:
        async for gw in start_gateway(config, tmp_path):
            async with aiohttp.ClientSession() as http, http.get(f"{gw.url}/events") as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"] == "text/event-stream"
                assert "Content-Length" not in resp.headers
                for i in range(3):
                    produce[i].set()
                    # Event i must arrive while the upstream is still blocked before producing event i+1:
                    # a gateway that buffered the stream would leave this read waiting (and the test failing).
                    async with asyncio.timeout(5):
                        lines = [await resp.content.readline() for _ in range(3)]
                    assert lines == [f"id: {i}\n".encode(), f"data: event {i}\n".encode(), b"\n"]
                    assert produced == list(range(i + 1))
                async with asyncio.timeout(5):
                    assert await resp.content.read() == b""
    finally:
        await runner.cleanup()


# --- WebSocket ---------------------------------------------------------------------------------------------------


async def test_websocket_through_gateway(
    gw: RunningGateway, rich_upstream: RichUpstream, rsa_key: Key, http: aiohttp.ClientSession
) -> None:
    token = rsa_key.sign()
    async with asyncio.timeout(10):
        async with http.ws_connect(
            f"{gw.url}/ws", headers={"Authorization": f"Bearer {token}"}, protocols=("chat.v1", "chat.v2")
        ) as ws:
            assert ws.protocol == "chat.v2"  # negotiated by the upstream, passed on to the client
            await ws.send_str("hello")
            assert await ws.receive_str() == "echo:hello"
            await ws.send_bytes(b"\x00\x01\x02\xff")
            assert await ws.receive_bytes() == b"\xff\x02\x01\x00"
            big = os.urandom(300_000)
            await ws.send_bytes(big)
            assert await ws.receive_bytes() == big[::-1]
            await ws.close(code=4000, message=b"client done")
        await rich_upstream.ws_closed.wait()
    assert rich_upstream.ws_close_codes == [4000]  # the client's close code reached the upstream
    handshake = rich_upstream.requests[-1]["headers"]
    assert handshake["X-Auth-Subject"] == "alice"
    assert "Authorization" not in handshake
    assert gw.metric("gateway_auth_decisions_total", route="ws", outcome="allow", reason="ok") == 1


async def test_websocket_handshake_keeps_a_header_repeated_in_several_spellings(
    gw: RunningGateway, rich_upstream: RichUpstream, rsa_key: Key
) -> None:
    """aiohttp's client makes the upstream handshake, and its header merge kept only the last spelling of a name."""
    status, _, _ = await raw_http_request(
        gw.ports.proxy_port,
        f"GET /ws HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {rsa_key.sign()}\r\nConnection: Upgrade\r\n"
        "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "x-multi: a\r\nX-Multi: b\r\n",
    )
    assert status == 101
    handshake = rich_upstream.requests[-1]["header_list"]
    assert [v.decode() for k, v in handshake if k.lower() == b"x-multi"] == ["a", "b"]


async def test_a_websocket_message_over_the_limit_closes_its_sender_with_1009_and_the_other_side_too(
    gw: RunningGateway,
    rich_upstream: RichUpstream,
    rsa_key: Key,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The default limit is 4 MiB each way: a larger message is never relayed in part, and neither side is left
    hanging on a WebSocket whose other half is gone."""
    caplog.set_level(logging.INFO, logger="gateway.websocket")
    token = rsa_key.sign()
    async with asyncio.timeout(10):
        async with http.ws_connect(f"{gw.url}/ws", headers={"Authorization": f"Bearer {token}"}) as ws:
            # From the client. aiohttp refuses the frame by its header, before reading its payload, and closes:
            # the client, still sending, may see its 1009 or only the reset the unread payload causes.
            try:
                await ws.send_bytes(bytes(4 * MIB + 1))
                message = await ws.receive()
            except ConnectionError:
                message = None
            if message is not None and message.type == aiohttp.WSMsgType.CLOSE:
                assert ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
            else:
                assert message is None or message.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
        # The upstream heard no part of it (it would have echoed, not closed) and is told the client went away.
        await rich_upstream.ws_closed.wait()
        assert rich_upstream.ws_close_codes == [aiohttp.WSCloseCode.GOING_AWAY]
        rich_upstream.ws_closed.clear()
        async with http.ws_connect(f"{gw.url}/ws", headers={"Authorization": f"Bearer {token}"}) as ws:
            await ws.send_str(f"big:{4 * MIB + 1}")  # from the upstream
            message = await ws.receive()
            assert message.type == aiohttp.WSMsgType.CLOSE
            assert ws.close_code == aiohttp.WSCloseCode.BAD_GATEWAY
        await rich_upstream.ws_closed.wait()
    # As above, the sender may hear 1009 or only the reset (aiohttp then reports no code).
    assert rich_upstream.ws_close_codes[-1] in (aiohttp.WSCloseCode.MESSAGE_TOO_BIG, None)
    # The operator is told why, once per WebSocket, and by whom: not with the message.
    told = [r for r in caplog.records if "over websocket_max_message_bytes" in r.getMessage()]
    assert [getattr(r, "sender", None) for r in told] == ["client", "upstream"]


async def test_a_route_can_raise_the_websocket_message_limit(
    gw: RunningGateway, rsa_key: Key, http: aiohttp.ClientSession
) -> None:
    """/big/ws allows 8 MiB: a message of exactly the limit passes both ways, one byte more does not."""
    big = os.urandom(8 * MIB)
    async with asyncio.timeout(20):
        async with http.ws_connect(
            f"{gw.url}/big/ws", headers={"Authorization": f"Bearer {rsa_key.sign()}"}, max_msg_size=0
        ) as ws:
            await ws.send_bytes(big)
            assert await ws.receive_bytes() == big[::-1]  # both ways: the upstream echoes it reversed
            await ws.send_str(f"big:{8 * MIB + 1}")
            message = await ws.receive()
            assert message.type == aiohttp.WSMsgType.CLOSE
            assert ws.close_code == aiohttp.WSCloseCode.BAD_GATEWAY


async def test_websocket_upstream_close_code_reaches_client(
    gw: RunningGateway, rsa_key: Key, http: aiohttp.ClientSession
) -> None:
    async with asyncio.timeout(10):
        async with http.ws_connect(f"{gw.url}/ws", headers={"Authorization": f"Bearer {rsa_key.sign()}"}) as ws:
            assert ws.protocol is None  # the client offered none
            await ws.send_str("close:4001")
            message = await ws.receive()
            assert message.type == aiohttp.WSMsgType.CLOSE
            assert ws.close_code == 4001


async def test_a_clients_close_code_is_echoed_back_to_it(
    gw: RunningGateway, rich_upstream: RichUpstream, rsa_key: Key, http: aiohttp.ClientSession
) -> None:
    """RFC 6455 §5.5.1: the close that answers a close echoes its code. The client closing with 4001 heard 1000."""
    async with asyncio.timeout(10):
        ws = await http.ws_connect(f"{gw.url}/ws", headers={"Authorization": f"Bearer {rsa_key.sign()}"})
        await ws.send_str("hi")
        assert (await ws.receive()).data == "echo:hi"
        await ws.close(code=4001)
        assert ws.close_code == 4001
        await rich_upstream.ws_closed.wait()
    assert rich_upstream.ws_close_codes[-1] == 4001, "the upstream heard the client's code"


async def test_websocket_without_token_is_401(
    gw: RunningGateway, rich_upstream: RichUpstream, http: aiohttp.ClientSession
) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await http.ws_connect(f"{gw.url}/ws")
    assert info.value.status == 401
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await http.ws_connect(f"{gw.url}/ws", headers={"Authorization": "Bearer not.a.jwt"})
    assert info.value.status == 401
    assert rich_upstream.requests == []


async def test_websocket_handshake_that_cannot_complete_is_400_before_upstream(
    gw: RunningGateway, rich_upstream: RichUpstream, rsa_key: Key
) -> None:
    # Connection: Upgrade + Upgrade: websocket, but no Sec-WebSocket-Key/Version.
    head = (
        f"GET /ws HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {rsa_key.sign()}\r\n"
        "Connection: Upgrade\r\nUpgrade: websocket\r\n"
    )
    status, _, body = await raw_http_request(gw.ports.proxy_port, head)
    assert status == 400
    assert b'"invalid_request"' in body
    assert rich_upstream.requests == []


@pytest.mark.parametrize(("path", "status"), [("/status/403", 403), ("/status/401", 401), ("/status/302", 302)])
async def test_an_upstream_refusing_the_websocket_handshake_is_relayed_not_a_502(
    gw: RunningGateway, http: aiohttp.ClientSession, path: str, status: int
) -> None:
    """The upstream's own refusal (its ACL, its login redirect) reaches the client with its headers; it used to be a
    502 'upstream unavailable', counted as a gateway failure."""
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await http.ws_connect(f"{gw.url}{path}")
    assert info.value.status == status
    assert info.value.headers is not None and info.value.headers["X-Upstream"] == "yes"
    assert gw.metric("gateway_http_requests_total", route="open", method="GET", code=str(status)) == 1


async def test_an_upstream_answering_a_websocket_handshake_with_200_is_502(
    gw: RunningGateway, http: aiohttp.ClientSession
) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await http.ws_connect(f"{gw.url}/echo")  # a plain 200: no handshake completed
    assert info.value.status == 502


async def test_upgrade_header_not_named_in_connection_is_a_plain_request(
    gw: RunningGateway, rich_upstream: RichUpstream, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{gw.url}/echo", headers={"Upgrade": "websocket"}) as resp:
        assert resp.status == 200
    assert "Upgrade" not in rich_upstream.requests[-1]["headers"]


async def test_websocket_upstream_dropping_connection_closes_client_with_1014(
    gw: RunningGateway, rsa_key: Key, http: aiohttp.ClientSession
) -> None:
    async with asyncio.timeout(10):
        async with http.ws_connect(f"{gw.url}/ws", headers={"Authorization": f"Bearer {rsa_key.sign()}"}) as ws:
            await ws.send_str("abort")
            message = await ws.receive()
            assert message.type == aiohttp.WSMsgType.CLOSE
            assert ws.close_code == aiohttp.WSCloseCode.BAD_GATEWAY


async def test_websocket_client_vanishing_closes_upstream_with_1001(
    gw: RunningGateway, rich_upstream: RichUpstream, rsa_key: Key
) -> None:
    # A raw handshake, so the test can drop the TCP connection with no close frame, as a crashed client would.
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.ports.proxy_port)
    writer.write(
        (
            f"GET /ws HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {rsa_key.sign()}\r\n"
            "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        ).encode()
    )
    await writer.drain()
    async with asyncio.timeout(10):
        status_line = await reader.readline()
        assert status_line.startswith(b"HTTP/1.1 101")
        await reader.readuntil(b"\r\n\r\n")
        writer.transport.abort()
        await rich_upstream.ws_closed.wait()
    assert rich_upstream.ws_close_codes == [aiohttp.WSCloseCode.GOING_AWAY]


# --- a client that leaves ----------------------------------------------------------------------------------------


async def test_client_disconnect_cancels_upstream_request(gw: RunningGateway, rich_upstream: RichUpstream) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.ports.proxy_port)
    writer.write(b"GET /slow?s=30 HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    async with asyncio.timeout(5):
        await rich_upstream.slow_started.wait()
    writer.close()
    await writer.wait_closed()
    # Without the cancellation the upstream handler would sleep on for 30 s; this waits at most 5.
    async with asyncio.timeout(5):
        await rich_upstream.slow_cancelled.wait()
    assert [r["raw_path"] for r in rich_upstream.requests] == ["/slow?s=30"]
    assert reader.at_eof() or not await reader.read()  # the client never got an answer


# --- 1 GB upload, gateway memory flat ----------------------------------------------------------------------------

UPLOAD_MIB = 1024
RSS_GROWTH_LIMIT = 64 * MIB


async def test_1gb_upload_streams_in_flat_memory(rich_upstream: RichUpstream, tmp_path: Path) -> None:
    config = f"""
log: {{level: info}}
routes:
  - name: upload
    match: {{path: /hash}}
    upstream: {{url: "{rich_upstream.url}", timeout: 120s}}
    auth: {{mode: none}}
"""
    async with gateway_process(config, tmp_path) as gw, aiohttp.ClientSession() as http:
        # Warm up (first request: imports, connection pool) before taking the baseline.
        async with http.post(f"{gw.url}/hash", data=STREAM_CHUNK) as resp:
            assert resp.status == 200
        baseline = gw.rss_bytes()
        samples: list[int] = []

        async def body() -> AsyncIterator[bytes]:
            for i in range(UPLOAD_MIB):
                if i % 8 == 0:
                    samples.append(gw.rss_bytes())  # the gateway's RSS every 8 MiB sent
                yield STREAM_CHUNK

        started = time.monotonic()
        headers = {"Content-Length": str(UPLOAD_MIB * MIB), "Content-Type": "application/octet-stream"}
        async with http.post(f"{gw.url}/hash", data=body(), headers=headers) as resp:
            assert resp.status == 200
            answer = await resp.json()
        elapsed = time.monotonic() - started
        samples.append(gw.rss_bytes())
    assert answer == {"sha256": stream_digest(UPLOAD_MIB), "length": UPLOAD_MIB * MIB}
    growth = max(samples) - baseline
    print(
        f"\n1 GiB upload: {elapsed:.1f} s ({UPLOAD_MIB / elapsed:.0f} MiB/s); gateway RSS baseline "
        f"{baseline / MIB:.1f} MiB, peak {max(samples) / MIB:.1f} MiB, growth {growth / MIB:.1f} MiB "
        f"over {len(samples)} samples"
    )
    assert len(samples) >= UPLOAD_MIB // 8
    assert growth < RSS_GROWTH_LIMIT
