"""The admin listener: /metrics, /healthz, /readyz, the operator API under /admin/ (bearer token required), and the
admin page at /admin (static; it calls the API with the token the operator enters).

The admin token is compared in constant time; with no token configured, /admin/ is disabled (403), never open.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError

from gateway import jsontext
from gateway.app import Runtime, readiness
from gateway.metrics import exposition
from gateway.oauth import discovery_response, jwks_response
from gateway.revoke import FINAL, RevokeRequest, describe, is_final, unknown_issuer
from gateway.store import STORE_ERRORS, Kind
from gateway.token_records import (
    DISCOVERY_PATH,
    JWKS_PATH,
    STATUSES,
    MintError,
    MintRequest,
    Status,
    TokenQuery,
    valid_jti,
)
from gateway.tokens import Issuer

log = logging.getLogger(__name__)
RUNTIME = web.AppKey("runtime", Runtime)
ADMIN_TOKEN = web.AppKey("admin_token", str)
MAX_PAGE = 1000
MAX_OFFSET = 1_000_000_000  # Redis takes 64-bit offsets: a longer one is a refusal, not an outage

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
    app.router.add_post("/admin/tokens", _mint_token)
    app.router.add_get("/admin/tokens", _list_tokens)
    app.router.add_get("/admin/tokens/{jti}", _show_token)
    app.router.add_delete("/admin/tokens/{jti}", _revoke_token)
    app.router.add_get("/admin/sessions", _list_sessions)
    for path, (name, content_type) in PAGE_FILES.items():
        app.router.add_get(path, _static(name, content_type))
    app.router.add_get(JWKS_PATH, _jwks)
    app.router.add_get(DISCOVERY_PATH, _discovery)
    return app


# The admin page: static files that hold no data (the page asks the admin API, with the token the operator types),
# so they are served without the admin token; the CSP lets them load nothing but themselves and the API.
PAGE_FILES = {
    "/admin": ("admin.html", "text/html"),
    "/admin.js": ("admin.js", "text/javascript"),
    "/admin.css": ("admin.css", "text/css"),
}
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _static(name: str, content_type: str) -> Handler:
    body = resources.files("gateway").joinpath("static", name).read_bytes()

    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type=content_type, charset="utf-8", headers=PAGE_HEADERS)

    return serve


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
    # surrogateescape: header bytes that are not UTF-8 arrive as lone surrogates, which plain encode() refuses
    presented = given.strip().encode("utf-8", "surrogateescape")
    if scheme.lower() != "bearer" or not hmac.compare_digest(presented, expected.encode()):
        response = problem(401, "unauthorized", "a valid admin token is required")
        response.headers["WWW-Authenticate"] = 'Bearer realm="gateway-admin"'
        return response
    try:
        return await handler(request)
    except STORE_ERRORS as exc:
        log.warning("admin request failed: store error", extra={"path": request.path, "error": type(exc).__name__})
        if request.method in ("GET", "HEAD"):
            description = "the store (Redis) is unavailable"
        else:
            # redis-py retries a command that timed out or lost its connection: whatever it raised last, the write
            # may have been carried out. Saying "nothing was changed" would make a client's retry mint a second token.
            description = "the store (Redis) failed during the change, which may have been made: look before retrying"
        response = problem(503, "store_unavailable", f"{description} ({type(exc).__name__})")
        response.headers["Retry-After"] = "5"
        return response


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request's JSON object body, or a 400 that says what is wrong with it."""
    try:
        body = await request.json(loads=jsontext.loads)
    except ValueError as exc:  # UnicodeDecodeError is one
        # jsontext's own refusals (NaN, a repeated key, too deep) say what is wrong; the parser's quote the body.
        detail = "" if isinstance(exc, json.JSONDecodeError | UnicodeDecodeError) else f": {exc}"
        raise web.HTTPBadRequest(
            text=json.dumps({"error": "invalid_request", "error_description": "the body is not valid JSON" + detail}),
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
    if not 0 <= offset <= MAX_OFFSET or not 1 <= limit <= MAX_PAGE:
        raise web.HTTPBadRequest(
            text=json.dumps(
                {
                    "error": "invalid_request",
                    "error_description": f"0 <= offset <= {MAX_OFFSET} and 1 <= limit <= {MAX_PAGE}",
                }
            ),
            content_type="application/json",
        )
    return offset, limit


async def _metrics(request: web.Request) -> web.Response:
    body = exposition(request.app[RUNTIME].metrics)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    ready, detail = readiness(request.app[RUNTIME])
    return web.json_response(detail, status=200 if ready else 503)


async def _revoke(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    try:
        ask = RevokeRequest.model_validate(await read_json(request))
    except ValidationError as exc:
        return problem(400, "invalid_request", describe(exc))
    unknown = unknown_issuer(ask.issuer, runtime.gateway.settings if runtime.gateway is not None else None)
    if unknown:
        return problem(400, "invalid_request", unknown)
    try:
        revocation = ask.revocation()
    except ValueError as exc:
        return problem(400, "invalid_request", str(exc))
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
    runtime = request.app[RUNTIME]
    issuer = query.get("issuer") or None
    if is_final(kind, issuer):
        return problem(409, "conflict", FINAL)
    removed = await runtime.store.remove(kind, query[kind], issuer)
    if not removed:
        return problem(404, "not_found", f"no such {kind} revocation")
    log.info("revocation undone", extra={"kind": kind, "issuer": query.get("issuer")})
    return web.json_response({"removed": True})


# --- The gateway's own tokens (gateway/tokens.py) ---

_STATUS: dict[str, Status] = {s: s for s in STATUSES}
_NOT_CONFIGURED = "the token service is not configured: add a tokens: section (issuer, signing key) to the config"


def _issuer(runtime: Runtime) -> Issuer | None:
    gateway = runtime.gateway
    if gateway is None or gateway.signer is None or gateway.settings.tokens is None:
        return None
    return runtime.tokens.issuer(gateway.settings.tokens, gateway.signer)


async def _mint_token(request: web.Request) -> web.Response:
    """Mint a token; the answer is the only place it is ever shown."""
    runtime = request.app[RUNTIME]
    issuer = _issuer(runtime)
    if issuer is None:
        return problem(404, "not_configured", _NOT_CONFIGURED)
    try:
        ask = MintRequest.model_validate(await read_json(request))
        minted = await runtime.tokens.mint(issuer, ask)
    except ValidationError as exc:
        return problem(400, "invalid_request", describe(exc))
    except MintError as exc:
        return problem(400, "invalid_request", str(exc))
    body = {"token": minted.token, "metadata": minted.record.as_json(time.time())}
    return web.json_response(body, status=201, headers={"Cache-Control": "no-store"})


async def _list_tokens(request: web.Request) -> web.Response:
    query = request.query
    status, kind = query.get("status"), query.get("kind")
    if status is not None and status not in _STATUS:
        return problem(400, "invalid_request", f"status must be one of {', '.join(STATUSES)}")
    if kind is not None and kind not in ("access", "refresh"):
        return problem(400, "invalid_request", "kind must be access or refresh")
    offset, limit = page_params(request)
    filters = TokenQuery(
        subject=query.get("subject") or None,
        audience=query.get("audience") or None,
        status=_STATUS[status] if status is not None else None,
        kind=("refresh" if kind == "refresh" else "access") if kind is not None else None,
    )
    records, more = await request.app[RUNTIME].tokens.listing(filters, offset, limit)
    now = time.time()
    return web.json_response(
        {"items": [r.as_json(now) for r in records], "next_offset": offset + limit if more else None}
    )


async def _show_token(request: web.Request) -> web.Response:
    jti = request.match_info["jti"]
    record = await request.app[RUNTIME].tokens.describe(jti) if valid_jti(jti) else None
    if record is None:
        return problem(404, "not_found", "no such token")
    return web.json_response(record.as_json(time.time()))


async def _revoke_token(request: web.Request) -> web.Response:
    """Revoke a minted token; `reason` and `by` from a JSON body or the query string."""
    jti = request.match_info["jti"]
    if not valid_jti(jti):
        return problem(404, "not_found", "no such token")
    given: dict[str, Any] = {k: request.query[k] for k in ("reason", "by") if k in request.query}
    if request.body_exists:
        body = await read_json(request)
        unknown = sorted(set(body) - {"reason", "by"})
        if unknown:
            return problem(400, "invalid_request", f"{unknown[0]}: unknown field (reason and by are allowed)")
        given.update(body)
    for name, value in given.items():
        if not isinstance(value, str) or len(value) > 512 or any(ord(c) < 32 or ord(c) == 127 for c in value):
            return problem(400, "invalid_request", f"{name}: a string of at most 512 characters, no control characters")
    record = await request.app[RUNTIME].tokens.revoke(jti, given.get("by") or "admin-api", given.get("reason") or "")
    if record is None:
        return problem(404, "not_found", "no such token")
    return web.json_response({"revoked": record.as_json(time.time())})


async def _list_sessions(request: web.Request) -> web.Response:
    offset, limit = page_params(request)
    records, more = await request.app[RUNTIME].tokens.sessions(offset, limit)
    return web.json_response(
        {"items": [r.session_json() for r in records], "next_offset": offset + limit if more else None}
    )


async def _jwks(request: web.Request) -> web.Response:
    issuer = _issuer(request.app[RUNTIME])
    return jwks_response(issuer) if issuer is not None else problem(404, "not_configured", _NOT_CONFIGURED)


async def _discovery(request: web.Request) -> web.Response:
    issuer = _issuer(request.app[RUNTIME])
    return discovery_response(issuer) if issuer is not None else problem(404, "not_configured", _NOT_CONFIGURED)
