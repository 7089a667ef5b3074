"""The gateway's public OAuth endpoints, on the proxy listener before route matching: JWKS, discovery and the
token endpoint (RFC 6749 §6 refresh grant; errors as §5.2, never cached, §5.1).
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse

from aiohttp import web

from gateway import errors
from gateway.listener import Request
from gateway.store import STORE_ERRORS
from gateway.token_records import JWKS_PATH, MAX_FORM_BYTES, NO_STORE, TOKEN_PATH, OAuthError
from gateway.tokens import Issuer, TokenService

log = logging.getLogger(__name__)

# The form is a few hundred bytes: a client that has not sent it in this long is not going to (or is holding the
# connection and its task on purpose).
FORM_TIMEOUT = 10.0


class SlowBody(Exception):
    """The token request's body did not arrive within FORM_TIMEOUT."""


# --- The public endpoints (proxy listener; JWKS and discovery also on the admin listener) ---------------------------


def jwks_response(issuer: Issuer) -> web.Response:
    return web.json_response(issuer.signer.jwks(), headers={"Cache-Control": "public, max-age=300"})


def discovery_response(issuer: Issuer) -> web.Response:
    return web.json_response(issuer.discovery(), headers={"Cache-Control": "public, max-age=300"})


async def serve_public(request: Request, service: TokenService, issuer: Issuer, client: str | None) -> web.Response:
    """JWKS, discovery and the token endpoint, for a request whose path is in PUBLIC_PATHS; `client`: its address."""
    if request.path == TOKEN_PATH:
        if request.method != "POST":
            return _oauth_error(405, "invalid_request", "use POST", {"Allow": "POST"})
        return await _token_endpoint(request, service, issuer, client)
    if request.method not in ("GET", "HEAD"):
        return web.json_response(
            {"error": "invalid_request", "error_description": "use GET"}, status=405, headers={"Allow": "GET, HEAD"}
        )
    return jwks_response(issuer) if request.path == JWKS_PATH else discovery_response(issuer)


async def _token_endpoint(request: Request, service: TokenService, issuer: Issuer, client: str | None) -> web.Response:
    try:
        form = await _read_form(request)
        body = await service.exchange(issuer, form, client, request.headers.get("User-Agent"))
    except SlowBody:
        log.info("token request refused: the body did not arrive in time", extra={"client": client})
        return _oauth_error(408, "invalid_request", "the request body did not arrive in time")
    except OAuthError as exc:
        log.info("token request refused", extra={"error": exc.error, "client": client})
        return _oauth_error(400, exc.error, exc.description)
    except errors.DependencyUnavailable as exc:
        return _oauth_error(503, "temporarily_unavailable", exc.description, {"Retry-After": str(exc.retry_after)})
    except STORE_ERRORS as exc:
        log.error("token request failed: store unreachable", extra={"error": type(exc).__name__})
        return _oauth_error(503, "temporarily_unavailable", "the token store is unavailable", {"Retry-After": "5"})
    return web.json_response(body, headers=NO_STORE)


async def _read_form(request: Request) -> dict[str, str]:
    """The form body (RFC 6749 §4.1.3 / §6): urlencoded, small, UTF-8, no parameter twice (§3.2)."""
    content_type = request.headers.get("Content-Type", "").partition(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        raise OAuthError("invalid_request", "the body must be application/x-www-form-urlencoded")
    length = request.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > MAX_FORM_BYTES:
        raise OAuthError("invalid_request", "the body is too large")
    data = b""
    if request.body is not None:
        request.send_continue()
        try:
            async with asyncio.timeout(FORM_TIMEOUT):
                read = await request.body.read(MAX_FORM_BYTES)
        except TimeoutError:
            raise SlowBody from None
        if read is None:
            raise OAuthError("invalid_request", "the body is too large")
        data = read
    try:
        pairs = urllib.parse.parse_qsl(data.decode("utf-8"), keep_blank_values=True, max_num_fields=32)
    except (UnicodeDecodeError, ValueError):
        raise OAuthError("invalid_request", "the body is not a valid form") from None
    form: dict[str, str] = {}
    for name, value in pairs:
        if name in form:
            known = name if name in ("grant_type", "refresh_token", "scope", "client_id") else "a parameter"
            raise OAuthError("invalid_request", f"{known} is repeated")
        form[name] = value
    return form


def _oauth_error(status: int, error: str, description: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(
        {"error": error, "error_description": description}, status=status, headers={**NO_STORE, **(headers or {})}
    )
