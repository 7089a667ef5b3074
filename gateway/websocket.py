"""WebSocket upgrades through the gateway (RFC 6455): the handshake is checked before the upstream is contacted,
then messages are pumped both ways, and each side's close (with its code) is passed on before it is answered.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web
from multidict import MultiMapping
from yarl import URL

from gateway import errors

if TYPE_CHECKING:  # proxy imports the listener, which imports this module
    from gateway.proxy import Upstream

log = logging.getLogger(__name__)

_WS_HANDSHAKE = frozenset(
    {"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-protocol"}
)
_WS_CLOSE_TIMEOUT = 10.0  # once one side closed, how long the other may take to finish its close


def is_websocket(headers: MultiMapping[str]) -> bool:
    """A WebSocket opening handshake: `Upgrade: websocket` that `Connection` names (RFC 6455 §4.1).

    `Upgrade` alone is not one (RFC 9110 §7.8: it only counts when listed in Connection); such a request is
    forwarded as a plain one, with Upgrade removed like every hop-by-hop header.
    """
    connection = {t.strip().lower() for v in headers.getall("Connection", ()) for t in v.split(",")}
    return "upgrade" in connection and headers.get("Upgrade", "").strip().lower() == "websocket"


def _one_spelling_each(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The headers with every repeat of a name spelt as its first occurrence, for aiohttp's client: its header merge
    keys on the spelling, so `x-a: 1` then `X-A: 2` reached the upstream as `X-A: 2` alone."""
    first: dict[str, str] = {}
    return [(first.setdefault(name.lower(), name), value) for name, value in headers]


def _refused(status: int, headers: MultiMapping[str]) -> web.Response:
    """The upstream refused the handshake (401, 403, a redirect to a login page...): its status and headers reach
    the client, as nginx relays them, rather than a 502 that counted the upstream's refusal as a gateway failure.
    aiohttp's client has dropped the body; a JSON one says what happened."""
    kept = [
        (name, value)
        for name, value in headers.items()
        if name.lower() not in _NOT_RELAYED and not name.lower().startswith("sec-websocket-")
    ]
    body = {
        "error": "upgrade_refused",
        "error_description": f"the upstream answered the WebSocket handshake with {status}",
    }
    response = web.json_response(body, status=status)
    for name, value in kept:
        response.headers.add(name, value)
    return response


_NOT_RELAYED = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "upgrade", "content-length", "content-type", "content-encoding",
     "te", "trailer", "proxy-authenticate", "proxy-connection", "server", "date"}
)  # fmt: skip


async def relay(
    request: web.BaseRequest,
    session: aiohttp.ClientSession,
    upstream: Upstream,
    url: URL,
    headers: list[tuple[str, str]],
) -> web.StreamResponse:
    """Relay one WebSocket between the client and `url`; the handshake must complete within the upstream's timeout."""
    protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
    if not web.WebSocketResponse(protocols=protocols).can_prepare(request).ok:
        # Checked before connecting upstream: a handshake we cannot complete towards the client (bad key, version,
        # method) used to open an upstream WebSocket, leak it, and answer 500.
        raise errors.InvalidRequest("not a valid WebSocket handshake")
    # The client's handshake headers are not passed on: aiohttp makes the upstream handshake with its own.
    headers = _one_spelling_each([(name, value) for name, value in headers if name.lower() not in _WS_HANDSHAKE])
    try:
        async with asyncio.timeout(upstream.timeout):
            upstream_ws = await session.ws_connect(
                url,
                headers=headers,
                protocols=protocols,
                autoping=False,
                autoclose=False,
                max_msg_size=upstream.websocket_max_message + 1,  # aiohttp refuses a message of max_msg_size
            )
    except aiohttp.WSServerHandshakeError as exc:
        if exc.status >= 300 and exc.headers is not None:
            return _refused(exc.status, exc.headers)
        raise errors.UpstreamUnavailable() from None  # a 1xx or 2xx is no answer to a handshake
    except aiohttp.ClientError:  # before TimeoutError, as in forward()
        raise errors.UpstreamUnavailable() from None
    except TimeoutError:
        raise errors.UpstreamTimeout() from None
    async with upstream_ws:
        # autoclose off on both sides: a pump answers a close only after relaying it, so the far side hears the
        # real close code before this side may hang up (which cancels this handler).
        client_ws = web.WebSocketResponse(
            protocols=[upstream_ws.protocol] if upstream_ws.protocol else (),
            autoping=False,
            autoclose=False,
            max_msg_size=upstream.websocket_max_message + 1,
        )
        await client_ws.prepare(request)
        pumps = [
            asyncio.create_task(_pump(client_ws, upstream_ws, towards_client=False)),
            asyncio.create_task(_pump(upstream_ws, client_ws, towards_client=True)),
        ]
        try:
            _, pending = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            # Closing one side ends the other pump too; let it finish its close rather than cut it off.
            await asyncio.wait(pending, timeout=_WS_CLOSE_TIMEOUT)
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            if not upstream_ws.closed:  # the client went away (this handler was cancelled): tell the upstream so
                await upstream_ws.close(code=aiohttp.WSCloseCode.GOING_AWAY)
    await client_ws.close()
    return client_ws


def _relayable_close_code(code: int | None, towards_client: bool) -> int:
    """The close code to pass on. 1005/1006/1015 report a missing code or a dropped connection and must never be
    sent in a close frame (RFC 6455 §7.4.1): the client then hears 1014 (bad gateway), the upstream 1001 (going
    away)."""
    if not code or code == 1005:  # none given (an empty close frame reads as 0)
        return aiohttp.WSCloseCode.OK
    if code in (aiohttp.WSCloseCode.ABNORMAL_CLOSURE, 1015):
        return aiohttp.WSCloseCode.BAD_GATEWAY if towards_client else aiohttp.WSCloseCode.GOING_AWAY
    return code


async def _pump(
    source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    sink: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    towards_client: bool,
) -> None:
    """Relay messages from source to sink until source closes; then close sink with source's code, and only then
    answer source's close."""
    while True:
        message = await source.receive()
        if message.type == aiohttp.WSMsgType.TEXT:
            await sink.send_str(message.data)
        elif message.type == aiohttp.WSMsgType.BINARY:
            await sink.send_bytes(message.data)
        elif message.type == aiohttp.WSMsgType.PING:
            await sink.ping(message.data)
        elif message.type == aiohttp.WSMsgType.PONG:
            await sink.pong(message.data)
        elif message.type == aiohttp.WSMsgType.CLOSE:
            code = _relayable_close_code(message.data, towards_client)
            await sink.close(code=code, message=(message.extra or "").encode())  # a reason fits in 123 bytes
            await source.close(code=code)
            return
        elif message.type == aiohttp.WSMsgType.CLOSING:
            # The other pump is closing source, relaying sink's own close: it answers sink with sink's code (RFC 6455
            # §5.5.1: the reply echoes it). Closing sink here first answered a client's 4001 with 1000.
            return
        else:  # CLOSED or ERROR (the connection broke)
            if (
                message.type == aiohttp.WSMsgType.ERROR
                and getattr(message.data, "code", None) == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
            ):
                # Said once, without the message: what an operator needs to explain a 1009 or 1014.
                log.info(
                    "a WebSocket message over websocket_max_message_bytes closed the WebSocket",
                    extra={"sender": "upstream" if towards_client else "client"},
                )
            await sink.close(code=_relayable_close_code(1006, towards_client))
            return
