"""Forward an authorized request to its upstream and stream the answer back.

Headers are built by subtraction, then addition: hop-by-hop headers, headers named in `Connection`, the
credential (by default) and any client-sent header with an identity header's name are removed; then
X-Forwarded-* and the identity headers are set. Bodies stream both ways; only small answers with a known length
are read whole (cheaper than chunk-by-chunk writes, and bounded).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from http.cookies import SimpleCookie
from urllib.parse import parse_qsl, urlencode

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from gateway import errors
from gateway.config import RouteSettings
from gateway.identity import Identity

log = logging.getLogger(__name__)

HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
     "trailer", "transfer-encoding", "upgrade"}
)  # fmt: skip
_SMALL_BODY = 64 * 1024
_NO_BODY_STATUSES = frozenset({204, 304})
# aiohttp would otherwise add its own Accept/User-Agent/... when the client sent none: the upstream sees the client's.
_SKIP_AUTO = frozenset({"Accept", "Accept-Encoding", "User-Agent", "Content-Type"})
_WS_HANDSHAKE = frozenset({"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions"})


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where and how one route forwards: compiled from RouteSettings once, at load."""

    origin: str  # scheme://host:port
    base_path: str  # without trailing slash
    strip_prefix: str | None
    preserve_host: bool
    timeout: float
    connect_timeout: float
    identity_headers: tuple[tuple[str, str], ...]
    removed: frozenset[str]  # lower-case request headers never forwarded as sent
    credential_source: str | None  # "authorization" | "header" | "cookie" | "query", when it must be removed
    credential_name: str | None

    @classmethod
    def compile(cls, route: RouteSettings) -> Upstream:
        url = URL(route.upstream.url)
        identity = tuple(route.forward.identity_headers.items())
        token = route.auth.token
        remove = route.forward.remove_credential and route.auth.mode != "none"
        removed = set(HOP_BY_HOP) | {"host", "x-forwarded-proto", "x-forwarded-host"}
        removed |= {name.lower() for name, _ in identity}
        if remove and token.source in ("authorization", "header"):
            removed.add("authorization" if token.source == "authorization" else (token.name or "").lower())
        return cls(
            origin=str(url.origin()),
            base_path=url.raw_path.rstrip("/"),
            strip_prefix=route.upstream.strip_prefix,
            preserve_host=route.upstream.preserve_host,
            timeout=route.upstream.timeout,
            connect_timeout=route.upstream.connect_timeout,
            identity_headers=identity,
            removed=frozenset(removed),
            credential_source=token.source if remove else None,
            credential_name=token.name,
        )

    def target(self, request: web.BaseRequest) -> URL:
        path = request.rel_url.raw_path
        if self.strip_prefix and (path == self.strip_prefix or path.startswith(self.strip_prefix.rstrip("/") + "/")):
            path = path[len(self.strip_prefix.rstrip("/")) :] or "/"
        query = request.rel_url.raw_query_string
        if query and self.credential_source == "query":
            query = urlencode(
                [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k != self.credential_name]
            )
        return URL(f"{self.origin}{self.base_path}{path}{'?' + query if query else ''}", encoded=True)

    def headers(self, request: web.BaseRequest, identity: Identity | None) -> CIMultiDict[str]:
        connection_named = {
            token.strip().lower() for value in request.headers.getall("Connection", ()) for token in value.split(",")
        }
        out: CIMultiDict[str] = CIMultiDict()
        for name, value in request.headers.items():
            lower = name.lower()
            if lower in self.removed or lower in connection_named:
                continue
            if lower == "x-forwarded-for":
                continue  # re-added below with this hop appended
            if lower == "cookie" and self.credential_source == "cookie":
                value = _without_cookie(value, self.credential_name or "")
                if not value:
                    continue
            out.add(name, value)
        if self.preserve_host and request.host:
            out["Host"] = request.host
        prior = ", ".join(request.headers.getall("X-Forwarded-For", ()))
        remote = request.remote or ""
        out["X-Forwarded-For"] = f"{prior}, {remote}" if prior else remote
        out["X-Forwarded-Proto"] = request.scheme
        out["X-Forwarded-Host"] = request.host
        if identity is not None:
            for header, claim in self.identity_headers:
                text = identity.claim_text(claim)
                if text is not None and "\n" not in text and "\r" not in text:
                    out[header] = text
        return out


def _without_cookie(header: str, name: str) -> str:
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(header)
    except Exception:  # noqa: BLE001 - unparsable cookies are dropped rather than forwarded with the credential
        return ""
    return "; ".join(f"{k}={m.coded_value}" for k, m in jar.items() if k != name)


def is_websocket(request: web.BaseRequest) -> bool:
    return request.headers.get("Upgrade", "").lower() == "websocket"


async def forward(
    request: web.BaseRequest, session: aiohttp.ClientSession, upstream: Upstream, identity: Identity | None
) -> web.StreamResponse:
    """Send the request upstream; raise UpstreamUnavailable / UpstreamTimeout before any byte is answered."""
    headers = upstream.headers(request, identity)
    url = upstream.target(request)
    if is_websocket(request):
        return await _forward_websocket(request, session, upstream, url, headers)
    body = request.content if request.body_exists else None
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=upstream.connect_timeout)
    try:
        async with asyncio.timeout(upstream.timeout):
            answer = await session.request(
                request.method, url, headers=headers, data=body, allow_redirects=False,
                timeout=timeout, skip_auto_headers=_SKIP_AUTO,
            )  # fmt: skip
    except TimeoutError:
        raise errors.UpstreamTimeout() from None
    except aiohttp.ClientError as exc:
        log.warning("upstream request failed", extra={"upstream": upstream.origin, "error": type(exc).__name__})
        raise errors.UpstreamUnavailable() from None
    try:
        return await _relay(request, answer)
    finally:
        answer.close()  # a no-op when the body was read to the end (the connection is already back in the pool)


async def _relay(request: web.BaseRequest, answer: aiohttp.ClientResponse) -> web.StreamResponse:
    headers = CIMultiDict(
        (k, v) for k, v in answer.headers.items() if k.lower() not in HOP_BY_HOP and k.lower() != "content-length"
    )
    for value in answer.headers.getall("Connection", ()):
        for token in value.split(","):
            headers.popall(token.strip(), None)
    length = answer.content_length
    no_body = request.method == "HEAD" or answer.status in _NO_BODY_STATUSES
    if no_body or (length is not None and length <= _SMALL_BODY):
        body = b"" if no_body else await answer.read()
        small = web.Response(status=answer.status, reason=answer.reason, headers=headers, body=body)
        if no_body and length is not None:
            small.headers["Content-Length"] = str(length)
        return small
    response = web.StreamResponse(status=answer.status, reason=answer.reason, headers=headers)
    if length is not None:
        response.content_length = length
    await response.prepare(request)
    async for chunk in answer.content.iter_any():
        await response.write(chunk)
    await response.write_eof()
    return response


async def _forward_websocket(
    request: web.BaseRequest,
    session: aiohttp.ClientSession,
    upstream: Upstream,
    url: URL,
    headers: CIMultiDict[str],
) -> web.StreamResponse:
    protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
    for name in list(headers):
        if name.lower() in _WS_HANDSHAKE or name.lower() == "sec-websocket-protocol":
            headers.popall(name, None)
    try:
        async with asyncio.timeout(upstream.timeout):
            upstream_ws = await session.ws_connect(url, headers=headers, protocols=protocols, autoping=False)
    except TimeoutError:
        raise errors.UpstreamTimeout() from None
    except aiohttp.ClientError:
        raise errors.UpstreamUnavailable() from None
    client_ws = web.WebSocketResponse(protocols=[upstream_ws.protocol] if upstream_ws.protocol else (), autoping=False)
    await client_ws.prepare(request)
    async with upstream_ws:
        pumps = [
            asyncio.create_task(_pump(client_ws, upstream_ws)),
            asyncio.create_task(_pump(upstream_ws, client_ws)),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
    await client_ws.close()
    return client_ws


async def _pump(
    source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    sink: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
) -> None:
    async for message in source:
        if message.type == aiohttp.WSMsgType.TEXT:
            await sink.send_str(message.data)
        elif message.type == aiohttp.WSMsgType.BINARY:
            await sink.send_bytes(message.data)
        elif message.type == aiohttp.WSMsgType.PING:
            await sink.ping(message.data)
        elif message.type == aiohttp.WSMsgType.PONG:
            await sink.pong(message.data)
    await sink.close(code=source.close_code or aiohttp.WSCloseCode.OK)
