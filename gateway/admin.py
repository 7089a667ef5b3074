"""The admin listener: /metrics, /healthz, /readyz, and the operator API under /admin (bearer token required).

The admin token is compared in constant time; with no token configured, /admin is disabled (403), never open.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError

from gateway.app import Runtime, readiness
from gateway.metrics import exposition
from gateway.revoke import RevokeRequest, describe
from gateway.store import Kind

log = logging.getLogger(__name__)
RUNTIME = web.AppKey("runtime", Runtime)
ADMIN_TOKEN = web.AppKey("admin_token", str)
MAX_PAGE = 1000

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def admin_app(runtime: Runtime, token_env: str) -> web.Application:
    app = web.Application(middlewares=[_require_admin_token], client_max_size=64 * 1024)
    app[RUNTIME] = runtime
    app[ADMIN_TOKEN] = os.environ.get(token_env, "")
    if not app[ADMIN_TOKEN]:
        log.warning("admin API disabled: no admin token", extra={"token_env": token_env})
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_post("/admin/revocations", _revoke)
    app.router.add_get("/admin/revocations", _list_revocations)
    app.router.add_delete("/admin/revocations", _unrevoke)
    return app


def problem(status: int, error: str, description: str) -> web.Response:
    return web.json_response({"error": error, "error_description": description}, status=status)


@web.middleware
async def _require_admin_token(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.path.startswith("/admin/"):
        return await handler(request)
    expected = request.app[ADMIN_TOKEN]
    if not expected:
        return problem(403, "admin_disabled", "the admin API is disabled: set the admin token (admin.token_env)")
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected.encode()):
        response = problem(401, "unauthorized", "a valid admin token is required")
        response.headers["WWW-Authenticate"] = 'Bearer realm="gateway-admin"'
        return response
    return await handler(request)


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request's JSON object body, or a 400 that says what is wrong with it."""
    try:
        body = await request.json(loads=json.loads)
    except (ValueError, UnicodeDecodeError):
        raise web.HTTPBadRequest(
            text=json.dumps({"error": "invalid_request", "error_description": "the body is not valid JSON"}),
            content_type="application/json",
        ) from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(
            text=json.dumps({"error": "invalid_request", "error_description": "the body must be a JSON object"}),
            content_type="application/json",
        )
    return body


def page_params(request: web.Request) -> tuple[int, int]:
    try:
        offset = int(request.query.get("offset", "0"))
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        raise web.HTTPBadRequest(
            text=json.dumps({"error": "invalid_request", "error_description": "offset and limit must be integers"}),
            content_type="application/json",
        ) from None
    if offset < 0 or not 1 <= limit <= MAX_PAGE:
        raise web.HTTPBadRequest(
            text=json.dumps(
                {"error": "invalid_request", "error_description": f"offset >= 0 and 1 <= limit <= {MAX_PAGE}"}
            ),
            content_type="application/json",
        )
    return offset, limit


async def _metrics(request: web.Request) -> web.Response:
    body = exposition(request.app[RUNTIME].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    ready, detail = readiness(request.app[RUNTIME])
    return web.json_response(detail, status=200 if ready else 503)


def _known_issuer(runtime: Runtime, issuer: str | None) -> bool:
    return issuer is None or (runtime.gateway is not None and issuer in runtime.gateway.issuers)


async def _revoke(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    try:
        ask = RevokeRequest.model_validate(await read_json(request))
    except ValidationError as exc:
        return problem(400, "invalid_request", describe(exc))
    if not _known_issuer(runtime, ask.issuer):
        return problem(400, "invalid_request", f"issuer: unknown issuer '{ask.issuer}'")
    revocation = ask.revocation()
    await runtime.store.add(revocation)
    log.info("revoked", extra={"kind": revocation.kind, "issuer": revocation.issuer, "reason": ask.reason})
    return web.json_response({"revoked": revocation.as_json()}, status=201)


async def _list_revocations(request: web.Request) -> web.Response:
    kind = request.query.get("kind", "jti")
    if kind not in ("jti", "subject"):
        return problem(400, "invalid_request", "kind must be jti or subject")
    offset, limit = page_params(request)
    kind_: Kind = "jti" if kind == "jti" else "subject"
    items = await request.app[RUNTIME].store.page(kind_, offset, limit + 1)
    more = len(items) > limit
    return web.json_response(
        {"items": [r.as_json() for r in items[:limit]], "next_offset": offset + limit if more else None}
    )


async def _unrevoke(request: web.Request) -> web.Response:
    query = request.query
    if ("jti" in query) == ("subject" in query) or not (query.get("jti") or query.get("subject")):
        return problem(400, "invalid_request", "give exactly one of ?jti= or ?subject= (and optionally &issuer=)")
    kind: Kind = "jti" if "jti" in query else "subject"
    removed = await request.app[RUNTIME].store.remove(kind, query[kind], query.get("issuer") or None)
    if not removed:
        return problem(404, "not_found", f"no such {kind} revocation")
    log.info("revocation undone", extra={"kind": kind, "issuer": query.get("issuer")})
    return web.json_response({"removed": True})
