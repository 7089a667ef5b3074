"""One route's judgement of a token, by its `auth.mode`: find who the token speaks for, then apply the route's rules.

    jwt                 verified locally; anything else is refused
    introspect          every token is asked of the introspection endpoint (RFC 7662)
    jwt_or_introspect   a JWT from one of the route's issuers is verified locally, and refused if it fails;
                        an opaque token, or a JWT from any other issuer (`NotMine`), is introspected

Whichever way, the same revocation check and the same route policy follow; a cached identity meets them again.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Literal

from gateway import errors
from gateway.bearer import check_syntax
from gateway.identity import Identity
from gateway.revocation import Policy, RevocationCheck
from gateway.verify.cache import token_digest
from gateway.verify.introspection import Introspector
from gateway.verify.jwt_local import JwtVerifier, NotMine
from gateway.verify.policy import RoutePolicy

Mode = Literal["jwt", "introspect", "jwt_or_introspect"]


@dataclass(frozen=True, slots=True)
class Judge:
    verifier: JwtVerifier
    issuers: frozenset[str]  # names of the issuers whose JWTs the route accepts
    policy: RoutePolicy
    revocation: RevocationCheck
    revocation_policy: Policy
    fail_open: bool  # on_unavailable: fail_open (a stale revocation mirror; introspection failures always refuse)
    mode: Mode
    introspector: Introspector | None = None  # required by introspect and jwt_or_introspect

    def __post_init__(self) -> None:
        if self.mode != "jwt" and self.introspector is None:
            raise ValueError(f"auth mode {self.mode} needs an introspection endpoint")

    def judge(self, token: str) -> Identity | Awaitable[Identity]:
        """The identity the token speaks for, with the route's rules applied; raises the refusal.

        A JWT verified before, or a token whose introspection answer is cached in memory, is judged at once, with
        nothing to await: the common case, kept free of coroutine layers. Otherwise the result is an awaitable that
        verifies the signature or asks introspection."""
        if self.mode == "introspect":
            check_syntax(token)
            return self._introspected(token, token_digest(token))
        digest = token_digest(token)
        try:
            identity = self.verifier.cached(digest, self.issuers)
        except NotMine as exc:
            if self.mode == "jwt":
                raise exc.error from None
            return self._introspected(token, digest)
        if identity is not None:
            return self._admit(identity)
        return self._verify_new(token, digest)

    def _admit(self, identity: Identity) -> Identity:
        # Revocation before the route's rules: a revoked token is reported as revoked, whatever its scopes.
        self.revocation.check(identity, self.revocation_policy, self.fail_open)
        self.policy.check(identity)
        return identity

    async def _admitted(self, identifying: Awaitable[Identity]) -> Identity:
        return self._admit(await identifying)

    async def _verify_new(self, token: str, digest: bytes) -> Identity:
        # No b64token check (check_syntax) before a JWT is parsed: JWT parsing is stricter (three base64url segments
        # and two dots are a b64token). Only a token that is not a JWT of the route's issuers needs it, so that a
        # malformed bearer token is answered 400 invalid_request, as RFC 6750 §3.1 says, not 401.
        try:
            identity = await self.verifier.verify_new(token, digest, self.issuers)
        except NotMine as exc:
            check_syntax(token)
            if self.mode == "jwt":
                raise exc.error from None
        except errors.Malformed:
            check_syntax(token)  # as above: a malformed bearer token is a 400 before it is a malformed JWT
            raise
        else:
            return self._admit(identity)
        # Not a JWT, or not from one of this route's issuers: the authorization server decides.
        judged = self._introspected(token, digest)
        return judged if isinstance(judged, Identity) else await judged

    def _introspected(self, token: str, digest: bytes) -> Identity | Awaitable[Identity]:
        """As `judge`, by introspection: an answer cached in memory is judged at once, anything else awaited."""
        assert self.introspector is not None  # noqa: S101 - __post_init__ checks
        identity = self.introspector.cached(digest)
        if identity is not None:
            return self._admit(identity)
        return self._admitted(self.introspector.introspect(token, digest))
