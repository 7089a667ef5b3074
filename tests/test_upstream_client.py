"""The lean upstream client against real sockets: keep-alive reuse, stale connections, framing, flow control."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
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


def answering(answer: bytes) -> RawServer:
    """A server that reads one request, writes `answer` and waits for the client to hang up."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer)
        with contextlib.suppress(ConnectionError):
            await reader.read()

    return RawServer(script)


async def assert_refused(answer: bytes, match: str) -> None:
    """Against a server `answering` with these bytes, the client raises UpstreamFailed(match)."""
    async with answering(answer) as server:
        pool = upstream.Pool("127.0.0.1", server.port, None)
        async with asyncio.timeout(5):
            with pytest.raises(upstream.UpstreamFailed, match=match):
                await fetch(pool)


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
        with pytest.raises(upstream.UpstreamTimedOut):
            await upstream.request(pool, head(), None, False, 2, answer_within=0.2)
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
        for _ in range(2):
            connection, response = await upstream.request(pool, head(), None, False, 2, answer_within=0.05)
            assert (response.status, await response.read()) == (200, b"ok")
        # Past those deadlines the kept-alive connection is still open and reusable: the timers were cancelled.
        await asyncio.sleep(0.1)  # proves an absence: nothing to wait on but the clock
        assert not connection.closed
        connection2, response = await upstream.request(pool, head(), None, False, 2, answer_within=1)
        assert connection2 is connection and (response.status, await response.read()) == (200, b"ok")
        pool.close()


# --- answers out of step, early ends, trailers -------------------------------------------------------------------


async def test_bytes_past_an_answer_are_dropped_with_the_connection() -> None:
    """A second answer in the same packet is neither added to the first nor left for the next request (another
    client's): the first answer stands as framed, and the connection is not reused."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nPOISON!"
        )
        await reader.read()  # until the client hangs up

    async with RawServer(script) as server:
        pool = upstream.Pool("127.0.0.1", server.port, None)
        assert await fetch(pool) == (200, b"hello")
        assert await fetch(pool) == (200, b"hello")
        assert server.connections == 2
        pool.close()


async def test_bytes_arriving_on_an_idle_pooled_connection_close_it() -> None:
    answered, dropped = asyncio.Event(), asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        await answered.wait()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nPOISON!")  # unasked, while the connection idles
        if not await reader.read():  # the client hangs up
            dropped.set()

    async with RawServer(script) as server:
        pool = upstream.Pool("127.0.0.1", server.port, None)
        connection, response = await upstream.request(pool, head(), None, False, 2)
        assert await response.read() == b"hello"
        answered.set()
        async with asyncio.timeout(5):
            await dropped.wait()  # the unasked bytes arrived, and the pooled connection was dropped
        assert connection.closed
        assert await fetch(pool) == (200, b"hello")
        assert server.connections == 2
        pool.close()


@pytest.mark.parametrize(("method", "retried"), [("GET", True), ("DELETE", True), ("POST", False), ("PATCH", False)])
async def test_only_an_idempotent_request_is_retried_on_a_connection_that_dies_unanswered(
    method: str, retried: bool
) -> None:
    """The upstream reads the request, then closes without answering: it may have acted on it. RFC 9112 §9.3.1: a
    proxy must not retry a non-idempotent request by itself."""
    seen: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not seen:  # first connection: answer one request, take the next, hang up
            seen.append(await read_request(reader))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
        seen.append(await read_request(reader))
        if len(seen) > 2:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    async with RawServer(script) as server:
        pool = upstream.Pool("127.0.0.1", server.port, None)
        assert await fetch(pool) == (200, b"ok")
        request_head = upstream.encode_head(method, "/orders", [("Host", "x"), ("Content-Length", "0")])
        if retried:
            connection, response = await upstream.request(pool, request_head, None, False, 2)
            assert (response.status, await response.read()) == (200, b"ok")
        else:
            with pytest.raises(upstream.UpstreamFailed):
                await upstream.request(pool, request_head, None, False, 2)
        assert [line.split(b" ")[0] for line in seen[1:]] == [method.encode()] * (2 if retried else 1)
        pool.close()


@pytest.mark.parametrize(
    "sent",
    [b"HTTP/1.1 20", b"HTTP/1.1 200 OK\r\nContent-Le", b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early\r\n\r\n"],
)
async def test_an_upstream_closing_before_the_answers_head_fails_at_once(sent: bytes) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(sent)

    async with RawServer(script) as server:
        pool = upstream.Pool("127.0.0.1", server.port, None)
        async with asyncio.timeout(5):  # not the 30 s deadline: the close itself is the failure
            with pytest.raises(upstream.UpstreamFailed, match="closed"):
                await upstream.request(pool, head(), None, False, 2, answer_within=30)


async def test_switching_protocols_to_a_plain_request_is_a_failure() -> None:
    await assert_refused(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nxx", "invalid HTTP"
    )


async def test_a_reset_ends_an_unframed_body_as_a_failure_not_as_its_end() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\npart of it")
        await writer.drain()
        await asyncio.sleep(0.05)  # the head and part of the body arrive first, then the reset
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async with RawServer(script) as server:
        pool = upstream.Pool("127.0.0.1", server.port, None)
        connection, response = await upstream.request(pool, head(), None, False, 2)
        with pytest.raises(upstream.UpstreamFailed, match="closed"):
            await response.read()


async def test_trailer_fields_are_not_merged_into_the_header_section() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n"
            b"5\r\nhello\r\n0\r\nX-Checksum: abc\r\nSet-Cookie: session=attacker\r\n\r\n"
        )
        await reader.read()

    async with RawServer(script) as server:
        pool = upstream.Pool("127.0.0.1", server.port, None)
        connection, response = await upstream.request(pool, head(), None, False, 2)
        assert await response.read() == b"hello"
        assert [name for name, _ in response.headers] == ["Transfer-Encoding", "Trailer"]
        pool.close()


@pytest.mark.parametrize("coding", ["chunked, gzip", "gzip, chunked", "gzip"])
async def test_a_transfer_coding_other_than_chunked_is_refused(coding: str) -> None:
    """The gateway re-frames bodies itself, so a coding it would silently drop (the bytes still gzipped) is a
    failure, as in nginx."""
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: %b\r\n\r\n5\r\nhello\r\n0\r\n\r\n" % coding.encode()
    await assert_refused(answer, "unsupported transfer coding")


async def test_an_early_answer_stops_the_upload_and_is_returned() -> None:
    """An upstream that refuses an upload at its head (413) is heard: the body stops, its answer comes back, and the
    half-sent connection is not reused."""
    sent = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(320):  # 20 MiB
            sent += 1
            yield b"x" * 65536
            await asyncio.sleep(0)

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 3\r\n\r\nbig")
        await writer.drain()
        while await reader.read(1 << 16):  # read and drop the rest, so no reset destroys the answer
            pass

    async with RawServer(script) as server:
        pool = upstream.Pool("127.0.0.1", server.port, None)
        async with asyncio.timeout(10):
            assert await fetch(pool, body()) == (413, b"big")
        assert sent < 320
        assert await fetch(pool) == (413, b"big")
        assert server.connections == 2
        pool.close()


@pytest.mark.parametrize("shape", ["one long header", "many headers", "just over"])
async def test_an_answer_head_over_the_limit_is_refused(shape: str) -> None:
    """An upstream's head is held whole before it is relayed: over MAX_HEAD_BYTES it is a failure, not memory."""
    line = b"X-Big: " + b"a" * (2 * upstream.MAX_HEAD_BYTES) + b"\r\n"
    many = 20_000 if shape == "many headers" else (upstream.MAX_HEAD_BYTES + 4096) // 26  # just over, one read
    lines = line if shape == "one long header" else b"X-Many: aaaaaaaaaaaaaaaa\r\n" * many
    await assert_refused(b"HTTP/1.1 200 OK\r\n" + lines + b"Content-Length: 2\r\n\r\nok", "head is over")


async def test_a_head_and_a_large_body_in_one_read_are_not_taken_for_a_large_head() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 200000\r\n\r\n" + b"b" * 200_000)
        await reader.read()

    async with RawServer(script) as server:
        pool = upstream.Pool("127.0.0.1", server.port, None)
        assert await fetch(pool) == (200, b"b" * 200_000)
        pool.close()


async def test_an_answer_to_head_ends_with_its_head_and_its_connection() -> None:
    """llhttp would wait for the body a HEAD answer's Content-Length announces: the answer ends with its head, a
    stray body (a common upstream bug) is dropped with the connection, and header bytes pass as they are."""
    async with answering(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Name: Jos\xe9\r\n\r\nhello") as server:
        pool = upstream.Pool("127.0.0.1", server.port, None)
        head_request = upstream.encode_head("HEAD", "/", [("Host", "x")])
        async with asyncio.timeout(5):
            connection, response = await upstream.request(pool, head_request, None, False, 2)
            assert (response.status, response.content_length, await response.read()) == (200, 5, b"")
        assert ("X-Name", "Jos\udce9") in response.headers  # as the listener writes it back: the byte 0xE9
        connection.abandon()
        assert connection.closed
        pool.close()


async def test_an_early_answer_is_heard_while_the_clients_body_is_stalled() -> None:
    """The upstream refuses at the head (403) while the gateway waits for the client's next chunk: the answer goes
    back at once, not at the deadline."""
    never = asyncio.Event()

    async def stalled() -> AsyncIterator[bytes]:
        yield b"first part"
        await never.wait()  # the client sends nothing more
        yield b"never"

    async with answering(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno") as server:
        pool = upstream.Pool("127.0.0.1", server.port, None)
        async with asyncio.timeout(5):
            assert await fetch(pool, stalled()) == (403, b"no")
        pool.close()


async def test_an_early_answer_is_heard_while_the_upstream_takes_no_more_of_the_body() -> None:
    """The upstream answers 413 and stops reading: the gateway, waiting for the upstream's socket to drain, hears
    the answer instead of waiting for ever (or for the deadline)."""
    answered = asyncio.Event()

    async def endless() -> AsyncIterator[bytes]:
        while True:
            yield b"x" * 65536

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await reader.readexactly(1 << 20)  # some of the body, then no more
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 3\r\n\r\nbig")
        answered.set()
        await asyncio.sleep(30)  # neither reads nor closes; cancelled when the test ends

    async with RawServer(script) as server:
        pool = upstream.Pool("127.0.0.1", server.port, None)
        async with asyncio.timeout(10):
            assert await fetch(pool, endless()) == (413, b"big")
        assert answered.is_set()
        pool.close()


async def test_a_request_the_upstream_answered_is_not_retried_even_if_the_answer_is_refused() -> None:
    """Retrying is for a pooled connection that died unanswered; an upstream that answered (here with garbage) got
    the request and may have acted on it, GET or not."""
    seen: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await read_request(reader))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        seen.append(await read_request(reader))
        writer.write(b"SMTP ready\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            await reader.read()

    async with RawServer(script) as server:
        pool = upstream.Pool("127.0.0.1", server.port, None)
        assert await fetch(pool) == (200, b"ok")
        with pytest.raises(upstream.UpstreamFailed, match="invalid HTTP"):
            await fetch(pool)
        assert len(seen) == 2 and server.connections == 1
