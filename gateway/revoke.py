"""What an operator asks to revoke, validated the same way for the admin API and the CLI."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from gateway.config import GATEWAY_ISSUER_NAME, Settings
from gateway.store import Revocation

# A revoked jti whose token's exp is not given is kept this long: longer than any token the gateway would mint.
DEFAULT_JTI_RETENTION = 400 * 86400.0


def parse_time(value: Any) -> float:
    """Unix seconds, or an ISO 8601 date-time (with a zone, or UTC if none)."""
    if isinstance(value, bool):
        raise ValueError("expected unix seconds or an ISO 8601 time")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"expected unix seconds or an ISO 8601 time, got {value!r}") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.timestamp()
    raise ValueError("expected unix seconds or an ISO 8601 time")


Time = Annotated[float, BeforeValidator(parse_time)]
Text = Annotated[str, Field(min_length=1, max_length=512, pattern=r"^[^\x00-\x1f\x7f]+$")]


class RevokeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    jti: Text | None = None
    subject: Text | None = None
    issuer: Text | None = Field(None, description="Only this issuer's tokens (by configured name); none: every issuer.")
    expires_at: Time | None = Field(None, description="jti: the token's exp (the entry is kept until then).")
    before: Time | None = Field(None, description="subject: revoke tokens issued before this (default: now).")
    reason: Annotated[str, Field(max_length=512)] | None = None

    @model_validator(mode="after")
    def _one_target(self) -> RevokeRequest:
        if (self.jti is None) == (self.subject is None):
            raise ValueError("give exactly one of jti or subject")
        if self.jti is not None and self.before is not None:
            raise ValueError("before applies to subject revocations; for a jti give expires_at")
        if self.subject is not None and self.expires_at is not None:
            raise ValueError("expires_at applies to jti revocations; for a subject give before")
        return self

    def revocation(self, now: float | None = None) -> Revocation:
        now = time.time() if now is None else now
        if self.jti is not None:
            return Revocation("jti", self.jti, self.expires_at or now + DEFAULT_JTI_RETENTION, self.issuer)
        assert self.subject is not None  # noqa: S101 - guaranteed by _one_target
        return Revocation("subject", self.subject, self.before if self.before is not None else now, self.issuer)


def unknown_issuer(issuer: str | None, settings: Settings | None) -> str | None:
    """The problem with scoping a revocation to `issuer`, or None: a name that is none of the issuers of `settings`
    (its `issuers:`, and the gateway's own with `tokens:`) would revoke nothing."""
    known = {i.name for i in settings.issuers} if settings is not None else set()
    if settings is not None and settings.tokens is not None:
        known.add(GATEWAY_ISSUER_NAME)
    return None if issuer is None or issuer in known else f"issuer: unknown issuer '{issuer}'"


def describe(error: ValidationError) -> str:
    """One line per problem, 'field: what was expected'."""
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "body"
        parts.append(f"{where}: {item['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)
