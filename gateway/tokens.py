"""The token service: long-lived tokens the gateway mints itself, and the refresh grant (RFC 6749 §6) for them.

Minting signs a JWT with the first `tokens:` key (typ `at+jwt`, RFC 9068; or `rt+jwt` for a refresh key) and
stores its metadata and SHA-256 — never the token, which is shown once. Operators list, show and revoke tokens
(admin API, CLI); a revoke goes through the revocation set, so every instance refuses the token within the
mirror's propagation bound.

Refresh keys are not bearer tokens: the gateway's own issuer requires `typ: at+jwt` on routes, and a refresh key's
`aud` is the issuer itself. `POST /oauth/token` (grant_type=refresh_token) exchanges one for a short-lived access
token with the key's audiences and scopes, or a subset of the scopes (RFC 6749 §6). A key minted with
`rotate: true` is replaced at each exchange; presenting a replaced key again is refresh token reuse (OAuth 2.0
Security BCP, RFC 9700 §4.14.2): the whole family — every key of the chain and the access tokens minted from them —
is revoked. Errors follow RFC 6749 §5.2.

Data types (what is asked, what is stored) are in `token_records.py`; the public HTTP endpoints (JWKS, discovery,
token), served on the proxy listener before route matching, in `oauth.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import jwt

from gateway import errors
from gateway.config import GATEWAY_ISSUER_NAME, TokensSettings
from gateway.identity import Identity
from gateway.revocation import RevocationCheck
from gateway.revoke import FOREVER
from gateway.signing import Signer
from gateway.store import TOKEN_RETENTION, Revocation, Store, cutoff_in
from gateway.token_records import (
    ACCESS_TYP,
    JWKS_PATH,
    LEEWAY,
    MAX_REFRESH_KEY_BYTES,
    REFRESH_TYP,
    RESERVED_CLAIMS,
    REVOCATION_MARGIN,
    SCOPE_TOKEN,
    TOKEN_PATH,
    Kind,
    MintError,
    MintRequest,
    OAuthError,
    TokenQuery,
    TokenRecord,
    human,
    token_sha256,
)
from gateway.usage import UsageTracker
from gateway.verify.keys import KeySet

log = logging.getLogger(__name__)

# --- The service ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Issuer:
    """The configured issuer (tokens:) with its signer, and the key set that verifies refresh keys."""

    settings: TokensSettings
    signer: Signer
    key_set: KeySet = field(compare=False)

    @classmethod
    def of(cls, settings: TokensSettings, signer: Signer) -> Issuer:
        return cls(settings, signer, signer.key_set())

    def discovery(self) -> dict[str, Any]:
        base = self.settings.issuer.rstrip("/")
        return {
            "issuer": self.settings.issuer,
            "jwks_uri": base + JWKS_PATH,
            "token_endpoint": base + TOKEN_PATH,
            "grant_types_supported": ["refresh_token"],
            "token_endpoint_auth_methods_supported": ["none"],
            "response_types_supported": [],
            "id_token_signing_alg_values_supported": sorted({k.alg for k in self.signer.keys}),
        }


@dataclass
class Minted:
    token: str  # shown once, never stored
    record: TokenRecord


class TokenService:
    """Mint, list, show and revoke the gateway's own tokens; exchange refresh keys (RFC 6749 §6)."""

    def __init__(
        self,
        store: Store,
        revocation: RevocationCheck | None = None,
        usage: UsageTracker | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.revocation = revocation  # None in the CLI, which exchanges nothing
        self.usage = usage
        self._clock = clock
        self._issuer: Issuer | None = None

    def issuer(self, settings: TokensSettings, signer: Signer) -> Issuer:
        """The Issuer of the current config (rebuilt only when a reload changed it)."""
        cached = self._issuer
        if cached is None or cached.signer is not signer or cached.settings != settings:
            cached = self._issuer = Issuer.of(settings, signer)
        return cached

    async def mint(self, issuer: Issuer, ask: MintRequest, now: float | None = None) -> Minted:
        now = self._clock() if now is None else now
        settings = issuer.settings
        lifetime = settings.default_lifetime if ask.lifetime is None else ask.lifetime
        if lifetime < 1:  # exp and iat are whole seconds: shorter would be dead on arrival
            raise MintError("lifetime: must be 1s or longer")
        if lifetime > settings.max_lifetime:
            raise MintError(
                f"lifetime: {human(lifetime)} is longer than tokens.max_lifetime ({human(settings.max_lifetime)})"
            )
        now = await self._after_cutoff(ask.subject, now)
        jti = _new_jti()
        minted = await self._mint(
            issuer,
            kind=ask.kind,
            jti=jti,
            subject=ask.subject,
            audiences=tuple(dict.fromkeys(ask.audience or settings.audiences)),
            scopes=tuple(dict.fromkeys(ask.scopes)),
            extra=ask.claims,
            note=ask.note,
            now=now,
            exp=int(now + lifetime),
            rotate=ask.rotate,
            family=jti if ask.kind == "refresh" else None,
            parent=None,
        )
        log.info("token minted", extra={"jti": jti, "kind": ask.kind, "subject": ask.subject})
        return minted

    async def _after_cutoff(self, subject: str, now: float) -> float:
        """`now`, or the first whole second after the subject's revocation cut-off when that fell in this second.

        iat is whole seconds: a token minted in the second a subject was revoked, after the revocation, would
        carry an iat before the cut-off and be refused as revoked. So minting waits for the next second (up to
        2 s, a cut-off up to 1 s ahead allowing for another instance's clock); one further ahead (a subject barred
        until then) is refused."""
        cutoff = await self.store.subject_cutoff(subject, GATEWAY_ISSUER_NAME)
        if int(now) >= cutoff:
            return now
        if cutoff - now > 1:
            barred = datetime.fromtimestamp(min(cutoff, FOREVER), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            raise MintError(f"subject: its tokens issued before {barred} are revoked; mint after that")
        await asyncio.sleep(math.ceil(cutoff) - now)
        return max(self._clock(), float(math.ceil(cutoff)))

    async def _mint(
        self,
        issuer: Issuer,
        *,
        kind: Kind,
        jti: str,
        subject: str,
        audiences: tuple[str, ...],
        scopes: tuple[str, ...],
        extra: dict[str, Any],
        note: str | None,
        now: float,
        exp: int,
        rotate: bool,
        family: str | None,
        parent: str | None,
    ) -> Minted:
        claims: dict[str, Any] = {**extra, "iss": issuer.settings.issuer, "sub": subject, "iat": int(now), "exp": exp}
        # A refresh key is addressed to the token endpoint (its issuer): a resource server checking `aud` refuses
        # it even if it skips the `typ` check. The audiences it grants live in its metadata.
        claims["aud"] = issuer.settings.issuer if kind == "refresh" else _aud(audiences)
        claims["jti"] = jti
        if scopes:
            claims["scope"] = " ".join(scopes)
        token = issuer.signer.sign(claims, typ=REFRESH_TYP if kind == "refresh" else ACCESS_TYP)
        record = TokenRecord(
            jti=jti,
            kind=kind,
            subject=subject,
            audiences=audiences,
            scopes=scopes,
            claims=claims,
            note=note,
            created_at=now,
            expires_at=float(exp),
            token_sha256=token_sha256(token),
            rotate=rotate,
            family=family,
            parent=parent,
        )
        await self.store.put_token(jti, record.fields(), now, exp + TOKEN_RETENTION, family, float(exp))
        return Minted(token, record)

    async def show(self, jti: str) -> TokenRecord | None:
        raw = await self.store.get_token(jti)
        return TokenRecord.from_fields(raw) if raw is not None else None

    async def describe(self, jti: str) -> TokenRecord | None:
        """As `show`, revoked too when its subject's revocation covers it: what an operator is shown."""
        record = await self.show(jti)
        if record is None:
            return None
        return _covered(record, await self.store.subject_cutoff(record.subject, GATEWAY_ISSUER_NAME))

    async def listing(
        self, query: TokenQuery, offset: int, limit: int, now: float | None = None
    ) -> tuple[list[TokenRecord], bool]:
        """One page of matching tokens, newest first, and whether more follow.

        Filters apply while scanning the index, so a page costs what precedes it; tokens are operator-made and
        few (thousands), which keeps this cheap."""
        now = self._clock() if now is None else now
        cutoffs = await self.store.subject_cutoffs()
        found: list[TokenRecord] = []
        skipped = 0
        async with contextlib.aclosing(self.store.scan_tokens()) as rows:
            async for raw in rows:
                record = _subject_covered(TokenRecord.from_fields(raw), cutoffs)
                if record is None or not query.matches(record, now):
                    continue
                if skipped < offset:
                    skipped += 1
                    continue
                found.append(record)
                if len(found) > limit:
                    break
        return found[:limit], len(found) > limit

    async def sessions(self, offset: int, limit: int, now: float | None = None) -> tuple[list[TokenRecord], bool]:
        """Active minted tokens that have been used, most recently used first."""
        now = self._clock() if now is None else now
        cutoffs = await self.store.subject_cutoffs()
        seen: list[TokenRecord] = []
        async with contextlib.aclosing(self.store.scan_tokens()) as rows:
            async for raw in rows:
                record = _subject_covered(TokenRecord.from_fields(raw), cutoffs)
                if record is not None and record.last_used_at is not None and record.status(now) == "active":
                    seen.append(record)
        seen.sort(key=lambda r: (r.last_used_at or 0.0, r.jti), reverse=True)
        return seen[offset : offset + limit], len(seen) > offset + limit

    async def revoke(self, jti: str, by: str, reason: str, now: float | None = None) -> TokenRecord | None:
        """Revoke a minted token through the revocation set and record when, by whom and why.

        A refresh key takes its whole family with it: every key of its rotation chain and the live access tokens
        minted from them. Revoking again changes nothing (the first revoked_at stays). None: no such token."""
        now = self._clock() if now is None else now
        record = await self.show(jti)
        if record is None:
            return None
        await self._revoke_one(jti, record.expires_at, by, reason, now)
        if record.family is not None:
            await self.revoke_family(record.family, by, reason, now)
        log.info("token revoked", extra={"jti": jti, "kind": record.kind, "by": by, "reason": reason})
        return await self.show(jti)

    async def revoke_family(self, family: str, by: str, reason: str, now: float) -> int:
        """Revoke every live member of a refresh key family.

        The family's first key (its id) is marked first: an exchange in flight adds its new tokens to the family,
        then checks that mark, so no token minted concurrently escapes (see `exchange`)."""
        root = await self.show(family)
        if root is not None:
            await self._revoke_one(family, root.expires_at, by, reason, now)
        members = await self.store.family_members(family, now - REVOCATION_MARGIN)
        for jti, exp in members.items():
            await self._revoke_one(jti, exp, by, reason, now)
        return len(members)

    async def _revoke_one(self, jti: str, exp: float, by: str, reason: str, now: float) -> None:
        # The revocation set first: the token is refused as soon as possible; then the metadata (if it has any).
        await self.store.add(Revocation("jti", jti, exp + REVOCATION_MARGIN, GATEWAY_ISSUER_NAME))
        await self.store.mark_revoked(jti, now, by, reason)

    # --- RFC 6749 §6: the refresh grant ---

    async def exchange(
        self, issuer: Issuer, form: dict[str, str], client: str | None, user_agent: str | None
    ) -> dict[str, Any]:
        """Exchange a refresh key for an access token (RFC 6749 §6); the answer body of §5.1, or OAuthError (§5.2).

        May raise errors.DependencyUnavailable (revocation set not current) or a store error: the caller answers
        503, since the key cannot be judged."""
        now = self._clock()
        grant = form.get("grant_type")
        if not grant:
            raise OAuthError("invalid_request", "grant_type is required")
        if grant != "refresh_token":
            raise OAuthError("unsupported_grant_type", "only grant_type=refresh_token is supported")
        presented = form.get("refresh_token")
        if not presented:
            raise OAuthError("invalid_request", "refresh_token is required")
        claims = self._verify_refresh_key(issuer, presented)
        jti = claims["jti"]
        self._check_revocation(claims)
        record = await self.show(jti)
        if record is None or record.kind != "refresh" or record.token_sha256 != token_sha256(presented):
            raise OAuthError("invalid_grant", "the refresh key is not known to this gateway")
        if record.revoked_at is not None:
            raise OAuthError("invalid_grant", "the refresh key has been revoked")
        if record.expires_at <= now:  # the leeway is for the key's signature check, not for a longer life
            raise OAuthError("invalid_grant", "the refresh key has expired")
        scopes = _narrow(record.scopes, form.get("scope"))
        if self.usage is not None:
            self.usage.record(jti, client, user_agent)

        new_key: Minted | None = None
        if record.rotate:
            new_jti = _new_jti()
            outcome = await self.store.retire_token(jti, now, new_jti)
            if outcome == "already":
                await self._reuse_detected(record, client, now)
                raise OAuthError("invalid_grant", "the refresh key has already been used")
            if outcome == "missing":
                raise OAuthError("invalid_grant", "the refresh key is not known to this gateway")
            new_key = await self._mint(
                issuer,
                kind="refresh",
                jti=new_jti,
                subject=record.subject,
                audiences=record.audiences,
                scopes=record.scopes,  # RFC 6749 §6: the new refresh token keeps the scope of the one it replaces
                extra=_extra(record.claims),
                note=record.note,
                now=now,
                exp=int(record.expires_at),  # rotation never extends the family's life
                rotate=True,
                family=record.family,
                parent=jti,
            )

        access = self._access_token(issuer, record, scopes, now)
        if record.family is not None:
            until = record.expires_at + TOKEN_RETENTION
            await self.store.add_to_family(record.family, access.jti, access.exp, until)
            root = await self.show(record.family)
            if root is not None and root.revoked_at is not None:  # revoked while we were minting: ours go too
                await self.revoke_family(record.family, root.revoked_by or "", root.revoke_reason or "", now)
                raise OAuthError("invalid_grant", "the refresh key has been revoked")
        log.info(
            "refresh key exchanged",
            extra={"event": "refresh_token_exchange", "jti": jti, "access_jti": access.jti, "subject": record.subject,
                   "client": client, "rotated": new_key is not None},
        )  # fmt: skip
        body: dict[str, Any] = {
            "access_token": access.token,
            "token_type": "Bearer",
            "expires_in": max(0, int(access.exp - now)),
            "scope": " ".join(scopes),
        }
        if new_key is not None:
            body["refresh_token"] = new_key.token
        return body

    def _verify_refresh_key(self, issuer: Issuer, token: str) -> dict[str, Any]:
        """Signature (the signer's key set), iss, aud, typ rt+jwt, exp, iat — never the token in an error."""
        if len(token) > MAX_REFRESH_KEY_BYTES:
            raise OAuthError("invalid_grant", "the refresh key is malformed")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise OAuthError("invalid_grant", "the refresh key is malformed") from None
        typ = header.get("typ")
        if not isinstance(typ, str) or typ.lower() not in (REFRESH_TYP, "application/" + REFRESH_TYP):
            raise OAuthError("invalid_grant", "the token is not a refresh key")
        alg, kid = header.get("alg"), header.get("kid")
        if "crit" in header or not isinstance(alg, str) or (kid is not None and not isinstance(kid, str)):
            raise OAuthError("invalid_grant", "the refresh key is malformed")
        found = issuer.key_set.find(kid, alg)
        key = found[0] if len(found) == 1 else None
        if key is None or alg not in key.algorithms:
            raise OAuthError("invalid_grant", "the refresh key was not signed by this gateway")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=issuer.settings.issuer,
                issuer=issuer.settings.issuer,
                leeway=LEEWAY,
                options={"require": ["exp", "iat", "jti", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise OAuthError("invalid_grant", "the refresh key has expired") from None
        except jwt.PyJWTError:
            raise OAuthError("invalid_grant", "the refresh key is invalid") from None
        if not isinstance(claims.get("jti"), str) or not isinstance(claims.get("sub"), str):
            raise OAuthError("invalid_grant", "the refresh key is invalid")
        return claims

    def _check_revocation(self, claims: dict[str, Any]) -> None:
        """The revocation mirror, as for any long-lived token; a stale mirror fails closed (the caller: 503)."""
        if self.revocation is None:
            return
        identity = Identity(
            subject=claims["sub"],
            scopes=frozenset(),
            claims=claims,
            issuer=GATEWAY_ISSUER_NAME,
            source="jwt",
            token_id=claims["jti"],
            expires_at=float(claims["exp"]),
            issued_at=float(claims["iat"]),
            long_lived=True,
        )
        try:
            self.revocation.check(identity, "always", fail_open=False)
        except errors.Revoked:
            raise OAuthError("invalid_grant", "the refresh key has been revoked") from None

    def _access_token(self, issuer: Issuer, record: TokenRecord, scopes: tuple[str, ...], now: float) -> _Access:
        exp = int(min(now + issuer.settings.access_token_lifetime, record.expires_at))
        jti = _new_jti()
        claims: dict[str, Any] = {
            **_extra(record.claims),
            "iss": issuer.settings.issuer,
            "sub": record.subject,
            "aud": _aud(record.audiences),
            "iat": int(now),
            "exp": exp,
            "jti": jti,
        }
        if scopes:
            claims["scope"] = " ".join(scopes)
        return _Access(issuer.signer.sign(claims, typ=ACCESS_TYP), jti, float(exp))

    async def _reuse_detected(self, record: TokenRecord, client: str | None, now: float) -> None:
        # A security event: someone holds a key that was already exchanged (stolen, or a replayed request).
        log.warning(
            "refresh key reused: revoking its whole family",
            extra={"event": "refresh_token_reuse", "jti": record.jti, "family": record.family,
                   "subject": record.subject, "client": client},
        )  # fmt: skip
        if record.family is not None:
            await self.revoke_family(record.family, GATEWAY_ISSUER_NAME, "refresh key reuse detected", now)


@dataclass(frozen=True)
class _Access:
    token: str
    jti: str
    exp: float


def _covered(record: TokenRecord, cutoff: float) -> TokenRecord:
    """The record, revoked as of `cutoff` if a subject revocation covers its iat and nothing revoked it before."""
    if record.revoked_at is not None or not int(record.created_at) < cutoff:
        return record
    return replace(record, revoked_at=cutoff, revoked_by="subject revocation", revoke_reason="")


def _subject_covered(record: TokenRecord | None, cutoffs: dict[str, float]) -> TokenRecord | None:
    if record is None or not cutoffs:
        return record
    return _covered(record, cutoff_in(cutoffs, record.subject, GATEWAY_ISSUER_NAME))


def _new_jti() -> str:
    return str(uuid.uuid4())


def _aud(audiences: tuple[str, ...]) -> str | list[str]:
    return audiences[0] if len(audiences) == 1 else list(audiences)


def _extra(claims: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in claims.items() if k not in RESERVED_CLAIMS}


def _narrow(granted: tuple[str, ...], requested: str | None) -> tuple[str, ...]:
    """RFC 6749 §6: the requested scope must not include any scope not originally granted; omitted means all."""
    if requested is None:
        return granted
    asked = tuple(dict.fromkeys(requested.split(" ")))
    if not asked or any(not SCOPE_TOKEN.match(s) for s in asked):
        raise OAuthError("invalid_scope", "scope must be space-separated scope tokens")
    if not set(asked) <= set(granted):
        raise OAuthError("invalid_scope", "the requested scope exceeds the scope granted to the refresh key")
    return asked
