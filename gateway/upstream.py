"""A lean HTTP/1.1 client for upstreams: pooled keep-alive connections, responses parsed by httptools (llhttp).

Why not aiohttp's client here: on this path it cost ~200 µs of CPU per request (request/response objects,
timers, header normalisation), four times the whole aiohttp server side. This client does one write for a
bodyless request and parses with llhttp, the parser uvicorn and node use. aiohttp's client still serves what
this one leaves out: WebSocket upgrades (websocket.py). An answer to HEAD
ends with its head (llhttp cannot be told so, and would wait for the body its Content-Length announces): its
connection is then closed, not reused.

Flow control both ways: request bodies wait for the upstream socket to drain; response bodies pause reading
from the upstream while more than BUFFER_LIMIT bytes wait for the client.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl
from collections.abc import AsyncIterator, Iterable
from typing import Any, cast

import httptools

BUFFER_LIMIT = 256 * 1024
MAX_HEAD_BYTES = 64 * 1024  # an upstream answer's head, at most (a client's is listen.max_header_bytes)
_MAX_IDLE = 256  # idle connections kept per upstream origin


class UpstreamFailed(Exception):
    """The upstream could not be reached, or broke the protocol, before answering with headers."""


class UpstreamTimedOut(Exception):
    """No answer (status and headers) within the request's time limit, or silence longer than the idle limit while
    its body streams; the connection was closed."""


class BodyStalled(TimeoutError):
    """Sending the request body: neither the client's next chunk nor the upstream's readiness to take it came within
    the idle limit."""


class Response:
    """Status and headers as soon as they arrive; the body is read with `chunks()` (or `read()`)."""

    def __init__(self, connection: Connection) -> None:
        self.status = 0
        self.reason = ""
        self.headers: list[tuple[str, str]] = []
        self.content_length: int | None = None
        self.chunked = False
        self._connection = connection

    async def chunks(self) -> AsyncIterator[bytes]:
        while (chunk := await self._connection.next_chunk()) is not None:
            yield chunk

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])


class Connection(asyncio.Protocol):
    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: Response | None = None
        self.reused = False
        self._headers_ready: asyncio.Future[Response] | None = None
        self._body: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._body_done = False
        self._body_waiter: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._keep_alive = False
        self.closed = False
        self._keep_alive_vetoed = False  # a request body was cut short, or the answer was to HEAD: no reuse
        self._head_bytes = 0  # read while the answer's head (and interim 1xx heads) was incomplete
        self._head_parsed = 0  # of the header fields parsed: a whole head can come in one read
        self.received = False  # any byte of an answer to the request under way
        self._to_head = False  # the request is HEAD: the answer has no body, whatever its head announces
        self.done = False  # the whole response was read (the connection went back to the pool, or closed)
        self.idle_timeout: float | None = None  # the longest silence while a body streams, either way

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is not an asyncio.Transport subclass, so no isinstance check).
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:  # small writes go out at once instead of waiting for an ACK (Nagle)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.received = True
        if self._headers_ready is None:
            # Nothing asked (idle in the pool, or not yet used): what comes is no answer of ours, and kept it would
            # be read as the start of the next request's answer, another client's.
            self.close()
            return
        try:
            self.parser.feed_data(data)
            if not self._headers_ready.done():
                self._head_bytes += len(data)
                if self._head_bytes > MAX_HEAD_BYTES:  # nginx: "upstream sent too big header"
                    raise UpstreamFailed(f"the answer's head is over {MAX_HEAD_BYTES} bytes")
        except UpstreamFailed as exc:
            self._fail(exc)
            self.close()
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            if self._body_done:
                # The answer was whole before what failed (bytes past its end, a second answer): nginx's "upstream
                # sent more data than specified". The answer stands; the connection, out of step, is dropped.
                self._keep_alive = False
            else:  # a callback's own error comes wrapped, the original as its context
                cause = exc.__context__ if isinstance(exc, httptools.HttpParserCallbackError) else None
                self._fail(cause if isinstance(cause, UpstreamFailed) else UpstreamFailed(f"invalid HTTP: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        response = self.response
        if self._body_done:
            pass  # the answer was whole
        elif exc is None and response is not None and response.status >= 200 and response.content_length is None \
                and not response.chunked:  # fmt: skip
            self._body_done = True  # no length and not chunked: the body ends with the connection (RFC 9112 §6.3)
            self._wake_body()
        else:  # closed or reset before the answer's head, or its framed end, was in
            self._fail(UpstreamFailed("the upstream closed the connection"))
        if self._writable is not None and not self._writable.done():
            self._writable.set_exception(UpstreamFailed("the upstream closed the connection"))
            self._writable.exception()  # retrieved: _send_body may have stopped waiting on it (an answer came)

    def pause_writing(self) -> None:
        self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    # httptools callbacks
    def on_message_begin(self) -> None:
        if self._body_done:  # a second answer to one request: never relayed as part of the first, nor kept
            raise UpstreamFailed("the upstream sent more than one answer")
        self.response = Response(self)

    def on_status(self, status: bytes) -> None:
        assert self.response is not None  # noqa: S101 - on_message_begin came first
        self.response.reason = status.decode("utf-8", "surrogateescape")

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.response is not None  # noqa: S101
        if self.response.status:
            return  # a trailer field, after the body: not merged into the header section (RFC 9110 §6.5.1)
        self._head_parsed += len(name) + len(value) + 4
        if self._head_parsed > MAX_HEAD_BYTES:
            raise UpstreamFailed(f"the answer's head is over {MAX_HEAD_BYTES} bytes")
        # As aiohttp's own parser decodes them, so the bytes pass through the server side unchanged.
        text = value.decode("utf-8", "surrogateescape")
        if len(name) in (14, 17):  # only then can it be Content-Length or Transfer-Encoding
            lower = name.lower()
            if lower == b"content-length" and text.isdigit():
                self.response.content_length = int(text)
            elif lower == b"transfer-encoding" and not self._to_head:  # a HEAD answer has no body to decode
                if text.strip().lower() != "chunked":
                    # Another coding (gzip, chunked) could not be passed on: the gateway re-frames the body itself.
                    raise UpstreamFailed(f"unsupported transfer coding {text!r}")
                self.response.chunked = True
        self.response.headers.append((name.decode("utf-8", "surrogateescape"), text))

    def on_headers_complete(self) -> None:
        assert self.response is not None  # noqa: S101
        self.response.status = self.parser.get_status_code()
        if self.response.status < 200:
            return  # 100 Continue, 103 Early Hints: interim; the real answer follows on this connection
        if self._to_head:  # done: a stray body, or the parser's wait for the announced one, ends with the connection
            self._body_done = True
            self._keep_alive_vetoed = True
        if self._headers_ready is not None and not self._headers_ready.done():
            self._headers_ready.set_result(self.response)

    def on_body(self, body: bytes) -> None:
        if self._to_head:
            return
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered > BUFFER_LIMIT and self.transport is not None:
            self.transport.pause_reading()
        self._wake_body()

    def on_message_complete(self) -> None:
        if self.response is not None and self.response.status < 200:
            return
        self._keep_alive = self.parser.should_keep_alive()
        self._body_done = True
        self._wake_body()

    # used by `request`
    async def send(
        self,
        head: bytes,
        body: AsyncIterator[bytes] | None,
        chunked: bool,
        answer_within: float | None = None,
        idle_timeout: float | None = None,
    ) -> Response:
        """Write the request; return once the answer's headers are in: UpstreamTimedOut when they have not come
        `answer_within` seconds after the request was sent (its body included, as Envoy times a route). A body is sent
        with `idle_timeout` as the longest wait for each chunk, from the client or into the upstream (BodyStalled),
        and the answer's body is read with it as the longest silence (UpstreamTimedOut). A timer on this
        connection costs a fraction of `asyncio.timeout` (which measured 6.7 µs per request)."""
        assert self.transport is not None  # noqa: S101 - connected by the pool
        self.done = False
        self.idle_timeout = idle_timeout
        loop = asyncio.get_running_loop()
        self._headers_ready = loop.create_future()
        self._head_bytes = self._head_parsed = 0
        self.received = False
        self._to_head = head.startswith(b"HEAD ")
        self.transport.write(head)
        if body is not None:
            await self._send_body(body, chunked)
        if answer_within is None:
            return await self._headers_ready
        timer = loop.call_later(answer_within, self._time_out)
        try:
            return await self._headers_ready
        finally:
            timer.cancel()

    async def _send_body(self, body: AsyncIterator[bytes], chunked: bool) -> None:
        """Write the body to its end, unless the upstream refuses it first (413, 401: an answer of 400 or more) or
        goes away: whether waiting on the client's next chunk or on the upstream's socket, the answer is watched
        for too, and then the rest is not sent. An earlier answer below 400 does not stop the body (RFC 9112 §9.3).
        A body cut short leaves the connection unusable for another request."""
        assert self.transport is not None and self._headers_ready is not None  # noqa: S101 - set by send
        answered: asyncio.Future[Response] | None = self._headers_ready  # None: an answer below 400 came
        chunks = aiter(body)
        while True:
            step: asyncio.Future[bytes] = asyncio.ensure_future(anext(chunks))
            try:
                while not step.done():
                    await self._wait(step, answered)
                    if _refused(answered) or self.transport.is_closing():
                        if step.done():
                            step.exception()  # retrieved, whatever it holds (StopAsyncIteration: the body ended)
                        self._keep_alive_vetoed = True
                        return
                    if answered is not None and answered.done():
                        answered = None  # below 400: the body goes on, and the answer is no longer watched for
            finally:
                if not step.done():
                    step.cancel()
            try:
                chunk = step.result()
            except StopAsyncIteration:
                break
            if chunk:
                self.transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
            writable = self._writable
            if writable is not None:
                await self._wait(writable, answered)
                if _refused(answered):
                    self._keep_alive_vetoed = True
                    return
                if writable.done():
                    writable.result()  # UpstreamFailed: the upstream went away without an answer
        if chunked:
            self.transport.write(b"0\r\n\r\n")

    async def _wait(self, step: asyncio.Future[Any], answered: asyncio.Future[Response] | None) -> None:
        """Until `step` or the answer, for at most idle_timeout: BodyStalled past it."""
        waiting = (step,) if answered is None else (step, answered)
        done, _ = await asyncio.wait(waiting, timeout=self.idle_timeout, return_when=asyncio.FIRST_COMPLETED)
        if not done:
            raise BodyStalled()

    def _time_out(self) -> None:
        self._fail(UpstreamTimedOut("no answer in time"))
        self.close()

    def _stalled(self) -> None:
        self._fail(UpstreamTimedOut(f"the answer's body stalled for {self.idle_timeout:g} s"))
        self.close()

    async def next_chunk(self) -> bytes | None:
        while not self._body:
            if self._error is not None:
                raise self._error
            if self._body_done:
                self._finish()
                return None
            loop = asyncio.get_running_loop()
            self._body_waiter = loop.create_future()
            if self.idle_timeout is None:
                await self._body_waiter
                continue
            # Only when nothing is buffered: an answer that came whole costs no timer.
            timer = loop.call_later(self.idle_timeout, self._stalled)
            try:
                await self._body_waiter
            finally:
                timer.cancel()
        chunk = self._body.popleft()
        self._buffered -= len(chunk)
        if self._buffered <= BUFFER_LIMIT // 2 and self.transport is not None and not self.closed:
            self.transport.resume_reading()
        return chunk

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abandon(self) -> None:
        """The caller stops before the end of the response (error, client gone): the connection cannot be reused."""
        if not self.done:
            self.close()

    def _finish(self) -> None:
        """The whole response was read: back to the pool if both sides allow keep-alive."""
        self.done = True
        if self._keep_alive and not self._keep_alive_vetoed and not self.closed:
            self.response = None
            self._body_done = False
            self._headers_ready = None
            self.reused = True
            self.pool.put(self)
        else:
            self.close()

    def _fail(self, error: BaseException) -> None:
        self._error = error
        if self._headers_ready is not None and not self._headers_ready.done():
            self._headers_ready.set_exception(error)
            # Nobody may await it (the client's body broke off while being sent): not an unretrieved exception.
            self._headers_ready.exception()
        self._wake_body()

    def _wake_body(self) -> None:
        if self._body_waiter is not None and not self._body_waiter.done():
            self._body_waiter.set_result(None)


def _refused(answered: asyncio.Future[Response] | None) -> bool:
    """The upstream refused the body: it answered 400 or more, or failed."""
    return (
        answered is not None
        and answered.done()
        and (answered.exception() is not None or answered.result().status >= 400)
    )


class Pools:
    """One Pool per upstream origin, shared by every route and kept across config reloads."""

    def __init__(self) -> None:
        self._pools: dict[tuple[str, str, int], Pool] = {}
        self._tls: ssl.SSLContext | None = None

    def get(self, scheme: str, host: str, port: int) -> Pool:
        key = (scheme, host, port)
        pool = self._pools.get(key)
        if pool is None:
            if scheme == "https" and self._tls is None:
                self._tls = ssl.create_default_context()
            pool = self._pools[key] = Pool(host, port, self._tls if scheme == "https" else None)
        return pool

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()


class Pool:
    """Keep-alive connections to one upstream origin."""

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None) -> None:
        self.host, self.port, self.tls = host, port, tls
        self._idle: collections.deque[Connection] = collections.deque()

    async def connect(self, connect_timeout: float) -> Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(connect_timeout):
                _, connection = await loop.create_connection(
                    lambda: Connection(self), self.host, self.port, ssl=self.tls,
                    server_hostname=self.host if self.tls else None,
                )  # fmt: skip
        except TimeoutError:
            raise UpstreamFailed(f"connecting to {self.host}:{self.port} timed out") from None
        except OSError as exc:
            raise UpstreamFailed(f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc}") from None
        return connection

    def get_idle(self) -> Connection | None:
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed:
                return connection
        return None

    def put(self, connection: Connection) -> None:
        if len(self._idle) < _MAX_IDLE:
            self._idle.append(connection)
        else:
            connection.close()

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()


# RFC 9110 §9.2.2
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


async def request(
    pool: Pool,
    head: bytes,
    body: AsyncIterator[bytes] | None,
    chunked: bool,
    connect_timeout: float,
    answer_within: float | None = None,
    idle_timeout: float | None = None,
) -> tuple[Connection, Response]:
    """Send one request; returns once the response headers are in. The caller reads the body, or closes.

    `answer_within` bounds the wait for the answer once the request is sent, `idle_timeout` each wait while a body
    streams (Connection.send)."""
    connection = pool.get_idle()
    if connection is not None:
        try:
            return connection, await connection.send(head, body, chunked, answer_within, idle_timeout)
        except UpstreamFailed:
            connection.close()
            # A kept-alive connection the upstream had just closed, unanswered: retried only without a body and for
            # an idempotent method, as the upstream may have acted on it (RFC 9112 §9.3.1; nginx does the same).
            if connection.received or body is not None or head.partition(b" ")[0] not in _IDEMPOTENT:
                raise
        except BaseException:  # the client's body broke off, or the client went away: a half-sent request
            connection.close()
            raise
    if answer_within is not None:
        connect_timeout = min(connect_timeout, answer_within)
    connection = await pool.connect(connect_timeout)
    try:
        return connection, await connection.send(head, body, chunked, answer_within, idle_timeout)
    except BaseException:
        connection.close()
        raise


def encode_head(method: str, target: str, headers: Iterable[tuple[str, str]], version: str = "1.1") -> bytes:
    lines = [f"{method} {target} HTTP/{version}"]
    lines.extend(f"{name}: {value}" for name, value in headers)
    # aiohttp decoded the client's headers as UTF-8 with surrogateescape: this gives back the very bytes it sent.
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")
