"""Verification keys and key sets: which key may verify which algorithm.

A key's type decides the algorithms it may verify (an RSA key never verifies HS256, a P-256 key only ES256),
so a token cannot pick a dangerous pairing through its `alg` header.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

log = logging.getLogger(__name__)

_RSA_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALGS = {
    "secp256r1": frozenset({"ES256"}),
    "secp384r1": frozenset({"ES384"}),
    "secp521r1": frozenset({"ES512"}),
}
_HMAC_ALGS = frozenset({"HS256", "HS384", "HS512"})
# NIST SP 800-131A: RSA below 2048 bits no longer protects a signature (pyjwt only warns, on every verification).
MIN_RSA_BITS = 2048
# Keys a token without kid is tried against: bounds the signature checks one token can cost.
MAX_CANDIDATES = 8


@dataclass(frozen=True, slots=True)
class VerificationKey:
    kid: str | None
    key: Any  # a cryptography public key, or bytes for an HMAC secret
    algorithms: frozenset[str]


def algorithms_for(key: Any) -> frozenset[str]:
    """The algorithms a key object may verify, from its type alone."""
    if isinstance(key, rsa.RSAPublicKey):
        return _RSA_ALGS
    if isinstance(key, ec.EllipticCurvePublicKey):
        return _EC_ALGS.get(key.curve.name, frozenset())
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return frozenset({"EdDSA"})
    if isinstance(key, bytes):
        return _HMAC_ALGS
    return frozenset()


class KeySet:
    """Keys of one issuer, looked up by `kid` (or the keys of a matching type when the token has none)."""

    def __init__(self, keys: Iterable[VerificationKey]) -> None:
        self.keys = tuple(keys)
        self._by_kid: dict[str, tuple[VerificationKey, ...]] = {}
        for k in self.keys:
            if k.kid is not None:
                self._by_kid[k.kid] = (*self._by_kid.get(k.kid, ()), k)
        self._ids = frozenset(id(k) for k in self.keys)  # for `contains` on every cache hit, without a scan

    def __len__(self) -> int:
        return len(self.keys)

    def has_kid(self, kid: str | None) -> bool:
        return kid is None or kid in self._by_kid

    def contains(self, key: VerificationKey) -> bool:
        """Whether this exact key (same kid and key material) is still in the set."""
        if id(key) in self._ids:  # the very object (the set holds it, so its id cannot have been reused)
            return True
        return any(k.kid == key.kid and k.key == key.key for k in self.keys)

    def find(self, kid: str | None, alg: str) -> tuple[VerificationKey, ...]:
        """The keys to try, in order, for a token's kid and alg; none if no key may verify it."""
        if kid is not None:
            named = self._by_kid.get(kid)
            if named is not None:
                if len(named) == 1:  # the usual case, without the generator below
                    return named
                # Keys of different types may share a kid (RFC 7517 §4.5): the one for alg, else the first (whose
                # algorithms the verifier then finds alg missing from).
                return (next((k for k in named if alg in k.algorithms), named[0]),)
        # No kid (optional, RFC 7515 §4.1.4), or one only a key published without a kid may answer (static PEM
        # keys): each key that fits alg, as an issuer rotating publishes two.
        fitting = [k for k in self.keys if alg in k.algorithms and (kid is None or k.kid is None)]
        return tuple(fitting[:MAX_CANDIDATES])


def from_jwks(document: Mapping[str, Any]) -> KeySet:
    """Parse a JWKS document; unusable keys (encryption keys, unknown types, bad parameters) are skipped."""
    raw_keys = document.get("keys")
    if not isinstance(raw_keys, list):
        raise ValueError("the JWKS has no 'keys' list")
    keys: list[VerificationKey] = []
    for raw in raw_keys:
        if not isinstance(raw, dict) or raw.get("use", "sig") != "sig" or raw.get("kty") == "oct":
            continue  # symmetric keys are never taken from a network document
        kid = raw.get("kid")
        try:
            parsed = jwt.PyJWK(raw).key
        except Exception as exc:  # noqa: BLE001 - pyjwt raises many types (NotImplementedError for alg "none", ...)
            # One key we cannot load must not cost the issuer its other keys (or stop the refresher).
            log.warning("skipping an unusable JWKS key", extra={"kid": str(kid), "error": type(exc).__name__})
            continue
        if _too_weak(parsed):
            log.warning("skipping a JWKS key that is too weak", extra={"kid": str(kid), "error": "RSA below 2048 bits"})
            continue
        algorithms = algorithms_for(parsed)
        if isinstance(raw.get("alg"), str):
            algorithms = algorithms & {raw["alg"]}
        if algorithms and (kid is None or isinstance(kid, str)):
            keys.append(VerificationKey(kid=kid, key=parsed, algorithms=algorithms))
    return KeySet(keys)


def from_pem_file(path: str, kid: str | None) -> VerificationKey:
    """A public key or certificate in PEM form."""
    with open(path, "rb") as f:
        data = f.read()
    if b"CERTIFICATE" in data:
        key: Any = x509.load_pem_x509_certificate(data).public_key()
    else:
        key = load_pem_public_key(data)
    algorithms = algorithms_for(key)
    if not algorithms:
        raise ValueError(f"{path}: unsupported key type {type(key).__name__}")
    if _too_weak(key):
        raise ValueError(f"{path}: an RSA key needs at least {MIN_RSA_BITS} bits")
    return VerificationKey(kid=kid, key=key, algorithms=algorithms)


def _too_weak(key: Any) -> bool:
    return isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS
