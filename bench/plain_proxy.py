"""The baseline: what a user would write without the gateway — aiohttp + pyjwt, RS256 on every request.

Kept honest: uvloop, the key parsed once, one shared ClientSession with keep-alive, no access log
(the same as every other target in the suite). Run: python -m bench.plain_proxy --port P --upstream URL
--public-key PEM.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator

import aiohttp
import jwt
import uvloop
from aiohttp import web
from cryptography.hazmat.primitives import serialization

from bench.tokens import AUDIENCE, ISSUER

SESSION = web.AppKey("session", aiohttp.ClientSession)
# Hop-by-hop headers (RFC 9110 §7.6.1) and the credential stay on this side of the proxy.
DROP = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "authorization", "host"}


def build_app(upstream: str, public_key: object) -> web.Application:
    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        app[SESSION] = aiohttp.ClientSession(upstream)
        yield
        await app[SESSION].close()

    async def handle(request: web.Request) -> web.Response:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return web.json_response({"error": "invalid_request"}, status=401)
        try:
            jwt.decode(token, public_key, algorithms=["RS256"], audience=AUDIENCE, issuer=ISSUER)  # type: ignore[arg-type]
        except jwt.InvalidTokenError:
            return web.json_response({"error": "invalid_token"}, status=401)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in DROP}
        async with request.app[SESSION].request(
            request.method, request.rel_url, headers=headers, data=await request.read()
        ) as upstream_response:
            body = await upstream_response.read()
            return web.Response(body=body, status=upstream_response.status, content_type=upstream_response.content_type)

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--public-key", required=True)
    args = parser.parse_args()
    with open(args.public_key, "rb") as pem:
        public_key = serialization.load_pem_public_key(pem.read())
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    web.run_app(build_app(args.upstream, public_key), host="127.0.0.1", port=args.port, access_log=None)


if __name__ == "__main__":
    main()
