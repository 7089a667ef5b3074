"""The lean upstream client against real sockets: keep-alive reuse, stale connections, framing, flow control."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from gateway import upstream

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """A TCP server on 127.0.0.1 that answers with whatever bytes the test scripts; counts connections."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.script(reader, writer)
        finally:
            writer.close()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


def head(path: str = "/") -> bytes:
    return upstream.encode_head("GET", path, [("Host", "x")])


async def fetch(pool: upstream.Pool, body: AsyncIterator[bytes] | None = None) -> tuple[int, bytes]:
    connection, response = await upstream.request(pool, head(), body, chunked=body is not None, connect_timeout=2)
    return response.status, await response.read()


async def test_keep_alive_connection_is_reused() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(3):
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    async with RawServer(script) as server:
        pool = upstream.Pool("127.0.0.1", server.port, None)
        for _ in range(3):
            assert await fetch(pool) == (200, b"ok")
        assert server.connections == 1
        pool.close()


async def test_connection_close_is_not_reused_and_eof_ends_an_unframed_body() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end")

    async with RawServer(script) as server:
        pool = upstream.Pool("127.0.0.1", server.port, None)
        assert await fetch(pool) == (200, b"until the end")
        assert await fetch(pool) == (200, b"until the end")
        assert server.connections == 2


async def test_stale_pooled_connection_is_retried_once_for_a_bodyless_request() -> None:
    served = 0

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        await read_request(reader)
        served += 1
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n" + str(served).encode())
        await writer.drain()
        # then hang up: the pooled connection is stale when the next request comes

    async with RawServer(script) as server:
        pool = upstream.Pool("127.0.0.1", server.port, None)
        assert await fetch(pool) == (200, b"1")
        await asyncio.sleep(0)  # let the close reach the client's protocol... or not: both paths must work
        assert await fetch(pool) == (200, b"2")
        assert server.connections == 2


async def test_chunked_response_and_interim_1xx() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n")
        writer.write(b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")

    async with RawServer(script) as server:
        pool = upstream.Pool("127.0.0.1", server.port, None)
        connection, response = await upstream.request(pool, head(), None, False, 2)
        assert response.status == 201 and response.reason == "Created" and response.chunked
        assert await response.read() == b"hello"


async def test_garbage_from_the_upstream_fails_before_headers() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SMTP ready\r\n\r\n")

    async with RawServer(script) as server:
        pool = upstream.Pool("127.0.0.1", server.port, None)
        with pytest.raises(upstream.UpstreamFailed, match="invalid HTTP"):
            await fetch(pool)


async def test_body_cut_short_raises_instead_of_ending_quietly() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly some")

    async with RawServer(script) as server:
        pool = upstream.Pool("127.0.0.1", server.port, None)
        with pytest.raises(upstream.UpstreamFailed, match="closed"):
            await fetch(pool)


async def test_refused_connection_is_upstream_failed() -> None:
    pool = upstream.Pool("127.0.0.1", 1, None)
    with pytest.raises(upstream.UpstreamFailed, match="cannot connect"):
        await fetch(pool)


async def test_chunked_request_body_is_framed_and_large_response_pauses_reading() -> None:
    size = 16 * upstream.BUFFER_LIMIT
    received = asyncio.Event()
    drained = asyncio.Event()
    uploaded = bytearray()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request_head = await read_request(reader)
        assert b"Transfer-Encoding: chunked" in request_head
        while True:
            length = int((await reader.readuntil(b"\r\n")).strip(), 16)
            data = await reader.readexactly(length + 2)
            if length == 0:
                break
            uploaded.extend(data[:-2])
        received.set()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        writer.write(b"x" * size)  # no drain: it cannot finish while the client (rightly) stops reading
        drained.set()
        await reader.read()  # stay connected until the client is done

    async def body() -> AsyncIterator[bytes]:
        for part in (b"abc", b"", b"defgh"):
            yield part

    async with RawServer(script) as server:
        pool = upstream.Pool("127.0.0.1", server.port, None)
        connection, response = await upstream.request(
            pool, upstream.encode_head("POST", "/", [("Transfer-Encoding", "chunked")]), body(), True, 2
        )
        assert received.is_set() and bytes(uploaded) == b"abcdefgh"
        await drained.wait()
        for _ in range(50):  # let the loop deliver whatever the client's socket will give it
            await asyncio.sleep(0)
        # Reading pauses past the limit; one more socket read (up to 256 KiB) may already be on its way.
        assert connection._buffered <= upstream.BUFFER_LIMIT + 256 * 1024, "reading must pause, not buffer it all"
        total = 0
        async for chunk in response.chunks():
            total += len(chunk)
        assert total == size
        pool.close()


async def test_no_answer_by_the_deadline_fails_and_closes_the_connection() -> None:
    """The deadline is a timer on the connection (no asyncio.timeout on the hot path): past it the request fails
    with UpstreamTimedOut, the connection is closed (the upstream sees EOF) and never goes back to the pool."""
    upstream_saw_eof = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        if await reader.read() == b"":  # never answers; waits for the gateway to hang up
            upstream_saw_eof.set()

    async with RawServer(script) as server:
        pool = upstream.Pool("127.0.0.1", server.port, None)
        loop = asyncio.get_running_loop()
        with pytest.raises(upstream.UpstreamTimedOut):
            await upstream.request(pool, head(), None, False, 2, deadline=loop.time() + 0.2)
        async with asyncio.timeout(5):
            await upstream_saw_eof.wait()
        assert pool.get_idle() is None


async def test_an_answer_before_the_deadline_cancels_the_timer() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(3):
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await reader.read()

    async with RawServer(script) as server:
        pool = upstream.Pool("127.0.0.1", server.port, None)
        loop = asyncio.get_running_loop()
        for _ in range(2):
            connection, response = await upstream.request(pool, head(), None, False, 2, deadline=loop.time() + 0.05)
            assert (response.status, await response.read()) == (200, b"ok")
        # Past those deadlines the kept-alive connection is still open and reusable: the timers were cancelled.
        await asyncio.sleep(0.1)  # proves an absence: nothing to wait on but the clock
        assert not connection.closed
        connection2, response = await upstream.request(pool, head(), None, False, 2, deadline=loop.time() + 1)
        assert connection2 is connection and (response.status, await response.read()) == (200, b"ok")
        pool.close()
