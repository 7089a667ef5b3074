"""Forward an authorized request to its upstream and stream the answer back.

Headers are built by subtraction, then addition: hop-by-hop headers, headers named in `Connection`, the
credential (by default) and any client-sent header with an identity header's name are removed; then
X-Forwarded-* and the identity headers are set. Bodies stream both ways; only small answers with a known length
are read whole (cheaper than chunk-by-chunk writes, and bounded).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from urllib.parse import unquote, unquote_plus

from yarl import URL

from gateway import errors
from gateway import upstream as upstream_client
from gateway.config import GATEWAY_SET_HEADERS, HOP_BY_HOP, RouteSettings
from gateway.identity import Identity
from gateway.listener import Request, RequestView
from gateway.routing import without_parameters

log = logging.getLogger(__name__)

_SMALL_BODY = 64 * 1024
_NO_BODY_STATUSES = frozenset({204, 304})
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # all but HTAB (RFC 9110 §5.5)


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where and how one route forwards: compiled from RouteSettings once, at load."""

    origin: str  # scheme://host:port
    scheme: str
    host: str
    port: int
    netloc: str  # the Host header the upstream expects (port only when not the scheme's default)
    base_path: str  # without trailing slash
    strip_prefix: str | None
    preserve_host: bool
    timeout: float
    connect_timeout: float
    idle_timeout: float
    websocket_max_message: int  # bytes
    identity_headers: tuple[tuple[str, str], ...]
    removed: frozenset[str]  # lower-case request headers never forwarded as sent
    removed_untrusted: frozenset[str]  # the same, for a request that did not come through a trusted proxy
    removed_dashed: frozenset[str]  # the same with '_' read as '-' (CGI-style upstreams do not tell them apart)
    removed_has_underscore: bool  # a configured name has one: then a client's '-' spelling must be checked too
    credential_source: str | None  # "authorization" | "header" | "cookie" | "query", when it must be removed
    credential_name: str | None

    @classmethod
    def compile(cls, route: RouteSettings, identity_names: frozenset[str] = frozenset()) -> Upstream:
        """`identity_names`: identity header names of every route, lower-case. They are removed from requests on
        every route, `auth: none` included, so a client cannot pose as an identity to an upstream that also sits
        behind an authenticated route."""
        url = URL(route.upstream.url)
        identity = tuple(route.forward.identity_headers.items())
        token = route.auth.token
        remove = route.forward.remove_credential and route.auth.mode != "none"
        # Whatever the gateway frames or sets itself is taken out of the client's headers: one rule with the config's
        # check on identity header names, so no name can be sent twice (headers() builds a list). The client's
        # Content-Length stays: it frames the body forwarded as is. Expect: the gateway answers 100-continue itself.
        removed = set(GATEWAY_SET_HEADERS - {"content-length"})
        removed |= {name.lower() for name, _ in identity} | identity_names
        if remove and token.source in ("authorization", "header"):
            removed.add("authorization" if token.source == "authorization" else (token.name or "").lower())
        assert url.host is not None and url.port is not None  # noqa: S101 - UpstreamSettings checks the URL
        return cls(
            origin=str(url.origin()),
            scheme=url.scheme,
            host=url.host,
            port=url.port,
            netloc=url.raw_authority,
            base_path=url.raw_path.rstrip("/"),
            strip_prefix=route.upstream.strip_prefix,
            preserve_host=route.upstream.preserve_host,
            timeout=route.upstream.timeout,
            connect_timeout=route.upstream.connect_timeout,
            idle_timeout=route.upstream.idle_timeout,
            websocket_max_message=route.upstream.websocket_max_message_bytes,
            identity_headers=identity,
            removed=frozenset(removed),
            removed_untrusted=frozenset(removed | _SPOOFABLE),
            removed_dashed=frozenset(name.replace("_", "-") for name in removed),
            removed_has_underscore=any("_" in name for name in removed),
            credential_source=token.source if remove else None,
            credential_name=token.name,
        )

    def target(self, raw_path: str, raw_query: str) -> URL:
        return URL(f"{self.origin}{self.target_path(raw_path, raw_query)}", encoded=True)

    def target_path(self, raw_path: str, raw_query: str) -> str:
        """The upstream request-target: base path, the (stripped) raw path and the raw query."""
        path = raw_path
        if self.strip_prefix:
            if _under(path, self.strip_prefix):
                path = path[len(self.strip_prefix.rstrip("/")) :] or "/"
            elif ("%" in path or ";" in path) and _under(without_parameters(unquote(path)), self.strip_prefix):
                # Routed as under the prefix (matching reads the path decoded, without parameters), but spelt
                # otherwise: forwarded unstripped, /%69nternal/a would reach the upstream as /internal/a.
                raise errors.InvalidRequest("the path spells the prefix to strip percent-encoded or with parameters")
        query = raw_query
        if query and self.credential_source == "query":
            # Drop only the credential's pairs and keep the others byte for byte: decoding and re-encoding the
            # whole query (parse_qsl + urlencode) changed %20 into +, `flag` into `flag=`, and so on.
            query = "&".join(pair for pair in query.split("&") if _query_key(pair) != self.credential_name)
        return f"{self.base_path}{path}{'?' + query if query else ''}"

    def headers(
        self, request: RequestView, identity: Identity | None, via_proxy: bool = False
    ) -> list[tuple[str, str]]:
        """The request's headers as forwarded, in order. A list, not a CIMultiDict (which cost ~5 % of a request):
        every name set here is one `removed` took out of the client's headers, and identity header names are
        unique and never one of these (config checks both), so nothing needs replacing.

        From a trusted proxy (`via_proxy`) its X-Forwarded-Proto and -Host are passed on (it terminated TLS, it saw
        the Host), and the other forwarding headers it sent; from anyone else those are the client's to forge, so
        Forwarded, X-Forwarded-Port/-Prefix and X-Real-IP are removed and -Proto/-Host are the gateway's own."""
        connection_named = {
            token.strip().lower() for value in request.headers.getall("Connection", ()) for token in value.split(",")
        }
        out: list[tuple[str, str]] = []
        removed = self.removed if via_proxy else self.removed_untrusted
        for name, value in request.headers.items():
            lower = name.lower()
            if lower in removed or lower in connection_named:
                continue  # X-Forwarded-For among them: re-added below with this hop appended
            if ("_" in lower or self.removed_has_underscore) and lower.replace("_", "-") in self.removed_dashed:
                continue  # X_Auth_Subject: an upstream mapping names CGI-style (HTTP_X_AUTH_SUBJECT) would take it
            if lower == "cookie" and self.credential_source == "cookie":
                value = _without_cookie(value, self.credential_name or "")
                if not value:
                    continue
            out.append((name, value))
        if self.preserve_host and request.host:
            out.append(("Host", request.host))
        prior = ", ".join(request.headers.getall("X-Forwarded-For", ()))
        remote = request.remote or ""
        out.append(("X-Forwarded-For", f"{prior}, {remote}" if prior else remote))
        proto = (via_proxy and request.headers.get("X-Forwarded-Proto")) or request.scheme
        out.append(("X-Forwarded-Proto", proto))
        host = (via_proxy and request.headers.get("X-Forwarded-Host")) or request.host
        if host:  # an HTTP/1.0 request may come without Host
            out.append(("X-Forwarded-Host", host))
        if identity is not None:
            for header, claim in self.identity_headers:
                text = identity.claim_text(claim)
                # A claim with control characters cannot be a header value (CR/LF would split it; NUL and the
                # rest made the HTTP client raise: a 500 for a valid token). The header is left out instead.
                if text is not None and not _CONTROL_CHARS.search(text):
                    out.append((header, text))
        return out


def _query_key(pair: str) -> str:
    """The decoded name of one raw `name=value` query pair (as parse_qsl would decode it)."""
    return unquote_plus(pair.partition("=")[0])


def _without_cookie(header: str, name: str) -> str:
    """The Cookie header without the credential's pairs; every other pair is kept byte for byte (RFC 6265 §4.2:
    pairs are separated by ';'). A parser such as SimpleCookie would drop everything it cannot parse."""
    pairs = (pair.strip() for pair in header.split(";"))
    return "; ".join(pair for pair in pairs if pair and pair.partition("=")[0].strip() != name)


async def forward(
    request: Request,
    pools: upstream_client.Pools,
    upstream: Upstream,
    identity: Identity | None,
    observe: Callable[[float], None] | None = None,
    via_proxy: bool = False,
) -> None:
    """Send the request upstream and relay the answer; raise UpstreamUnavailable / UpstreamTimeout before any byte
    is answered. `observe` gets the seconds the upstream took to answer with headers; `via_proxy`: the peer is one
    of listen.trusted_proxies."""
    headers = upstream.headers(request, identity, via_proxy)
    # The client holds its body back until told to send it (RFC 9110 §10.1.1); nothing else would tell it (curl
    # waits a second per upload, others for ever). Said only now, once the token has been judged, so a refused
    # upload never crosses the network.
    request.send_continue()
    body = request.body.chunks() if request.body is not None else None
    started = time.perf_counter()
    answer, release = await _send(request, pools, upstream, headers, body)
    if observe is not None:
        observe(time.perf_counter() - started)
    try:
        await _relay(request, answer)
    finally:
        release()


async def _send(
    request: Request,
    pools: upstream_client.Pools,
    upstream: Upstream,
    headers: list[tuple[str, str]],
    body: AsyncIterator[bytes] | None,
) -> tuple[upstream_client.Response, Callable[[], None]]:
    pool = pools.get(upstream.scheme, upstream.host, upstream.port)
    # `headers` is this request's own list, sent once: Host and framing are added to it here.
    if not (upstream.preserve_host and request.host):  # without a Host of the client's, the upstream's own
        headers.append(("Host", upstream.netloc))
    chunked = body is not None and not any(name.lower() == "content-length" for name, _ in headers)
    if chunked:
        headers.append(("Transfer-Encoding", "chunked"))  # the client's own framing is hop-by-hop and was removed
    head = upstream_client.encode_head(
        request.method, upstream.target_path(request.raw_path, request.raw_query), headers
    )
    try:
        connection, answer = await upstream_client.request(
            pool, head, body, chunked, upstream.connect_timeout, upstream.timeout, upstream.idle_timeout
        )
    except upstream_client.UpstreamFailed as exc:
        log.warning("upstream request failed", extra={"upstream": upstream.origin, "error": str(exc)})
        raise errors.UpstreamUnavailable() from None
    except (TimeoutError, upstream_client.UpstreamTimedOut):  # BodyStalled is a TimeoutError
        if request.body is not None and request.body.starved:
            raise errors.RequestBodyTimeout() from None  # waiting on the client's body, not on the upstream
        raise errors.UpstreamTimeout() from None
    return answer, connection.abandon


async def _relay(request: Request, answer: upstream_client.Response) -> None:
    headers: list[tuple[str, str]] = []
    named: set[str] = set()  # headers the upstream's Connection header names are hop-by-hop too
    dated = False
    for name, value in answer.headers:
        lower = name.lower()
        if lower == "connection":
            named.update(token.strip().lower() for token in value.split(","))
        elif lower not in HOP_BY_HOP and lower != "content-length":
            headers.append((name, value))
            dated = dated or lower == "date"
    if named:
        headers = [(name, value) for name, value in headers if name.lower() not in named]
    length = answer.content_length
    if request.method == "HEAD" or answer.status in _NO_BODY_STATUSES:
        if request.method != "HEAD":
            await _read(answer)  # nothing follows a 204/304 head: read to its end, the connection is reused
        # A 204 has no Content-Length (RFC 9110 §8.6); a 304's, or a HEAD answer's, tells the representation's.
        request.respond_bodyless(answer.status, answer.reason, headers, None if answer.status == 204 else length, dated)
        return
    if length is not None and length <= _SMALL_BODY:
        request.respond(answer.status, answer.reason, headers, await _read(answer), dated)
        return
    request.start(answer.status, answer.reason, headers, length, dated)
    try:
        async for chunk in answer.chunks():
            await request.write(chunk)  # waits while the client's socket buffer is full: memory stays flat
    except BaseException as exc:
        # The status line is out, so no error status can be sent. Closing the connection short of the final
        # chunk (or of Content-Length) is how HTTP/1.1 tells the client the answer is incomplete.
        request.abort()
        if isinstance(exc, upstream_client.UpstreamFailed):
            log.warning("upstream broke off its answer", extra={"error": str(exc)})
            raise errors.UpstreamUnavailable("the upstream broke off its answer") from None
        if isinstance(exc, upstream_client.UpstreamTimedOut):
            log.warning("upstream stalled", extra={"error": str(exc)})
            raise errors.UpstreamTimeout() from None
        raise
    request.finish()


async def _read(answer: upstream_client.Response) -> bytes:
    try:
        return await answer.read()
    except upstream_client.UpstreamFailed as exc:  # nothing sent yet: a clean 502
        log.warning("upstream broke off its answer", extra={"error": str(exc)})
        raise errors.UpstreamUnavailable("the upstream broke off its answer") from None
    except upstream_client.UpstreamTimedOut as exc:  # nothing sent yet: a clean 504
        log.warning("upstream stalled", extra={"error": str(exc)})
        raise errors.UpstreamTimeout() from None


# Forwarding headers other than the X-Forwarded-* the gateway sets: believed only from listen.trusted_proxies.
_SPOOFABLE = frozenset({"forwarded", "x-forwarded-port", "x-forwarded-prefix", "x-forwarded-server", "x-real-ip"})


def _under(path: str, prefix: str) -> bool:
    bare = prefix.rstrip("/")
    return path == prefix or path == bare or path.startswith(bare + "/")
