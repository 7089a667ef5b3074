"""Test helpers: real keys, a real JWKS/discovery server, a recording upstream, and a gateway built from YAML.

Everything listens on 127.0.0.1 on free ports; keys are generated per session and never written to the repo.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
