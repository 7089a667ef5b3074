"""Test helpers: real keys, a real JWKS/discovery server, a recording upstream, and a gateway built from YAML.

Everything listens on 127.0.0.1 on free ports; keys are generated per session and never written to the repo.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import gzip
import hashlib
import json
import random
import select
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from gateway import configfile
from gateway.metrics import Metrics
from gateway.server import Listening, Server

ISSUER = "https://idp.test/"
AUDIENCE = "api://orders"


@dataclass
class Key:
    """A private key with its kid and algorithm, able to sign tokens and show its public JWK."""

    private: Any
    kid: str
    alg: str

    @classmethod
    def rsa(cls, kid: str = "rsa-1") -> Key:
        return cls(rsa.generate_private_key(public_exponent=65537, key_size=2048), kid, "RS256")

    @classmethod
    def ec(cls, kid: str = "ec-1") -> Key:
        return cls(ec.generate_private_key(ec.SECP256R1()), kid, "ES256")

    @classmethod
    def ed25519(cls, kid: str = "ed-1") -> Key:
        return cls(ed25519.Ed25519PrivateKey.generate(), kid, "EdDSA")

    def public_jwk(self) -> dict[str, Any]:
        algorithm = jwt.get_algorithm_by_name(self.alg)
        jwk: dict[str, Any] = json.loads(algorithm.to_jwk(self.private.public_key()))
        return {**jwk, "kid": self.kid, "use": "sig", "alg": self.alg}

    def public_pem(self) -> bytes:
        return bytes(
            self.private.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    def sign(self, claims: dict[str, Any] | None = None, headers: dict[str, Any] | None = None, **extra: Any) -> str:
        return jwt.encode(
            {**claims_for(**extra), **(claims or {})},
            self.private,
            algorithm=self.alg,
            headers={"kid": self.kid, **(headers or {})},
        )


def claims_for(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "alice",
        "scope": "orders:read orders:write",
        "iat": now,
        "exp": now + 600,
        "jti": str(uuid.uuid4()),
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def b64(data: bytes | str | dict[str, Any]) -> str:
    if isinstance(data, dict):
        data = json.dumps(data, separators=(",", ":"))
    if isinstance(data, str):
        data = data.encode()
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class IdP:
    """A real JWKS + OIDC discovery server: keys can rotate, the endpoint can fail, fetches are counted."""

    keys: list[Key]
    fail: bool = False
    cache_control: str | None = None
    fetches: int = 0
    url: str = ""
    fetched: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/jwks", self._jwks)
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        return app

    async def _jwks(self, request: web.Request) -> web.Response:
        self.fetches += 1
        self.fetched.set()
        if self.fail:
            return web.Response(status=500, text="down")
        headers = {"Cache-Control": self.cache_control} if self.cache_control else {}
        return web.json_response({"keys": [k.public_jwk() for k in self.keys]}, headers=headers)

    async def _discovery(self, request: web.Request) -> web.Response:
        return web.json_response({"issuer": ISSUER, "jwks_uri": f"{self.url}/jwks"})


@dataclass
class Upstream:
    """A real upstream that records what reached it."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 31)
        app.router.add_route("*", "/sse", self._sse)
        app.router.add_route("*", "/slow", self._slow)
        app.router.add_route("*", "/{tail:.*}", self._echo)
        return app

    async def _echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append(
            {"method": request.method, "path": request.path_qs, "headers": dict(request.headers), "body": body}
        )
        return web.json_response(
            {"path": request.path_qs, "headers": dict(request.headers), "body_length": len(body)},
            headers={"X-Upstream": "yes"},
        )

    async def _slow(self, request: web.Request) -> web.Response:
        self.requests.append({"method": request.method, "path": request.path_qs, "headers": dict(request.headers)})
        await asyncio.sleep(float(request.query.get("s", "5")))
        return web.Response(text="late")

    async def _sse(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(3):
            await response.write(f"data: event {i}\n\n".encode())
            await asyncio.sleep(0.05)
        return response


async def serve_app(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


@dataclass
class RunningGateway:
    server: Server
    ports: Listening
    metrics: Metrics

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports.proxy_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.admin_port}"

    def metric(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


def open_route_config(upstream_url: str, listen: str = "", extra: str = "") -> str:
    """YAML for a gateway on free ports with one `auth: none` route to `upstream_url`; `listen`: more listen
    settings (`key: value, ...`), `extra`: more top-level YAML."""
    return f"""
listen: {{host: 127.0.0.1, port: 0{", " + listen if listen else ""}}}
admin: {{host: 127.0.0.1, port: 0}}
{extra}
routes:
  - name: open
    match: {{path_prefix: /}}
    upstream: {{url: "{upstream_url}"}}
    auth: {{mode: none}}
"""


async def start_gateway(config: str, tmp_path: Path) -> AsyncIterator[RunningGateway]:
    """Start a gateway in this process from YAML text (listen/admin default to free ports on 127.0.0.1)."""
    path = tmp_path / f"gateway-{uuid.uuid4().hex[:8]}.yaml"
    if "listen:" not in config:
        config = "listen: {host: 127.0.0.1, port: 0}\nadmin: {host: 127.0.0.1, port: 0}\n" + config
    path.write_text(config)
    metrics = Metrics()
    server = Server(configfile.load(path), path, metrics=metrics)
    ports = await server.start()
    try:
        yield RunningGateway(server, ports, metrics)
    finally:
        await server.stop()


async def gateway_to_raw_upstream(
    upstream: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    tmp_path: Path,
    settings: str = "",
) -> AsyncIterator[RunningGateway]:
    """start_gateway with one open route to `upstream`, an asyncio stream handler (an upstream that answers byte by
    byte as a test scripts it) served on a free port; `settings`: more of the route's upstream settings."""
    server = await asyncio.start_server(upstream, "127.0.0.1", 0)
    config = open_route_config(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    if settings:
        config = config.replace('"}', f'", {settings}}}', 1)
    try:
        async for gw in start_gateway(config, tmp_path):
            yield gw
    finally:
        server.close()


async def raw_http_request(port: int, head: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """Send a request exactly as written (no client-side path normalisation) and read one whole answer.

    `head` is the request line and headers, each ending in CRLF; the blank line is added, and `Connection: close`
    unless `head` has a Connection header of its own. The body is read by Content-Length, chunked framing, or until
    the server closes (none for HEAD, 1xx, 204 and 304). Returns the status, the headers (names lower-cased;
    repeated ones joined with ", ") and the de-chunked body.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        close = b"" if "\r\nconnection:" in head.lower() else b"Connection: close\r\n"
        writer.write(head.encode("latin-1") + close + b"\r\n" + body)
        await writer.drain()
        async with asyncio.timeout(30):
            status, headers, answer = await read_answer(reader, head.startswith("HEAD "))
            if close:
                # The server closes after the answer: nothing more may follow (a HEAD answer with a body would).
                extra = await reader.read()
                assert extra == b"", f"bytes after the answer: {extra[:80]!r}"
    finally:
        writer.close()
        await writer.wait_closed()
    return status, headers, answer


async def read_answer(reader: asyncio.StreamReader, to_head: bool = False) -> tuple[int, dict[str, str], bytes]:
    """Read one answer off a connection: status, headers (names lower-cased; repeated ones joined with ", ") and
    the de-chunked body (by Content-Length, chunked framing, or until the server closes)."""
    head_bytes = await reader.readuntil(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").rstrip("\r\n").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        key = name.strip().lower()
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    if to_head or status in (204, 304) or status < 200:
        answer = b""
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        answer = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # no trailers expected
                break
            answer += (await reader.readexactly(size + 2))[:-2]
    elif "content-length" in headers:
        answer = await reader.readexactly(int(headers["content-length"]))
    else:
        answer = await reader.read()
    return status, headers, answer


async def serve_app_cancelling(app: web.Application) -> tuple[web.AppRunner, str]:
    """Like serve_app, but a handler is cancelled when its client goes away (and shutdown waits at most 1 s)."""
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


def pattern_bytes(n: int) -> bytes:
    """n pseudo-random bytes, the same for the same n (for byte-exact comparisons)."""
    return random.Random(n).randbytes(n)


STREAM_CHUNK = random.Random(1).randbytes(1 << 20)
"""1 MiB of pseudo-random bytes, reused to make large bodies without allocating them."""


def stream_digest(chunks: int) -> str:
    """sha256 of STREAM_CHUNK repeated `chunks` times."""
    digest = hashlib.sha256()
    for _ in range(chunks):
        digest.update(STREAM_CHUNK)
    return digest.hexdigest()


@dataclass
class RichUpstream(Upstream):
    """The recording upstream plus routes the proxy and streaming tests need.

    Records every header as sent (`header_list`, duplicates kept) and the raw request target (`raw_path`).
    - /status/{code}: answers that status (with an ETag; no body for 204 and 304)
    - /bytes/{n}: n pattern bytes with a Content-Length; ?chunked=1: streamed without one; ?gzip=1: compressed,
      with Content-Encoding
    - /stream/{mib}: STREAM_CHUNK `mib` times, chunked; sets `stream_cut` when its client leaves mid-way
    - /hash: streams the request body through sha256, answers its digest and length (never holds the body)
    - /hop: answers with hop-by-hop headers
    - /slow?s=N: sets `slow_started`, and `slow_cancelled` when cancelled
    - /ws: a WebSocket echo speaking subprotocol chat.v2 (text "close:N" closes with code N, "abort" drops the
      connection); close codes seen go to `ws_close_codes`
    - anything else: echo, recording the body
    Serve it with serve_app_cancelling so a handler sees its client leave.
    """

    slow_started: asyncio.Event = field(default_factory=asyncio.Event)
    slow_cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    stream_cut: asyncio.Event = field(default_factory=asyncio.Event)  # a /stream/ answer's client left mid-way
    ws_close_codes: list[int | None] = field(default_factory=list)
    ws_closed: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 31)
        app.router.add_route("*", "/status/{code:\\d+}", self._status)
        app.router.add_route("*", "/bytes/{n:\\d+}", self._bytes)
        app.router.add_route("*", "/stream/{mib:\\d+}", self._stream)
        app.router.add_route("*", "/hash", self._hash)
        app.router.add_route("*", "/hop", self._hop)
        app.router.add_route("*", "/slow", self._slow_cancellable)
        app.router.add_get("/ws", self._ws)
        app.router.add_route("*", "/{tail:.*}", self._echo_raw)
        return app

    def _record(self, request: web.Request, **extra: Any) -> None:
        self.requests.append(
            {
                "method": request.method,
                "path": request.path_qs,
                "raw_path": request.raw_path,
                "headers": dict(request.headers),
                "header_list": list(request.raw_headers),
                **extra,
            }
        )

    async def _echo_raw(self, request: web.Request) -> web.Response:
        body = await request.read()
        self._record(request, body=body)
        return web.json_response(
            {"path": request.path_qs, "raw_path": request.raw_path, "body_length": len(body)},
            headers={"X-Upstream": "yes"},
        )

    async def _status(self, request: web.Request) -> web.Response:
        self._record(request)
        code = int(request.match_info["code"])
        headers = {"X-Upstream": "yes", "ETag": '"v1"'}
        if code in (204, 304):
            return web.Response(status=code, headers=headers)
        return web.Response(status=code, text=f"status {code}", headers=headers)

    async def _bytes(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        n = int(request.match_info["n"])
        if request.query.get("gzip") == "1":  # already compressed: must reach the client exactly so
            body = gzip.compress(pattern_bytes(n), mtime=0)
            return web.Response(body=body, headers={"X-Upstream": "yes", "Content-Encoding": "gzip"})
        if request.query.get("chunked") != "1":
            return web.Response(body=pattern_bytes(n), headers={"X-Upstream": "yes"})
        response = web.StreamResponse(headers={"X-Upstream": "yes"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        data = pattern_bytes(n) if request.method != "HEAD" else b""  # aiohttp would send a HEAD body as told
        for start in range(0, len(data), 65536):
            await response.write(data[start : start + 65536])
        await response.write_eof()
        return response

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            for _ in range(int(request.match_info["mib"]) if request.method != "HEAD" else 0):
                await response.write(STREAM_CHUNK)
        except (asyncio.CancelledError, ConnectionError):
            self.stream_cut.set()
            raise
        await response.write_eof()
        return response

    async def _hash(self, request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        length = 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            length += len(chunk)
        self._record(request, body_length=length)
        return web.json_response({"sha256": digest.hexdigest(), "length": length})

    async def _hop(self, request: web.Request) -> web.Response:
        self._record(request)
        return web.Response(
            text="hop",
            headers={
                "X-Upstream": "yes",
                "Connection": "keep-alive, X-Internal",
                "X-Internal": "secret",
                "Keep-Alive": "timeout=5",
                "Proxy-Authenticate": "Basic realm=upstream",
                "Trailer": "X-Checksum",
                "Upgrade": "h2c",
            },
        )

    async def _slow_cancellable(self, request: web.Request) -> web.Response:
        self._record(request)
        self.slow_started.set()
        try:
            await asyncio.sleep(float(request.query.get("s", "5")))
        except asyncio.CancelledError:
            self.slow_cancelled.set()
            raise
        return web.Response(text="late")

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        self._record(request)
        ws = web.WebSocketResponse(protocols=("chat.v2",), max_msg_size=0)  # the gateway's limit is under test
        await ws.prepare(request)
        try:
            async for message in ws:
                if message.type == aiohttp.WSMsgType.TEXT:
                    if message.data == "abort":  # the upstream process dies: no close frame
                        assert request.transport is not None  # noqa: S101 - a live connection
                        request.transport.abort()
                        break
                    if message.data.startswith("big:"):  # a binary message of that many bytes
                        await ws.send_bytes(bytes(int(message.data[4:])))
                        continue
                    if message.data.startswith("close:"):
                        await ws.close(code=int(message.data[6:]), message=b"bye")
                        break
                    await ws.send_str(f"echo:{message.data}")
                elif message.type == aiohttp.WSMsgType.BINARY:
                    await ws.send_bytes(message.data[::-1])
        finally:
            self.ws_close_codes.append(ws.close_code)
            self.ws_closed.set()
        return ws


@contextlib.contextmanager
def unresponsive_port() -> Iterator[int]:
    """A port on 127.0.0.1 where a TCP connect hangs (no SYN-ACK), to exercise connect timeouts.

    A listener with backlog 0 that never accepts: once its accept queue holds a connection, Linux drops further
    SYNs, so the next connect waits until the client's own timeout.
    """
    listener = socket.socket()
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(8):
            filler = socket.socket()
            filler.setblocking(False)
            fillers.append(filler)
            if filler.connect_ex(("127.0.0.1", port)) not in (0, errno.EINPROGRESS):
                break
            _, writable, _ = select.select([], [filler], [], 0.2)
            if not writable:
                break  # this connect hangs: the queue is full
        else:
            raise RuntimeError("could not fill the accept queue of the test listener")
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


@contextlib.contextmanager
def refusing_port() -> Iterator[int]:
    """A port on 127.0.0.1 where nothing listens: bound (so nobody else takes it) but not listening → RST."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]
    finally:
        sock.close()


# --- Helpers for forged tokens, JWKS behaviour and token locations (appended; the helpers above are unchanged). ---


def forge(header: dict[str, Any] | str, claims: dict[str, Any] | str, signature: bytes | str = b"") -> str:
    """A compact JWS assembled by hand: dicts are JSON-encoded, str segments are used as they are (already encoded)."""
    head = header if isinstance(header, str) else b64(header)
    body = claims if isinstance(claims, str) else b64(claims)
    sig = signature if isinstance(signature, str) else b64(signature)
    return f"{head}.{body}.{sig}"


def sign_jws(key: Any, alg: str, header: dict[str, Any], claims: dict[str, Any]) -> str:
    """Sign `header.claims` exactly as given (no header defaults added): `key` is a private key, or bytes for HS*.

    pyjwt's own `encode` refuses some of the pairings an attacker would try (a PEM as an HMAC secret), so the
    signature is computed with the algorithm object directly.
    """
    signing_input = f"{b64(header)}.{b64(claims)}"
    algorithm = jwt.get_algorithm_by_name(alg)
    signature = algorithm.sign(signing_input.encode(), key)
    return f"{signing_input}.{b64(signature)}"


def challenge(value: str) -> tuple[str, dict[str, str]]:
    """Parse one `WWW-Authenticate` challenge: ('Bearer', {'realm': ..., 'error': ...})."""
    import re

    scheme, _, rest = value.partition(" ")
    params: dict[str, str] = {}
    for match in re.finditer(r'([A-Za-z_]+)="((?:[^"\\]|\\.)*)"', rest):
        params[match.group(1)] = re.sub(r"\\(.)", r"\1", match.group(2))
    return scheme, params


def log_text(records: list[Any]) -> str:
    """Log records rendered as the gateway writes them (JSON with every `extra` field), to search for secrets."""
    from gateway.logs import JsonFormatter

    formatter = JsonFormatter()
    return "\n".join(formatter.format(record) for record in records)


async def wait_for_fetches(idp: IdP, count: int, within: float = 5.0) -> None:
    """Wait (on the IdP's `fetched` event, not the clock) until the IdP has received at least `count` JWKS fetches;
    fail after `within` seconds."""
    async with asyncio.timeout(within):
        while idp.fetches < count:
            idp.fetched.clear()
            if idp.fetches >= count:
                break
            await idp.fetched.wait()


def self_signed_cert(key: Key, common_name: str = "attacker") -> bytes:
    """A self-signed X.509 certificate (PEM) for `key`'s public key."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    algorithm = None if isinstance(key.private, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key.private, algorithm)
    )
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass
class ScriptedIdP(IdP):
    """An IdP with more levers: its own issuer URL for discovery, a gate that holds JWKS answers, extra raw JWKs,
    and a `served` event set once an answer has been produced (the gateway may still be reading it)."""

    issuer: str = ISSUER
    extra_jwks: list[dict[str, Any]] = field(default_factory=list)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    served: asyncio.Event = field(default_factory=asyncio.Event)
    discovery_fetches: int = 0
    redirect_to: str | None = None

    def __post_init__(self) -> None:
        self.gate.set()

    async def _jwks(self, request: web.Request) -> web.Response:
        self.fetches += 1
        self.fetched.set()
        await self.gate.wait()
        try:
            if self.redirect_to is not None:
                raise web.HTTPFound(self.redirect_to)
            if self.fail:
                return web.Response(status=500, text="down")
            headers = {"Cache-Control": self.cache_control} if self.cache_control else {}
            document = {"keys": [k.public_jwk() for k in self.keys] + self.extra_jwks}
            return web.json_response(document, headers=headers)
        finally:
            self.served.set()

    async def _discovery(self, request: web.Request) -> web.Response:
        self.discovery_fetches += 1
        return web.json_response({"issuer": self.issuer, "jwks_uri": f"{self.url}/jwks"})


# --- A gateway in a subprocess (`python -m gateway run`), for signals, the CLI and memory measurements. ---

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class GatewayProcess:
    """A `gateway run` child process; its stderr (JSON log lines) is collected as it is written."""

    process: asyncio.subprocess.Process
    config_path: Path
    lines: list[str] = field(default_factory=list)
    proxy_port: int = 0
    admin_port: int = 0
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _reader: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def logs(self) -> list[dict[str, Any]]:
        """The stderr lines that are JSON objects, parsed."""
        out = []
        for line in self.lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict):
                out.append(entry)
        return out

    async def _collect(self) -> None:
        assert self.process.stderr is not None  # noqa: S101 - started with stderr=PIPE
        async for raw in self.process.stderr:
            async with self._changed:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._changed.notify_all()
        async with self._changed:
            self._changed.notify_all()  # EOF: waiters re-check and see the process ended

    async def wait_for_log(self, predicate: Any, within: float = 10.0) -> dict[str, Any]:
        """The first JSON log line satisfying `predicate`, waiting (on new lines, not the clock) up to `within` s."""
        async with asyncio.timeout(within):
            async with self._changed:
                while True:
                    for entry in self.logs():
                        if predicate(entry):
                            return entry
                    if self._reader is not None and self._reader.done():
                        raise AssertionError("gateway stderr closed before the line appeared:\n" + self.text())
                    await self._changed.wait()

    async def wait_for_logs(self, predicate: Any, count: int, within: float = 20.0) -> list[dict[str, Any]]:
        """The first `count` JSON log lines satisfying `predicate`, waiting for them as wait_for_log does."""
        async with asyncio.timeout(within):
            async with self._changed:
                while True:
                    found = [entry for entry in self.logs() if predicate(entry)]
                    if len(found) >= count:
                        return found[:count]
                    if self._reader is not None and self._reader.done():
                        raise AssertionError(
                            f"gateway stderr closed with {len(found)} of {count} lines:\n{self.text()}"
                        )
                    await self._changed.wait()

    def text(self) -> str:
        return "\n".join(self.lines)

    def rss_bytes(self) -> int:
        """Resident set size of the process now (VmRSS in /proc/PID/status)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS line")

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    async def wait_exit(self, within: float = 30.0) -> int:
        async with asyncio.timeout(within):
            code = await self.process.wait()
            if self._reader is not None:
                await self._reader  # every line written before the exit is collected
        return code

    async def metric(self, session: aiohttp.ClientSession, name: str, **labels: str) -> float:
        """One sample from the admin /metrics page (0 when absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        async with session.get(f"{self.admin_url}/metrics") as resp:
            text = await resp.text()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return float(sample.value)
        return 0.0


@contextlib.asynccontextmanager
async def gateway_process(
    config: str,
    tmp_path: Path,
    env: dict[str, str] | None = None,
    within: float = 20.0,
    args: tuple[str, ...] = (),
) -> AsyncIterator[GatewayProcess]:
    """Write `config` (listen/admin on free ports unless given), run `python -m gateway run --config FILE`, and wait
    for its "gateway listening" line and a 200 from admin /healthz, within `within` seconds. Killed on exit if still
    running."""
    import os
    import sys

    path = tmp_path / f"gateway-{uuid.uuid4().hex[:8]}.yaml"
    if "listen:" not in config:
        config = "listen: {host: 127.0.0.1, port: 0}\nadmin: {host: 127.0.0.1, port: 0}\n" + config
    path.write_text(config)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "run", "--config", str(path), *args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT, env={**os.environ, **(env or {})},
    )  # fmt: skip
    gw = GatewayProcess(process, path)
    gw._reader = asyncio.create_task(gw._collect())
    try:
        listening = await gw.wait_for_log(lambda e: e.get("msg") == "gateway listening", within)
        gw.proxy_port, gw.admin_port = int(listening["proxy_port"]), int(listening["admin_port"])
        await wait_healthy(gw.admin_url, within)
        yield gw
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
        await gw._reader


async def wait_healthy(admin_url: str, within: float = 20.0) -> None:
    """Poll {admin_url}/healthz until it answers 200 (bounded by `within` seconds)."""
    async with asyncio.timeout(within), aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(f"{admin_url}/healthz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)  # nothing to await: the listener gives no other sign of life


async def run_cli(*args: str, within: float = 30.0) -> tuple[int, str, str]:
    """Run `python -m gateway ARGS...` to completion: (exit code, stdout, stderr)."""
    import sys

    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,
    )  # fmt: skip
    try:
        async with asyncio.timeout(within):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None  # noqa: S101 - communicate() waited
    return process.returncode, out.decode(), err.decode()
