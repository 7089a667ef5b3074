"""What an operator asks to revoke, validated the same way for the admin API and the CLI."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from gateway.config import GATEWAY_ISSUER_NAME, Settings
from gateway.store import Revocation
from gateway.token_records import REVOCATION_MARGIN

# A revoked jti whose token's exp is not given is kept for good: whatever it outlived, it must not come back.
FOREVER = 253402300799.0  # 9999-12-31T23:59:59Z, the last time ISO 8601 and every store can write


def parse_time(value: Any) -> float:
    """Unix seconds, or an ISO 8601 date-time (with a zone, or UTC if none), between 1970 and 9999."""
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value) if -FOREVER <= value <= FOREVER else None  # NaN too; a huge int overflows float()
    elif isinstance(value, str):
        try:
            seconds = float(value)
        except ValueError:
            try:
                parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                raise ValueError(f"expected unix seconds or an ISO 8601 time, got {value!r}") from None
            seconds = (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()
    if seconds is None or not 0 <= seconds <= FOREVER:  # NaN fails every comparison
        raise ValueError("expected unix seconds or an ISO 8601 time between 1970 and 9999")
    return seconds


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
        """What the store keeps; ValueError when there is nothing left to revoke."""
        now = time.time() if now is None else now
        if self.jti is not None:
            if self.expires_at is None:
                return Revocation("jti", self.jti, FOREVER, self.issuer)
            # Kept past exp for as long as any verifier's leeway could still accept the token.
            until = min(self.expires_at + REVOCATION_MARGIN, FOREVER)
            if until <= now:
                raise ValueError("expires_at: the token expired long enough ago to be refused anyway")
            return Revocation("jti", self.jti, until, self.issuer)
        assert self.subject is not None  # noqa: S101 - guaranteed by _one_target
        return Revocation("subject", self.subject, self.before if self.before is not None else now, self.issuer)


# The token service marks what it revokes in the token's metadata and takes a refresh key's family along: removing
# only the revocation entry would leave the two disagreeing, and bring back tokens the family revocation meant.
FINAL = "revocations of the gateway's own tokens (issuer gateway) are final: mint a new token instead"


def is_final(kind: str, issuer: str | None) -> bool:
    return kind == "jti" and issuer == GATEWAY_ISSUER_NAME


def unknown_issuer(issuer: str | None, settings: Settings | None) -> str | None:
    """The problem with scoping a revocation to `issuer`, or None: a name that is none of the issuers of `settings`
    (its `issuers:` and `introspection:` endpoints, and the gateway's own with `tokens:`) would revoke nothing."""
    # Introspected identities carry their endpoint's name as their issuer.
    known = {i.name for i in settings.issuers} | {e.name for e in settings.introspection} if settings else set()
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
