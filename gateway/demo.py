"""`gateway demo` (`make run`): the gateway on an embedded config with its own issuer, a demo upstream and a
freshly minted demo token, plus the curl lines that show a 200, a 401 and a 403. Nothing to set up."""

from __future__ import annotations

import asyncio
import signal
import tempfile
import time
import uuid
from pathlib import Path

from aiohttp import web

from gateway import configfile, signing
from gateway.server import Server, start_or_explain

DEMO_ISSUER = "http://demo.gateway.local/"

_CONFIG = """\
listen: {{host: 127.0.0.1, port: {port}}}
admin: {{host: 127.0.0.1, port: {admin_port}}}
tokens:
  issuer: {issuer}
  signing_key_file: {key}
  audiences: [demo-api]
routes:
  - name: hello
    match: {{path_prefix: /hello}}
    upstream: {{url: "http://127.0.0.1:{upstream_port}"}}
    auth:
      mode: jwt
      issuers: [gateway]
      required_scopes: [demo:read]
    forward:
      identity_headers: {{X-Auth-Subject: sub, X-Auth-Scopes: scope}}
  - name: admin-area
    match: {{path_prefix: /admin-area}}
    upstream: {{url: "http://127.0.0.1:{upstream_port}"}}
    auth:
      mode: jwt
      issuers: [gateway]
      required_scopes: [demo:admin]
"""


async def _echo(request: web.Request) -> web.Response:
    """The demo upstream: says what reached it, including the identity headers the gateway set."""
    seen = {k: v for k, v in request.headers.items() if k.lower().startswith(("x-auth-", "x-forwarded-"))}
    return web.json_response({"upstream": "demo", "method": request.method, "path": request.path, "headers": seen})


async def run_demo(port: int, admin_port: int) -> int:
    upstream = web.Application()
    upstream.router.add_route("*", "/{tail:.*}", _echo)
    upstream_runner = web.AppRunner(upstream, access_log=None)
    await upstream_runner.setup()
    site = web.TCPSite(upstream_runner, "127.0.0.1", 0)
    await site.start()
    upstream_port = upstream_runner.addresses[0][1]

    with tempfile.TemporaryDirectory(prefix="gateway-demo-") as workdir:
        key_path = Path(workdir) / "signing.pem"
        signing.write_private_key(signing.generate("ES256"), str(key_path))
        config_path = Path(workdir) / "gateway.yaml"
        config_path.write_text(
            _CONFIG.format(
                port=port,
                admin_port=admin_port,
                issuer=DEMO_ISSUER,
                key=key_path,
                upstream_port=upstream_port,
            )
        )
        settings = configfile.load(config_path)
        server = Server(settings, config_path)
        ports = await start_or_explain(server)
        if ports is None:
            await upstream_runner.cleanup()
            return 1
        now = int(time.time())
        token = signing.Signer.from_files((str(key_path),)).sign(
            {"iss": DEMO_ISSUER, "sub": "demo-user", "aud": "demo-api", "scope": "demo:read",
             "iat": now, "exp": now + 3600, "jti": str(uuid.uuid4())}
        )  # fmt: skip
        _print_intro(ports.proxy_port, ports.admin_port, token, config_path)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, server.request_stop)
        try:
            await server.wait()
        finally:
            await server.stop()
            await upstream_runner.cleanup()
    return 0


def _print_intro(port: int, admin_port: int, token: str, config_path: Path) -> None:
    base = f"http://127.0.0.1:{port}"
    print(
        f"""
Token Gateway demo — in-process store, own issuer, demo upstream. Config: {config_path}

A demo token (subject demo-user, scope demo:read, valid 1 hour), minted just now:

  TOKEN={token}

Try it:
  curl -i {base}/hello -H "Authorization: Bearer $TOKEN"        # 200: the upstream answers
  curl -i {base}/hello                                          # 401: no token
  curl -i {base}/admin-area -H "Authorization: Bearer $TOKEN"   # 403: lacks scope demo:admin
  curl -s http://127.0.0.1:{admin_port}/metrics | grep gateway_auth_decisions_total

Admin page (mint, list and revoke tokens): http://127.0.0.1:{admin_port}/admin — it signs in with the admin token:
start the demo with GATEWAY_ADMIN_TOKEN set (e.g. GATEWAY_ADMIN_TOKEN=$(openssl rand -hex 16) make run).

Ctrl-C stops it.
""",
        flush=True,
    )
