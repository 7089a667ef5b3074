"""The proxy listener: HTTP/1.1 served straight off httptools (llhttp, the parser upstream.py uses for answers).

Why not aiohttp's server here: per request it builds a message, a request, a response and a payload writer, and
that cost ~15 µs of the ~25 µs a bare aiohttp server spends answering on this machine (a bare llhttp protocol:
~10 µs), on every request the gateway serves. aiohttp still serves WebSocket upgrades: such a connection is
handed to its RequestHandler, with the request head replayed, and stays with it.

One request is served at a time per connection; pipelined requests wait their turn with reading paused. Request
bodies stream with flow control (reading pauses while BODY_LIMIT bytes wait for the upstream); answers wait for
the client's socket to drain. A connection is closed when idle (no request under way) for `listen.idle_timeout`,
counted from its opening or its last answer: that also ends clients that trickle a request head in. One whose
client stops reading is aborted once its answer could not be sent on for `listen.send_timeout`, none of it taken.
A client's FIN is taken as its leaving, as nginx takes it by default: the request under way is cancelled and its
upstream request dropped. TCP cannot tell a half-close from a departure, so a client that half-closes after its
request gets no answer; the other way, every departed client's slow upstream request would run to its end.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import re
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from email.utils import formatdate
from http import HTTPStatus
from typing import Protocol, cast

import httptools
from aiohttp import web
from multidict import CIMultiDict, MultiDictProxy, MultiMapping
from yarl import URL

from gateway import errors, websocket
from gateway.upstream import encode_head

try:  # Linux's SIOCOUTQ has TIOCOUTQ's number; elsewhere the kernel's send queue is not counted
    import fcntl
    import termios

    _SIOCOUTQ: int | None = termios.TIOCOUTQ
except (ImportError, AttributeError):  # pragma: no cover - not Linux
    _SIOCOUTQ = None

log = logging.getLogger(__name__)

BODY_LIMIT = 256 * 1024  # request body bytes buffered before reading from the client pauses
_HEAD_LINES_FACTOR = 8  # a whole request head may be 8 × max_header_bytes
_NO_BODY_STATUSES = frozenset({204, 304})
_LINGER_SECONDS = 2.0  # after an answer that ends a connection early, how long the client's late bytes are read
_LINGER_BYTES = 16 * 1024 * 1024  # ... and how many, at most
MAX_HEADERS = 128  # per request head, as aiohttp's server (more: 431)
# Headers a request may carry once (aiohttp's list, less those llhttp already checks), lower-case.
_SINGLETONS = frozenset(
    {b"host", b"content-location", b"content-range", b"content-type", b"etag", b"max-forwards", b"user-agent"}
)


class RequestView(Protocol):
    """What judging and forwarding read of a request: met by `Request` and by aiohttp's (WebSocket upgrades)."""

    @property
    def method(self) -> str: ...
    @property
    def host(self) -> str: ...
    @property
    def path(self) -> str: ...  # percent-decoded, for routing
    @property
    def remote(self) -> str | None: ...
    @property
    def scheme(self) -> str: ...
    @property
    def headers(self) -> MultiMapping[str]: ...
    @property
    def cookies(self) -> Mapping[str, str]: ...
    @property
    def query(self) -> MultiMapping[str]: ...


def _kernel_send_queue(fd: int) -> int:
    """Bytes a socket's kernel send queue holds that the peer has not acknowledged (Linux: SIOCOUTQ); 0 where the
    kernel cannot say (then only the transport's buffer is counted)."""
    if fd < 0 or _SIOCOUTQ is None:
        return 0
    try:
        return int(struct.unpack("i", fcntl.ioctl(fd, _SIOCOUTQ, b"\0\0\0\0"))[0])
    except OSError:
        return 0


class HeadTooLarge(Exception):
    """A request line or header line over the configured limit."""


class TargetTooLarge(HeadTooLarge):
    """A request target over the configured limit (414, not 431)."""


class Body:
    """A request body as it arrives: `chunks()` yields it once, waiting for the client as needed."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self.complete = False
        self.expect_continue = False  # the client waits for "100 Continue" before it sends the body
        self.starved = False  # everything received was taken and more is awaited from the client (not the upstream)

    def feed(self, data: bytes) -> None:
        self.starved = False
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > BODY_LIMIT:
            self._connection.hold_reading("body", True)
        self._wake()

    def finish(self) -> None:
        self.complete = True
        self._wake()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._wake()

    async def chunks(self) -> AsyncIterator[bytes]:
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                if self._buffered <= BODY_LIMIT // 2:
                    self._connection.hold_reading("body", False)
                yield chunk
                continue
            if self._error is not None:
                raise self._error
            if self.complete:
                return
            self.starved = True
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter

    def discard(self) -> None:
        """Drop what was not read (the answer is out): reading from the client goes on."""
        self._chunks.clear()
        self._buffered = 0
        self._connection.hold_reading("body", False)

    async def read(self, limit: int) -> bytes | None:
        """The whole body, or None when it is longer than `limit`."""
        data = bytearray()
        async for chunk in self.chunks():
            data += chunk
            if len(data) > limit:
                return None
        return bytes(data)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class Request:
    """One request on the proxy listener, and the way its answer is written."""

    scheme = "http"

    def __init__(
        self,
        connection: Connection,
        method: str,
        version: str,
        target: str,
        headers: CIMultiDict[str],
        keep_alive: bool,
    ) -> None:
        self.method = method
        self.version = version
        self.headers = headers
        self.remote = connection.remote
        self.host = headers.get("Host", "")
        self.keep_alive = keep_alive
        self.body: Body | None = None
        self.status = 0  # of the answer, once begun
        self.finished = False
        self._connection = connection
        self._chunked = False
        self._query: MultiDictProxy[str] | None = None
        self.raw_path, self.raw_query, authority = _split_target(target, method)
        if authority is not None:  # absolute-form: its authority is the host, whatever Host says (RFC 9112 §3.2.2)
            self.host = authority
        # Routing sees the percent-decoded path, as aiohttp (yarl) decodes it.
        self.path = self.raw_path if "%" not in self.raw_path else URL.build(path=self.raw_path, encoded=True).path

    @property
    def query(self) -> MultiDictProxy[str]:
        if self._query is None:
            self._query = URL.build(query_string=self.raw_query, encoded=True).query
        return self._query

    @property
    def cookies(self) -> Mapping[str, str]:
        """RFC 6265 §5.4 pairs of the Cookie header(s); a quoted value is unquoted; the last of a name wins."""
        found: dict[str, str] = {}
        for header in self.headers.getall("Cookie", ()):
            for pair in header.split(";"):
                name, sep, value = pair.partition("=")
                if sep and name.strip():
                    value = value.strip()
                    if len(value) >= 2 and value[0] == value[-1] == '"':
                        value = value[1:-1]
                    found[name.strip()] = value
        return found

    @property
    def started(self) -> bool:
        return self.status != 0

    @property
    def client_gone(self) -> bool:
        return self._connection.lost

    def send_continue(self) -> None:
        """Tell a client that waits with its body (Expect: 100-continue) to send it."""
        if self.body is not None and self.body.expect_continue and not self.body.complete:
            self.body.expect_continue = False
            self._connection.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def respond(
        self, status: int, reason: str, headers: Iterable[tuple[str, str]], body: bytes = b"", dated: bool = False
    ) -> None:
        """A whole answer in one write (no body sent for HEAD, 204 and 304). `dated`: it has a Date header."""
        bodyless = self.method == "HEAD" or status in _NO_BODY_STATUSES
        head = self._head(status, reason, headers, None if status in _NO_BODY_STATUSES else len(body), dated)
        self._connection.write(head if bodyless else head + body)
        self.finished = True

    def respond_bodyless(
        self, status: int, reason: str, headers: Iterable[tuple[str, str]], length: int | None, dated: bool
    ) -> None:
        """A relayed answer without a body (to HEAD, or 204/304), announcing the upstream's length if it gave one."""
        self._connection.write(self._head(status, reason, headers, length, dated))
        self.finished = True

    def send(self, response: web.Response) -> None:
        """An answer built as an aiohttp Response (errors, the OAuth endpoints)."""
        body = response.body
        self.respond(
            response.status, response.reason, response.headers.items(), body if isinstance(body, bytes) else b""
        )

    def start(
        self, status: int, reason: str, headers: Iterable[tuple[str, str]], length: int | None, dated: bool
    ) -> None:
        """Begin a streamed answer: without a length it is chunked (HTTP/1.1) or ends with the connection (1.0)."""
        if length is None and self.method != "HEAD":
            if self.version == "1.1":
                self._chunked = True
            else:
                self.keep_alive = False
        self._connection.write(self._head(status, reason, headers, length, dated))

    async def write(self, chunk: bytes) -> None:
        if not chunk or self.method == "HEAD":
            return
        self._connection.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if self._chunked else chunk)
        await self._connection.drained()

    def finish(self) -> None:
        if self._chunked:
            self._connection.write(b"0\r\n\r\n")
        self.finished = True

    def abort(self) -> None:
        """Cut the connection short of the answer's end: how HTTP/1.1 says the answer is incomplete."""
        self.keep_alive = False
        self._connection.close()

    def _head(
        self, status: int, reason: str, headers: Iterable[tuple[str, str]], length: int | None, dated: bool
    ) -> bytes:
        self.status = status
        connection = self._connection
        # An unread body (a refused upload) would be taken for the next request: close after this answer.
        last = connection.closing and not connection.queued and connection.refusal is None
        if last or (self.body is not None and not self.body.complete):
            self.keep_alive = False
        lines = [f"HTTP/1.1 {status} {reason or _phrase(status)}"]
        lines.extend(f"{name}: {value}" for name, value in headers)
        if not dated:  # RFC 9110 §6.6.1: answers we make, and relayed ones that lack it, get a Date
            lines.append(f"Date: {_http_date()}")
        if length is not None:
            lines.append(f"Content-Length: {length}")
        elif self._chunked:
            lines.append("Transfer-Encoding: chunked")
        if not self.keep_alive:
            lines.append("Connection: close")
        elif self.version == "1.0":
            lines.append("Connection: keep-alive")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")


_date_cache: tuple[int, str] = (0, "")


def _http_date() -> str:
    global _date_cache  # noqa: PLW0603 - one formatted date per second, shared by every answer
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True))
    return _date_cache[1]


# RFC 9112 §3.2: uri-host [":" port]; uri-host an IP-literal (zone ids and IPvFuture too) or a reg-name
_HOST = re.compile(r"(?:\[[0-9A-Za-z:._~%!$&'()*+,;=-]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]*)(?::[0-9]*)?")


def _check_head(headers: CIMultiDict[str], version: str) -> None:
    """What llhttp leaves to us (with on_header's singleton check): the version, Host (RFC 9112 §3.2), and a Transfer-Encoding that does not end in chunked (RFC 9112 §6.3; llhttp finds it only after this head is
    handed on, when the request could already be on its way upstream)."""
    if version not in ("1.1", "1.0"):  # llhttp passes 0.9 and 2.0 too
        raise errors.VersionNotSupported()
    host = headers.get("Host")
    if host is None:
        if version == "1.1":
            raise errors.InvalidRequest("an HTTP/1.1 request needs a Host header")
    elif not _HOST.fullmatch(host):  # it is forwarded as X-Forwarded-Host, which upstreams build links from
        raise errors.InvalidRequest("the Host header is not a host and port")
    codings = ",".join(headers.getall("Transfer-Encoding", ()))
    if codings:
        last = codings.rsplit(",", 1)[-1].strip().lower()
        if last != "chunked":
            raise errors.InvalidRequest("Transfer-Encoding must end in chunked")
        if codings.strip().lower() != "chunked":  # gzip, chunked: the gateway re-frames bodies and would drop gzip
            raise errors.UnsupportedTransferCoding()


def _has_body(headers: CIMultiDict[str]) -> bool:
    return "Transfer-Encoding" in headers or headers.get("Content-Length", "0") not in ("0", "")


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def _split_target(target: str, method: str) -> tuple[str, str, str | None]:
    """(raw path, raw query, authority of an absolute-form target) of a request-target (RFC 9112 §3.2), as
    aiohttp's parser splits it."""
    if method == "CONNECT":  # authority-form: a tunnel, which this proxy does not open
        raise errors.InvalidRequest("CONNECT is not supported")
    if target.startswith("/"):
        path = target.partition("#")[0]
        path, _, query = path.partition("?")
        return path, query, None
    if target == "*" and method == "OPTIONS":
        return "*", "", None
    if "://" in target:  # absolute-form
        try:  # yarl parses the authority lazily: a bad port raises on first use
            url = URL(target, encoded=True)
            if url.raw_host and url.port is not None and _HOST.fullmatch(url.raw_authority):
                return url.raw_path or "/", url.raw_query_string, url.raw_authority
        except ValueError:
            pass
    raise errors.InvalidRequest("malformed request target")


Serve = Callable[[Request], Awaitable[None]]


class Connection(asyncio.Protocol):
    """One client connection of the proxy listener."""

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.remote: str | None = None
        self.lost = False
        self.closing = False  # no request read after those already read (draining, or a malformed one)
        self.idle_since: float | None = None
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._head_bytes = 0
        self._singletons: set[bytes] = set()
        self._parsing: Request | None = None  # the request whose body the parser is reading
        self._trailers = False  # the head is complete: fields now are a chunked body's trailer
        self._current: Request | None = None  # the request being served
        self._queue: collections.deque[Request] = collections.deque()
        self._task: asyncio.Task[None] | None = None
        self._holds: set[str] = set()
        self._writable: asyncio.Future[None] | None = None
        self._stalled_timer: asyncio.TimerHandle | None = None
        self._written = 0  # bytes handed to the transport, ever
        self._stall_taken = 0  # bytes the client had taken when last seen taking some, while writing is paused
        self._progress_at = 0.0  # ... and when that was (loop time)
        self._fd = -1
        self._upgrade: bytes | None = None  # a WebSocket head waiting for the answers before it
        self._broken = False  # the parser failed: nothing more is read
        self.refusal: errors.GatewayError | None = None  # its answer, once the requests read before it are answered
        self._lingering = False  # answered and closing: what the client still sends is read and dropped
        self._lingered = 0
        self._linger_timer: asyncio.TimerHandle | None = None

    # --- asyncio.Protocol -------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.remote = str(peer[0]) if isinstance(peer, (list, tuple)) else None
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._fd = sock.fileno()
        self.idle_since = self.listener.loop.time()
        self.listener.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            self._lingered += len(data)
            if self._lingered > _LINGER_BYTES:
                self.close()
            return
        if self._upgrade is not None:  # the parser stopped at a WebSocket head that waits its turn
            self._upgrade += data
            return
        if self._broken:
            return  # refused already; the connection is closing
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._on_upgrade(data[upgrade.args[0] :])
        except httptools.HttpParserError as exc:
            # A callback's own exception comes wrapped (HttpParserCallbackError), the original as its context.
            cause = exc.__context__ if isinstance(exc, httptools.HttpParserCallbackError) else exc
            self._malformed(cause if isinstance(cause, Exception) else exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        if self._stalled_timer is not None:
            self._stalled_timer.cancel()
        self.listener.forget(self)
        gone = ConnectionResetError("the client closed the connection")
        for request in (self._parsing, self._current, *self._queue):
            if request is not None and request.body is not None:
                request.body.fail(gone)
        if self._writable is not None and not self._writable.done():
            self._writable.set_exception(gone)
        if self._task is not None and not self._task.done():
            self._task.cancel()  # nobody to answer: stop judging, free the upstream connection

    def pause_writing(self) -> None:
        if self._writable is None or self._writable.done():
            self._writable = self.listener.loop.create_future()
        if self._stalled_timer is None:
            self._watch_stall()

    def resume_writing(self) -> None:
        if self._stalled_timer is not None:
            self._stalled_timer.cancel()
            self._stalled_timer = None
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    def _watch_stall(self) -> None:
        """Writing paused: look every quarter of send_timeout whether the client takes any of what waits."""
        self._stall_taken = self._taken()
        self._progress_at = self.listener.loop.time()
        self._stalled_timer = self.listener.loop.call_later(self.listener.send_timeout / 4, self._stalled)

    def _stalled(self) -> None:
        """A client that has taken nothing for send_timeout while writing is paused stopped reading: otherwise it
        would hold this request's task and its upstream connection for as long as it likes, so it is treated as
        gone, within 1.25 × send_timeout of its last progress. A slow reader that takes some is left alone."""
        self._stalled_timer = None
        transport = self.transport
        if transport is None or self.lost or transport.get_protocol() is not self:
            return
        loop = self.listener.loop
        taken = self._taken()
        if taken > self._stall_taken:
            self._stall_taken, self._progress_at = taken, loop.time()
        elif loop.time() - self._progress_at >= self.listener.send_timeout:
            log.info("closing a connection whose client stopped reading", extra={"client": self.remote})
            transport.abort()
            return
        self._stalled_timer = loop.call_later(self.listener.send_timeout / 4, self._stalled)

    def _taken(self) -> int:
        """Bytes the client has acknowledged: all written less the transport's buffer and the kernel's send queue.
        The kernel's queue can hold megabytes that a reader drains before the transport's buffer moves at all."""
        assert self.transport is not None  # noqa: S101 - called while connected
        return self._written - self.transport.get_write_buffer_size() - _kernel_send_queue(self._fd)

    # --- httptools callbacks ----------------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._head_bytes = 0
        self._singletons.clear()
        self._trailers = False

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.listener.max_line:
            raise TargetTooLarge("request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value)
        self._head_bytes += size
        if size > self.listener.max_line or self._head_bytes > self.listener.max_line * _HEAD_LINES_FACTOR:
            raise HeadTooLarge("request header too large")
        if self._trailers:
            # A trailer field of a chunked body: not a header (RFC 9110 §6.5.1), so no "appears once" rule; it is
            # dropped (the upstream request is re-framed), only its size counted.
            return
        if len(self._headers) >= MAX_HEADERS:
            raise HeadTooLarge("too many request headers")
        lower = name.lower()
        if lower in _SINGLETONS:
            if lower in self._singletons:
                raise errors.InvalidRequest(f"{name.decode('latin-1')} appears more than once")
            self._singletons.add(lower)
        # As aiohttp decodes them: upstream.encode_head turns them back into the very bytes the client sent.
        self._headers.append((name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        self._trailers = True  # any field after this head is a trailer
        parser = self.parser
        method = parser.get_method().decode("ascii", "replace")
        headers = CIMultiDict(self._headers)
        _check_head(headers, parser.get_http_version())
        target = self._url.decode("utf-8", "surrogateescape")
        request = Request(self, method, parser.get_http_version(), target, headers, parser.should_keep_alive())
        self._parsing = request
        if parser.should_upgrade():
            return  # decided once the parser stops after this head (data_received: HttpParserUpgrade)
        if _has_body(headers):
            request.body = Body(self)
            # An HTTP/1.0 client would take the interim answer for the final one (RFC 9110 §15.2).
            request.body.expect_continue = (
                request.version == "1.1" and headers.get("Expect", "").lower() == "100-continue"
            )
        self._accept(request)

    def _accept(self, request: Request) -> None:
        if self.closing:
            # Read after the drain began: not answered, nor anything after it (the answer under way says close).
            self.hold_reading("draining", True)
            return
        if self._current is None:
            self._serve(request)
        else:  # pipelined: answered in order, after the one in progress
            self._queue.append(request)
            self.hold_reading("queue", True)

    def on_body(self, body: bytes) -> None:
        if self._parsing is not None and self._parsing.body is not None:
            self._parsing.body.feed(body)

    def on_message_complete(self) -> None:
        if self._parsing is not None and self._parsing.body is not None:
            self._parsing.body.finish()

    # --- serving ----------------------------------------------------------------------------------------------
    def _serve(self, request: Request) -> None:
        self._current = request
        self.idle_since = None
        self._task = self.listener.loop.create_task(self._run(request))

    async def _run(self, request: Request) -> None:
        try:
            await self.listener.serve(request)
        except asyncio.CancelledError:
            return  # the client went away
        except Exception:
            log.exception("unexpected error serving a request")
            if request.started:
                request.abort()
            else:
                request.send(web.json_response(errors.GatewayError().body(), status=500))
        if not request.finished and not self.lost:
            request.abort()  # the answer was begun and never ended
        if self._writable is not None:
            # The next pipelined answer waits until this one has left: a client that pipelines requests and reads
            # slowly cannot pile answers up in the gateway's memory.
            try:
                await self._writable
            except (ConnectionError, asyncio.CancelledError):
                return
        self._done(request)

    def _done(self, request: Request) -> None:
        self._current = None
        if self.lost:
            return
        if request.body is not None:
            request.body.discard()  # answered without reading it all: what arrived must not hold reading paused
        if not request.keep_alive or (self.closing and not self._queue):
            if request.body is not None and not request.body.complete:
                self._linger()  # the rest of a refused upload may still be on its way
            elif request.keep_alive and self.refusal is not None:
                self._refuse(self.refusal)
            else:
                self.close()
            return
        if self._queue:
            if len(self._queue) == 1:
                self.hold_reading("queue", False)
            self._serve(self._queue.popleft())
        elif self._upgrade is not None:
            self._hand_over(self._upgrade)
        else:
            self.idle_since = self.listener.loop.time()

    def _on_upgrade(self, rest: bytes) -> None:
        request = self._parsing
        assert request is not None  # noqa: S101 - an upgrade comes after a head
        if not websocket.is_websocket(request.headers):
            # Another protocol (h2c, ...): Upgrade is optional to honour (RFC 9110 §7.8); answer in HTTP/1.1.
            if _has_body(request.headers):
                self._malformed(errors.InvalidRequest("an Upgrade request cannot carry a body here"))
                return
            self.parser = httptools.HttpRequestParser(self)  # llhttp stops parsing after an upgrade
            self._accept(request)
            if rest:
                self.data_received(rest)
            return
        target = self._url.decode("utf-8", "surrogateescape")
        head = encode_head(request.method, target, self._headers, request.version) + rest
        if self._current is None:
            self._hand_over(head)
        else:
            self._upgrade = head
            self.hold_reading("upgrade", True)

    def _hand_over(self, replay: bytes) -> None:
        """The rest of this connection is aiohttp's (WebSocket): replay what was read, then step aside."""
        assert self.transport is not None  # noqa: S101 - connected
        self.listener.forget(self)
        if self._stalled_timer is not None:
            self._stalled_timer.cancel()
            self._stalled_timer = None
        handler = self.listener.aiohttp_server()
        self.transport.set_protocol(handler)
        handler.connection_made(self.transport)
        if self._writable is not None:  # the answers before still fill the socket: aiohttp must wait for it too
            handler.pause_writing()
        self.transport.resume_reading()
        handler.data_received(replay)

    def _malformed(self, exc: Exception) -> None:
        """A request that cannot be parsed: answer 400 (431 for an oversized head) quoting nothing, and close."""
        known = isinstance(exc, (httptools.HttpParserError, HeadTooLarge, errors.InvalidRequest))
        if not known:
            log.error("request parsing failed", exc_info=exc)
        error: errors.GatewayError
        if isinstance(exc, TargetTooLarge):
            error = errors.TargetTooLong()
        elif isinstance(exc, HeadTooLarge):
            error = errors.HeadersTooLarge()
        elif isinstance(exc, errors.InvalidRequest):
            error = exc
        elif isinstance(exc, httptools.HttpParserInvalidMethodError):  # a method llhttp does not know
            error = errors.MethodNotImplemented()
        elif "Invalid HTTP version" in str(exc):  # llhttp's own words; no error class of its own
            error = errors.VersionNotSupported()
        else:
            error = errors.InvalidRequest("malformed HTTP request") if known else errors.GatewayError()
        log.info(
            "malformed request refused",
            extra={"client": self.remote, "error": type(exc).__name__, "status": error.status},
        )
        self.closing = True
        self._broken = True
        self.hold_reading("malformed", True)
        parsing = self._parsing
        if parsing is not None and parsing.body is not None and not parsing.body.complete:
            # The request whose body broke is the last one read: its own answer is the refusal.
            parsing.body.fail(errors.InvalidRequest("malformed request body"))
        elif self._current is not None:
            # Pipelined behind requests read whole: they are answered first, in order, then this (RFC 9112 §9.3.2).
            self.refusal = error
        if self._current is None:
            self._refuse(error)

    def _refuse(self, error: errors.GatewayError) -> None:
        """Answer a request that could not be read, quoting nothing of it, and close."""
        body = json.dumps(error.body()).encode()
        head = f"HTTP/1.1 {error.status} {_phrase(error.status)}\r\nContent-Type: application/json\r\n"
        self.write(f"{head}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        self._linger()
        if self.listener.refused is not None:
            self.listener.refused(error.status)

    # --- used by Request and Body ----------------------------------------------------------------------------
    @property
    def queued(self) -> bool:
        """Pipelined requests wait behind the one being served."""
        return bool(self._queue)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.lost:
            self._written += len(data)  # before the write: pause_writing may run inside it and count what was taken
            self.transport.write(data)

    async def drained(self) -> None:
        if self._writable is not None:
            await self._writable

    def hold_reading(self, why: str, hold: bool) -> None:
        """Pause reading from the client while any reason holds."""
        if self.transport is None or self.lost:
            return
        before = bool(self._holds)
        if hold:
            self._holds.add(why)
        else:
            self._holds.discard(why)
        if before != bool(self._holds):
            if self._holds:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _linger(self) -> None:
        """Close after an answer while the client may still be sending (a refused upload, a bad head). Closing a
        socket with unread data makes the kernel send a reset, which can destroy the answer before the client has
        read it: so say we are done writing, read and drop what comes for a while, then close."""
        if self.transport is None or self.lost:
            return
        self._lingering = True
        self._holds.clear()
        self.transport.resume_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._linger_timer = self.listener.loop.call_later(_LINGER_SECONDS, self.close)

    def shut_down(self) -> None:
        """Draining: close now if idle, else after the answer under way."""
        self.closing = True
        if self._current is None:
            self.close()


class Listener:
    """The proxy listener's server: accepts connections, sweeps idle ones, drains on stop."""

    def __init__(
        self,
        serve: Serve,
        aiohttp_server: web.Server,
        max_header_bytes: int,
        idle_timeout: float,
        send_timeout: float = 60.0,
        refused: Callable[[int], None] | None = None,
    ) -> None:
        self.serve = serve
        self.refused = refused  # told the status of each request refused before it could be served
        self.aiohttp_server = aiohttp_server  # serves the connections handed over (WebSocket)
        self.max_line = max_header_bytes
        self.idle_timeout = idle_timeout
        self.send_timeout = send_timeout
        self.loop = asyncio.get_running_loop()
        self.connections: set[Connection] = set()
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._all_closed: asyncio.Event | None = None

    async def start(self, host: str, port: int, reuse_port: bool) -> int:
        self._server = await self.loop.create_server(
            lambda: Connection(self), host, port, reuse_port=reuse_port or None, backlog=1024
        )
        self._sweeper = self.loop.create_task(self._sweep(), name="listener-sweep")
        return int(self._server.sockets[0].getsockname()[1])

    def forget(self, connection: Connection) -> None:
        self.connections.discard(connection)
        if not self.connections and self._all_closed is not None:
            self._all_closed.set()

    async def _sweep(self) -> None:
        # A sweep rather than a timer per connection: no timer to arm and cancel on every request.
        while True:
            await asyncio.sleep(min(5.0, max(0.25, self.idle_timeout / 4)))
            deadline = self.loop.time() - self.idle_timeout
            for connection in list(self.connections):
                if connection.idle_since is not None and connection.idle_since < deadline:
                    connection.close()

    async def stop(self, drain_seconds: float) -> None:
        """Stop accepting; let answers under way finish for up to `drain_seconds`, closing each connection after
        its answer; then cut what is left."""
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        # WebSocket connections (aiohttp's) drain alongside, within the same time.
        await asyncio.gather(self._drain(drain_seconds), self.aiohttp_server.shutdown(drain_seconds))
        if self._server is not None:
            await self._server.wait_closed()

    async def _drain(self, drain_seconds: float) -> None:
        self._all_closed = asyncio.Event()
        for connection in list(self.connections):
            connection.shut_down()
        if self.connections:
            try:
                await asyncio.wait_for(self._all_closed.wait(), drain_seconds)
            except TimeoutError:
                log.warning(
                    "drain timeout: closing connections with answers under way", extra={"left": len(self.connections)}
                )
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.abort()
