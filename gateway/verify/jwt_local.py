"""Local JWT verification (RFC 7519, RFC 9068 profile): signature against the issuer's keys, then the claims.

The token's `iss` picks the issuer among those the route accepts; the issuer's allowlist pins `alg`; the key's
type must fit `alg`. A token that is not a JWT, or names an issuer the route does not know, is `NotMine`:
jwt_or_introspect then asks introspection, jwt mode refuses it. A token strict parsing refuses but a lenient base64
decoder reads as naming a configured issuer is Malformed, not NotMine.

The token is parsed once, strictly, here (`_peek`); the signature is checked by pyjwt's algorithm objects (on
cryptography) and the registered claims by `_check_claims`, in the order and with the rules of pyjwt's own
`decode`. Calling `jwt.decode` instead parsed every token a second time: 60 of the ~95 µs a new token cost in
process, against ~30 µs for the RSA verification itself.
"""

from __future__ import annotations

import binascii
import json
import math
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jwt

from gateway import errors
from gateway.config import GATEWAY_ISSUER_NAME
from gateway.identity import Identity, scopes_of
from gateway.verify.cache import TokenCache, token_digest
from gateway.verify.jwks import IssuerKeys
from gateway.verify.keys import VerificationKey


class NotMine(Exception):
    """The token is not a JWT from one of the route's issuers; `error` is what jwt-only mode answers."""

    def __init__(self, error: errors.AuthError) -> None:
        self.error = error
        super().__init__(error.reason)


class Verified(NamedTuple):  # immutable and cheap to build (see Identity), one per new token
    identity: Identity
    issuer: IssuerKeys
    key: VerificationKey  # the key that verified it: a hit is honoured only while the issuer still publishes it
    expired_from: float  # exp + the issuer's leeway (a reload that changes the leeway starts a new cache)


class JwtVerifier:
    """Verifies JWTs of every configured issuer; one per gateway, shared by all routes."""

    def __init__(
        self,
        issuers: Mapping[str, IssuerKeys],
        cache: TokenCache[Verified],
        own_issuer: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        # Several issuers may share one URL (one IdP, an audience per API); a route accepts at most one of them
        # (configfile refuses more), so the route decides which.
        self._by_iss: dict[str, tuple[IssuerKeys, ...]] = {}
        for keys in issuers.values():
            self._by_iss[keys.settings.issuer] = (*self._by_iss.get(keys.settings.issuer, ()), keys)
        self._cache = cache
        # The gateway's own tokens are always long-lived; by name: a configured issuer may share its URL.
        self._own_name = GATEWAY_ISSUER_NAME if own_issuer is not None else None
        self._clock = clock

    async def verify(self, token: str, allowed: frozenset[str]) -> Identity:
        """Verify `token` for a route accepting the issuers named in `allowed`: from the cache, or afresh."""
        digest = token_digest(token)
        identity = self.cached(digest, allowed)
        return identity if identity is not None else await self.verify_new(token, digest, allowed)

    def cached(self, digest: bytes, allowed: frozenset[str]) -> Identity | None:
        """The identity of a token verified before (by its `token_digest`) and still valid; None if not cached."""
        cached = self._cache.get(digest)
        if cached is None:
            return None
        # The key itself is compared, not just its kid: a withdrawn key, or a kid republished with other key
        # material, must stop a cached token at once (a kid-less token would otherwise match any key set).
        keys = cached.issuer.keys
        if keys is None or not keys.contains(cached.key):
            return None
        identity = cached.identity
        if identity.issuer not in allowed:
            # Verified for another issuer of the same URL (another route's audience): judged afresh for this route.
            if any(keys.settings.name in allowed for keys in self._by_iss.get(cached.issuer.settings.issuer, ())):
                return None
            raise NotMine(errors.WrongIssuer())
        if cached.expired_from <= self._clock():
            raise errors.Expired()
        return identity

    async def verify_new(self, token: str, digest: bytes, allowed: frozenset[str]) -> Identity:
        """Verify a token `cached` did not know: parse, signature, claims; cache it under `digest`."""
        try:
            header, claims, signature = _peek(token)
        except NotMine:
            # Padding, stray bits or an extra dot do not make a configured issuer's JWT someone else's token: refused
            # like any of its JWTs that fail, never introspected (an endpoint decoding leniently could accept it).
            # Only the payload is read: the respelling that keeps a signature valid is outside it. Under two dots
            # there is no signature to accept, so most opaque tokens cost nothing more.
            if token.count(".") >= 2 and _lenient_iss(token.split(".", 2)[1]) in self._by_iss:
                raise errors.Malformed() from None
            raise
        iss = claims.get("iss")
        # iss may be any JSON value here (a list is unhashable): only a string can name an issuer.
        named = self._by_iss.get(iss, ()) if isinstance(iss, str) else ()
        issuer = next((keys for keys in named if keys.settings.name in allowed), None)
        if issuer is None:
            raise NotMine(errors.WrongIssuer())
        alg, kid = _check_header(header, claims, issuer)
        # Awaited only when the issuer's keys must be fetched first: a new token is otherwise one coroutine deep.
        keys = _known_keys(issuer, kid, alg)
        if not keys:
            keys = await self._fetched_keys(issuer, kid, alg)
        key = _verifying_key(token, signature, alg, keys)
        settings = issuer.settings
        _check_claims(claims, settings.issuer, settings.audiences, settings.leeway, self._clock())
        identity = self._identity(claims, issuer)
        assert identity.expires_at is not None  # noqa: S101 - _check_claims requires exp
        self._cache.put(digest, Verified(identity, issuer, key, identity.expires_at + settings.leeway))
        return identity

    async def _fetched_keys(self, issuer: IssuerKeys, kid: str | None, alg: str) -> tuple[VerificationKey, ...]:
        """The keys to try, after fetching the issuer's keys: at start-up they may not have arrived, and an unknown
        kid may mean the issuer rotated (refetched at most once per cool-down)."""
        keys = issuer.keys
        if keys is None or not keys.has_kid(kid):
            await issuer.refresh_for_unknown_kid()
        if issuer.keys is None:
            raise errors.KeysUnavailable()
        found = issuer.keys.find(kid, alg)
        if not found:
            raise errors.UnknownKey()
        return found

    def _identity(self, claims: dict[str, Any], issuer: IssuerKeys) -> Identity:
        settings = issuer.settings
        exp = float(claims["exp"])
        iat = float(claims["iat"]) if isinstance(claims.get("iat"), int | float) else None
        lifetime = exp - (iat if iat is not None else self._clock())
        if settings.max_lifetime is not None:
            if iat is None:
                raise errors.MissingClaim("the token lacks iat, needed to check its lifetime")
            if lifetime > settings.max_lifetime:
                raise errors.TooLongLived()
        jti = claims.get("jti")
        return Identity(
            subject=claims.get("sub"),
            scopes=scopes_of(claims),
            claims=claims,
            issuer=settings.name,
            source="jwt",
            token_id=jti if isinstance(jti, str) else None,
            expires_at=exp,
            issued_at=iat,
            long_lived=settings.name == self._own_name or lifetime > settings.long_lived_after,
        )


def _check_header(header: dict[str, Any], claims: dict[str, Any], issuer: IssuerKeys) -> tuple[str, str | None]:
    """The header's alg and kid, once the header and the date claims' types pass the issuer's rules."""
    settings = issuer.settings
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in settings.algorithms:
        raise errors.AlgorithmNotAllowed()
    if "crit" in header:
        raise errors.UnsupportedCritical()  # we implement no JWS extension (RFC 7515 §4.1.11)
    if settings.require_typ is not None and not _typ_matches(header.get("typ"), settings.require_typ):
        raise errors.WrongType()
    kid = header.get("kid")
    if ("kid" in header and not isinstance(kid, str)) or header.get("b64", True) is not True:
        raise errors.Malformed()  # as pyjwt: a kid is a string; an unencoded payload (RFC 7797) is not a JWT
    for name in ("exp", "nbf", "iat"):
        value = claims.get(name)
        if value is not None and not _is_numeric_date(value):
            # pyjwt would take "exp": "1700000000" (it calls int()), and 10**400 later overflows float():
            # a NumericDate is a finite JSON number (RFC 7519 §2), anything else is malformed.
            raise errors.Malformed()
    return alg, kid


def _known_keys(issuer: IssuerKeys, kid: str | None, alg: str) -> tuple[VerificationKey, ...]:
    """The keys to try for kid and alg among the issuer's current keys; none when they must be fetched first."""
    keys = issuer.keys
    return keys.find(kid, alg) if keys is not None else ()


def _verifying_key(token: str, signature: bytes, alg: str, keys: tuple[VerificationKey, ...]) -> VerificationKey:
    """The first of `keys` the signature verifies with; if none, the last one's refusal."""
    for key in keys[:-1]:  # only a token without kid has several (KeySet.find): an issuer mid-rotation
        try:
            _check_signature(token, signature, alg, key)
        except (errors.AlgorithmNotAllowed, errors.BadSignature):
            continue
        return key
    _check_signature(token, signature, alg, keys[-1])
    return keys[-1]


def _peek(token: str) -> tuple[dict[str, Any], dict[str, Any], bytes]:
    """Header, claims and signature before any verification.

    All three segments must be canonical unpadded base64url (RFC 7515 §2): pyjwt tolerates '=' padding on the
    signature, which would let one signed token be presented under several spellings (different cache and
    revocation digests for the same token).
    """
    parts = token.split(".")
    if len(parts) != 3:
        raise NotMine(errors.Malformed())
    known = _HEADERS.get(parts[0])
    try:
        header = known if known is not None else _json_segment(parts[0])
        claims = _json_segment(parts[1])
        signature = _b64decode(parts[2])
    except (ValueError, binascii.Error, RecursionError):  # RecursionError: JSON nested deeper than Python recurses
        raise NotMine(errors.Malformed()) from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise NotMine(errors.Malformed())
    if known is None and len(parts[0]) <= _MAX_HEADER_CHARS and len(header) <= _MAX_HEADER_MEMBERS:
        if len(_HEADERS) >= _MAX_HEADERS:
            _HEADERS.clear()  # a flood of distinct headers only costs the memo its use
        _HEADERS[parts[0]] = header
    return header, claims, signature


def _lenient_iss(segment: str) -> str | None:
    """The `iss` of a payload read as any base64 decoder might (padding, stray bits, either alphabet); None if none."""
    try:
        claims = json.loads(binascii.a2b_base64(segment.encode().translate(_TO_STANDARD) + b"=="))
    except (ValueError, binascii.Error, RecursionError):
        return None
    iss = claims.get("iss") if isinstance(claims, dict) else None
    return iss if isinstance(iss, str) else None


def _json_segment(segment: str) -> Any:
    # UTF-8 only (RFC 7515 §5.2), decoded here: json.loads would first sniff bytes for UTF-16 and -32.
    text = _b64decode(segment).decode("utf-8")
    # raw_decode skips json.loads' two whitespace regex passes (1.7 of its 3.9 µs on a claims set). Text it does not
    # take whole (surrounding whitespace, which JSON allows, or garbage) goes to json.loads, which decides as before.
    try:
        value, end = _JSON.raw_decode(text)
    except ValueError:
        value, end = None, -1
    return value if end == len(text) else json.loads(text)


def _check_signature(token: str, signature: bytes, alg: str, key: VerificationKey) -> None:
    """The JWS signature over the token's first two segments, by pyjwt's implementation of `alg`."""
    algorithm = _ALGORITHMS.get(alg)
    if algorithm is None or alg not in key.algorithms:
        raise errors.AlgorithmNotAllowed()
    # An HMAC secret goes through prepare_key, which refuses what cannot be one (a PEM public key as a secret). A
    # public key object's type already decided the algorithms it may verify (keys.algorithms_for, checked by the
    # caller): prepare_key would only repeat that, with isinstance checks against ABCs on every new token.
    try:
        prepared = algorithm.prepare_key(key.key) if isinstance(key.key, bytes | str) else key.key
        valid = algorithm.verify(token[: token.rindex(".")].encode(), prepared, signature)
    except (jwt.InvalidKeyError, TypeError, ValueError):
        raise errors.AlgorithmNotAllowed() from None
    if not valid:
        raise errors.BadSignature()


def _check_claims(claims: dict[str, Any], issuer: str, audiences: tuple[str, ...], leeway: float, now: float) -> None:
    """exp (required), iat, nbf, iss, aud, sub and jti, as pyjwt's decode checks them (same order, same integer
    truncation of NumericDates). The dates are known to be finite numbers or null (see _check_header)."""
    if claims.get("exp") is None:
        raise errors.MissingClaim()
    for name in ("iat", "nbf"):
        if name in claims:
            if claims[name] is None:
                raise errors.Malformed()
            if int(claims[name]) > now + leeway:
                raise errors.NotYetValid()
    if int(claims["exp"]) <= now - leeway:
        raise errors.Expired()
    if claims.get("iss") != issuer:
        raise errors.WrongIssuer()
    aud = claims.get("aud")
    if not aud:
        raise errors.MissingClaim()
    if isinstance(aud, str):  # the common case, without the two generators below (~1 µs)
        if aud not in audiences:
            raise errors.WrongAudience()
    elif not isinstance(aud, list) or not all(isinstance(value, str) for value in aud):
        raise errors.WrongAudience()
    elif not any(value in aud for value in audiences):
        raise errors.WrongAudience()
    for name in ("sub", "jti"):
        if name in claims and not isinstance(claims[name], str):
            raise errors.Malformed()


# Parsed headers by their segment, read only: an issuer's tokens share a handful of headers (alg, kid, typ), and
# decoding one costs ~2 µs of the ~35 µs a new token costs in Python.
_HEADERS: dict[str, dict[str, Any]] = {}
_MAX_HEADERS = 256
# Real headers are ~40-200 characters with 2-6 members; these bound the memo at a few hundred KB.
_MAX_HEADER_CHARS = 512
_MAX_HEADER_MEMBERS = 16
_TO_STANDARD = bytes.maketrans(b"-_", b"+/")
_LAST_OF_3 = "AEIMQUYcgkosw048"  # the characters whose two low bits are zero
_JSON = json.JSONDecoder()
_FLOAT_OVERFLOW = 2**1024 - 2**970  # the smallest integer float() refuses (it would round to 2**1024)
_ALGORITHMS = {name: jwt.get_algorithm_by_name(name) for name in jwt.algorithms.get_default_algorithms()}


def _b64decode(segment: str) -> bytes:
    """Strict base64url: the URL-safe alphabet only, no padding, and no stray bits in the last character."""
    # '+', '/' and '=' would pass the strict decoder below once '-' and '_' are translated; anything else outside
    # the alphabet it refuses itself. Three scans cost less than a regex match (1.1 µs on an RS256 signature).
    if "+" in segment or "/" in segment or "=" in segment:
        raise ValueError("not unpadded base64url")
    tail = len(segment) % 4
    # The last character of a 2- or 3-character group carries 4 or 2 unused bits: they must be zero, or the
    # same bytes have several spellings (a different cache and revocation digest for one signed token).
    if tail == 1 or (tail == 2 and segment[-1] not in "AQgw") or (tail == 3 and segment[-1] not in _LAST_OF_3):
        raise ValueError("not canonical base64url")
    return binascii.a2b_base64(segment.encode().translate(_TO_STANDARD) + b"=" * (-tail % 4), strict_mode=True)


def _is_numeric_date(value: Any) -> bool:
    """A finite JSON number. type(), not isinstance: bool is an int subclass, and JSON yields no other subclass."""
    if type(value) is int:
        return -_FLOAT_OVERFLOW < value < _FLOAT_OVERFLOW
    return type(value) is float and math.isfinite(value)


def _typ_matches(typ: Any, required: str) -> bool:
    """RFC 9068 §2.1: `at+jwt`, also written `application/at+jwt`; media types compare case-insensitively."""
    if not isinstance(typ, str):
        return False
    typ = typ.lower()
    required = required.lower()
    return bool(typ == required or typ == "application/" + required)
