"""One route's judgement of a token, by its `auth.mode`: verify, then apply the route's policy."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.identity import Identity
from gateway.revocation import Policy, RevocationCheck
from gateway.verify.jwt_local import JwtVerifier, NotMine
from gateway.verify.policy import RoutePolicy


@dataclass(frozen=True, slots=True)
class Judge:
    verifier: JwtVerifier
    issuers: frozenset[str]  # names of the issuers whose JWTs the route accepts
    policy: RoutePolicy
    revocation: RevocationCheck
    revocation_policy: Policy
    fail_open: bool  # on_unavailable: fail_open

    async def judge(self, token: str) -> Identity:
        try:
            identity = await self.verifier.verify(token, self.issuers)
        except NotMine as exc:
            raise exc.error from None
        # Revocation before the route's rules: a revoked token is reported as revoked, whatever its scopes.
        self.revocation.check(identity, self.revocation_policy, self.fail_open)
        self.policy.check(identity)
        return identity
