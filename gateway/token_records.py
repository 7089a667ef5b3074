"""Long-lived tokens as data: what an operator asks to mint, what the store keeps, how listings filter.

No I/O here: `tokens.py` mints and revokes with these, `admin.py` and `cli.py` parse and show them.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from gateway.config import Duration

Kind = Literal["access", "refresh"]
Status = Literal["active", "revoked", "expired", "retired"]
STATUSES: tuple[Status, ...] = ("active", "revoked", "expired", "retired")
ACCESS_TYP = "at+jwt"  # RFC 9068
REFRESH_TYP = "rt+jwt"
RESERVED_CLAIMS = frozenset(
    {"iss", "sub", "aud", "exp", "nbf", "iat", "jti", "scope", "scp", "typ", "cty", "alg", "kid", "client_id",
     "azp", "cnf", "act", "may_act", "auth_time", "acr", "amr", "sid", "nonce", "at_hash", "token_use"}
)  # fmt: skip
MAX_EXTRA_CLAIMS_BYTES = 4096
MAX_FORM_BYTES = 16384
MAX_REFRESH_KEY_BYTES = 8192
REVOCATION_MARGIN = 300.0  # a revocation outlives the token's exp by this: verifiers allow leeway past exp
LEEWAY = 30.0  # clock skew between instances, for the refresh key's exp and iat

JWKS_PATH = "/.well-known/jwks.json"
DISCOVERY_PATH = "/.well-known/openid-configuration"
TOKEN_PATH = "/oauth/token"  # noqa: S105 - a path, not a secret
PUBLIC_PATHS = frozenset({JWKS_PATH, DISCOVERY_PATH, TOKEN_PATH})

SCOPE_TOKEN = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+$")  # RFC 6749 §3.3
_JTI = re.compile(r"^[A-Za-z0-9._~-]{1,128}$")
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}  # RFC 6749 §5.1


class MintError(ValueError):
    """A mint request that the configuration refuses (e.g. a lifetime over tokens.max_lifetime)."""


class OAuthError(Exception):
    """An error response of the token endpoint (RFC 6749 §5.2): 400, `error` code and a fixed description."""

    def __init__(self, error: str, description: str) -> None:
        self.error = error
        self.description = description
        super().__init__(description)


# --- What an operator asks for --------------------------------------------------------------------------------------


def _scopes(value: Any) -> Any:
    """A list of scope tokens, or one space-separated string of them."""
    if isinstance(value, str):
        return value.split()
    return value


def _audiences(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


Text = Annotated[str, Field(min_length=1, max_length=512, pattern=r"^[^\x00-\x1f\x7f]+$")]
ScopeToken = Annotated[str, Field(max_length=256, pattern=SCOPE_TOKEN.pattern)]


class MintRequest(BaseModel):
    """The body of POST /admin/tokens (and the options of `gateway tokens mint`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    subject: Text = Field(description="`sub` of the token: who or what it speaks for.")
    audience: Annotated[tuple[Text, ...], BeforeValidator(_audiences), Field(max_length=16)] = Field(
        (), description="`aud` (one or several); default tokens.audiences."
    )
    scopes: Annotated[tuple[ScopeToken, ...], BeforeValidator(_scopes), Field(max_length=64)] = Field(
        (), description="Scopes granted (a list, or a space-separated string)."
    )
    lifetime: Duration | None = Field(None, description="365d, 90d, 12h…; default tokens.default_lifetime.")
    note: Annotated[str, Field(max_length=1024, pattern=r"^[^\x00]*$")] | None = None
    claims: dict[str, Any] = Field(default_factory=dict, description="Extra claims; registered ones are refused.")
    kind: Kind = Field("access", description="access: a bearer token; refresh: a key for POST /oauth/token.")
    rotate: bool = Field(False, description="refresh only: each exchange returns a new key and retires this one.")

    @field_validator("claims")
    @classmethod
    def _free_claims(cls, claims: dict[str, Any]) -> dict[str, Any]:
        reserved = sorted(name for name in claims if name in RESERVED_CLAIMS)
        if reserved:
            raise ValueError(f"{', '.join(reserved)} reserved: set by the gateway, not by extra claims")
        if any(not name or len(name) > 64 for name in claims):
            raise ValueError("claim names must have 1 to 64 characters")
        try:  # a lone surrogate ("\udcff" in JSON, or a CLI argument that is not UTF-8) is no Unicode text
            encoded = json.dumps(claims, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("claims must be Unicode text (a lone surrogate is not)") from None
        if len(encoded) > MAX_EXTRA_CLAIMS_BYTES:
            raise ValueError(f"extra claims may take {MAX_EXTRA_CLAIMS_BYTES} bytes of JSON at most")
        return claims

    @model_validator(mode="after")
    def _rotate_refresh_only(self) -> MintRequest:
        if self.rotate and self.kind != "refresh":
            raise ValueError("rotate applies to refresh keys only (kind: refresh)")
        return self


# --- What the store keeps -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenRecord:
    """The metadata of one minted token (the Redis hash `token:{jti}`; field writers: gateway/store.py)."""

    jti: str
    kind: Kind
    subject: str
    audiences: tuple[str, ...]
    scopes: tuple[str, ...]
    claims: dict[str, Any]  # every claim the token carries
    note: str | None
    created_at: float
    expires_at: float
    token_sha256: str
    rotate: bool = False
    family: str | None = None  # refresh keys: the jti of the first key of the rotation chain
    parent: str | None = None  # a rotated refresh key: the key it replaced
    revoked_at: float | None = None
    revoked_by: str | None = None
    revoke_reason: str | None = None
    retired_at: float | None = None
    replaced_by: str | None = None
    first_seen: float | None = None
    last_used_at: float | None = None
    last_client: str | None = None
    last_user_agent: str | None = None

    def fields(self) -> dict[str, str]:
        """The fields written at mint (the others have writers of their own)."""
        return {
            "jti": self.jti,
            "kind": self.kind,
            "subject": self.subject,
            "audiences": json.dumps(list(self.audiences)),
            "scopes": json.dumps(list(self.scopes)),
            "claims": json.dumps(self.claims, separators=(",", ":")),
            "note": self.note or "",
            "created_at": repr(self.created_at),
            "expires_at": repr(self.expires_at),
            "token_sha256": self.token_sha256,
            "rotate": "1" if self.rotate else "0",
            "family": self.family or "",
            "parent": self.parent or "",
        }

    @classmethod
    def from_fields(cls, raw: dict[str, str]) -> TokenRecord | None:
        """Parse a stored hash; None for one that is not a whole token record."""
        try:
            kind = raw["kind"]
            if kind not in ("access", "refresh"):
                return None
            return cls(
                jti=raw["jti"],
                kind="refresh" if kind == "refresh" else "access",
                subject=raw["subject"],
                audiences=tuple(json.loads(raw["audiences"])),
                scopes=tuple(json.loads(raw["scopes"])),
                claims=json.loads(raw["claims"]),
                note=raw.get("note") or None,
                created_at=float(raw["created_at"]),
                expires_at=float(raw["expires_at"]),
                token_sha256=raw["token_sha256"],
                rotate=raw.get("rotate") == "1",
                family=raw.get("family") or None,
                parent=raw.get("parent") or None,
                revoked_at=_float(raw.get("revoked_at")),
                revoked_by=raw.get("revoked_by") or None,
                revoke_reason=raw.get("revoke_reason") or None,
                retired_at=_float(raw.get("retired_at")),
                replaced_by=raw.get("replaced_by") or None,
                first_seen=_float(raw.get("first_seen")),
                last_used_at=_float(raw.get("last_used_at")),
                last_client=raw.get("last_client") or None,
                last_user_agent=raw.get("last_user_agent") or None,
            )
        except (KeyError, ValueError, TypeError):
            return None

    def status(self, now: float) -> Status:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at <= now:
            return "expired"
        if self.retired_at is not None:
            return "retired"
        return "active"

    def last_device(self) -> dict[str, str | None] | None:
        if self.last_used_at is None:
            return None
        return {"client": self.last_client, "user_agent": self.last_user_agent}

    def as_json(self, now: float) -> dict[str, Any]:
        """Everything an operator sees about a token (never the token itself)."""
        return {
            "jti": self.jti,
            "kind": self.kind,
            "status": self.status(now),
            "subject": self.subject,
            "audience": list(self.audiences),
            "scopes": list(self.scopes),
            "claims": self.claims,
            "note": self.note,
            "created_at": round(self.created_at, 3),
            "expires_at": self.expires_at,
            "lifetime": self.expires_at - int(self.created_at),
            "revoked_at": self.revoked_at,
            "revoked_by": self.revoked_by,
            "revoke_reason": self.revoke_reason,
            "first_seen": self.first_seen,
            "last_seen": self.last_used_at,
            "last_used_at": self.last_used_at,
            "last_device": self.last_device(),
            "token_sha256": self.token_sha256,
            "rotate": self.rotate,
            "family": self.family,
            "parent": self.parent,
            "retired_at": self.retired_at,
            "replaced_by": self.replaced_by,
        }

    def session_json(self) -> dict[str, Any]:
        return {
            "jti": self.jti,
            "kind": self.kind,
            "subject": self.subject,
            "scopes": list(self.scopes),
            "issued_at": int(self.created_at),
            "expires_at": self.expires_at,
            "first_seen": self.first_seen,
            "last_seen": self.last_used_at,
            "last_device": self.last_device(),
            "note": self.note,
        }


def _float(value: str | None) -> float | None:
    return float(value) if value else None


@dataclass(frozen=True)
class TokenQuery:
    """Filters of a token listing; None matches anything."""

    subject: str | None = None
    audience: str | None = None
    status: Status | None = None
    kind: Kind | None = None

    def matches(self, record: TokenRecord, now: float) -> bool:
        return (
            (self.subject is None or record.subject == self.subject)
            and (self.audience is None or self.audience in record.audiences)
            and (self.kind is None or record.kind == self.kind)
            and (self.status is None or record.status(now) == self.status)
        )


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def valid_jti(jti: str) -> bool:
    return bool(_JTI.match(jti))


def human(seconds: float) -> str:
    """30 -> '30s', 86400 -> '1d', 5400 -> '90m'."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
