"""Every way a request can be refused, with its HTTP meaning (RFC 6750 §3 for bearer errors).

    GatewayError                      status, error, reason (metric label), description
    ├── NoRoute                       404 not_found
    ├── InvalidRequest                400 invalid_request   (two Authorization headers, bad scheme, bad path)
    │   └── HeadersTooLarge           431 a request line or header line over listen.max_header_bytes
    ├── AuthError                     401 invalid_token     (+ WWW-Authenticate)
    │   ├── MissingToken              401 (no error code, RFC 6750 §3.1)
    │   ├── TokenTooLarge, Malformed, BadSignature, UnknownKey, AlgorithmNotAllowed, UnsupportedCritical,
    │   │   Expired, NotYetValid, WrongIssuer, WrongAudience, WrongType, TooLongLived, MissingClaim,
    │   │   Revoked, Inactive
    │   └── InsufficientScope         403 insufficient_scope (+ scope=…)
    ├── Forbidden                     403 access_denied     (required_claims not met)
    ├── DependencyUnavailable         503 temporarily_unavailable (+ Retry-After)
    │   └── KeysUnavailable           503 when an issuer's keys cannot be had
    ├── UpstreamUnavailable           502 bad_gateway
    └── UpstreamTimeout               504 gateway_timeout

The token itself never appears in any of these: descriptions are fixed strings or name claims, not values.
"""

from __future__ import annotations

from typing import ClassVar


class GatewayError(Exception):
    status: ClassVar[int] = 500
    error: ClassVar[str] = "server_error"
    reason: ClassVar[str] = "error"
    description: ClassVar[str] = "internal error"

    def __init__(self, description: str | None = None) -> None:
        if description is not None:
            self.description = description  # type: ignore[misc]  # per-instance detail
        super().__init__(self.description)

    def headers(self, realm: str) -> dict[str, str]:
        """Extra response headers (WWW-Authenticate, Retry-After)."""
        return {}

    def body(self) -> dict[str, str]:
        return {"error": self.error, "error_description": self.description}


class NoRoute(GatewayError):
    status, error, reason, description = 404, "not_found", "no_route", "no route matches this request"


class InvalidRequest(GatewayError):
    status, error, reason, description = 400, "invalid_request", "invalid_request", "malformed request"

    def headers(self, realm: str) -> dict[str, str]:
        return {"WWW-Authenticate": _challenge(realm, self.error, self.description)}


class HeadersTooLarge(InvalidRequest):
    status, description = 431, "request header fields too large"


class TargetTooLong(InvalidRequest):
    status, description = 414, "request target too long"


class MethodNotImplemented(InvalidRequest):
    status, description = 501, "request method not supported"


class VersionNotSupported(InvalidRequest):
    status, description = 505, "HTTP version not supported: HTTP/1.1 or HTTP/1.0 only"


class UnsupportedTransferCoding(InvalidRequest):
    status, description = 501, "no transfer coding but chunked is supported"


class AuthError(GatewayError):
    status, error, reason, description = 401, "invalid_token", "invalid", "the access token is invalid"

    def headers(self, realm: str) -> dict[str, str]:
        return {"WWW-Authenticate": _challenge(realm, self.error, self.description)}


class MissingToken(AuthError):
    reason, description = "missing", "an access token is required"

    def headers(self, realm: str) -> dict[str, str]:
        return {"WWW-Authenticate": f'Bearer realm="{realm}"'}

    def body(self) -> dict[str, str]:
        return {"error": "unauthorized", "error_description": self.description}


class TokenTooLarge(AuthError):
    reason, description = "oversized", "the access token is too large"


class Malformed(AuthError):
    reason, description = "malformed", "the access token is malformed"


class BadSignature(AuthError):
    reason, description = "bad_signature", "the token signature is invalid"


class UnknownKey(AuthError):
    reason, description = "unknown_kid", "the token was signed with an unknown key"


class AlgorithmNotAllowed(AuthError):
    reason, description = "algorithm", "the token's signing algorithm is not allowed"


class UnsupportedCritical(AuthError):
    reason, description = "crit", "the token has critical header parameters that are not supported"


class Expired(AuthError):
    reason, description = "expired", "the token has expired"


class NotYetValid(AuthError):
    reason, description = "not_yet_valid", "the token is not valid yet"


class WrongIssuer(AuthError):
    reason, description = "issuer", "the token's issuer is not accepted here"


class WrongAudience(AuthError):
    reason, description = "audience", "the token is not meant for this audience"


class WrongType(AuthError):
    reason, description = "typ", "the token type is not accepted here"


class TooLongLived(AuthError):
    reason, description = "lifetime", "the token's lifetime exceeds the allowed maximum"


class MissingClaim(AuthError):
    reason, description = "missing_claim", "the token lacks a required claim"


class Revoked(AuthError):
    reason, description = "revoked", "the token has been revoked"


class Inactive(AuthError):
    reason, description = "inactive", "the token is not active"


class InsufficientScope(AuthError):
    status, error, reason, description = (
        403,
        "insufficient_scope",
        "scope",
        "the token lacks a required scope",
    )

    def __init__(self, required: tuple[str, ...]) -> None:
        self.required = required
        super().__init__()

    def headers(self, realm: str) -> dict[str, str]:
        scope = " ".join(self.required)
        return {"WWW-Authenticate": _challenge(realm, self.error, self.description) + f', scope="{scope}"'}


class Forbidden(GatewayError):
    status, error, reason, description = (
        403,
        "access_denied",
        "claims",
        "the token does not meet this route's rules",
    )


class DependencyUnavailable(GatewayError):
    status, error, reason = 503, "temporarily_unavailable", "unavailable"
    description = "a service needed to check the token is unavailable"
    retry_after: ClassVar[int] = 5

    def headers(self, realm: str) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class KeysUnavailable(DependencyUnavailable):
    reason, description = "keys_unavailable", "the issuer's signing keys are unavailable"


class UpstreamUnavailable(GatewayError):
    status, error, reason, description = (
        502,
        "bad_gateway",
        "upstream_unavailable",
        "the upstream is unavailable",
    )


class UpstreamTimeout(GatewayError):
    status, error, reason, description = (
        504,
        "gateway_timeout",
        "upstream_timeout",
        "the upstream did not answer",
    )


class RequestBodyTimeout(GatewayError):
    """The client, not the upstream, was waited on: its body stopped arriving (RFC 9110 §15.5.9)."""

    status, error, reason, description = (
        408,
        "request_timeout",
        "client_timeout",
        "the request body did not arrive in time",
    )


def _challenge(realm: str, error: str, description: str) -> str:
    # Descriptions are our own fixed strings; quotes/backslashes are escaped anyway for a valid header.
    safe = description.replace("\\", "\\\\").replace('"', '\\"')
    return f'Bearer realm="{realm}", error="{error}", error_description="{safe}"'
