"""The gateway's own signing keys: load, generate, sign, and publish as a JWKS (kid = RFC 7638 thumbprint).

Several keys allow rotation: the first signs, all of them verify.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from gateway.verify.keys import KeySet, VerificationKey, algorithms_for

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
# RFC 7638 §3.2: the required members of each key type, in lexicographic order.
_THUMBPRINT_MEMBERS = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n"), "OKP": ("crv", "kty", "x")}


@dataclass(frozen=True)
class SigningKey:
    private: PrivateKey
    kid: str
    alg: str
    public_jwk: dict[str, Any]


def generate(alg: str = "ES256") -> PrivateKey:
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "RS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if alg == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unsupported algorithm {alg}; use ES256, RS256 or EdDSA")


def write_private_key(key: PrivateKey, path: str) -> None:
    """PEM, PKCS#8, created with mode 0600 (never world-readable, not even for a moment)."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def load_private_key(path: str) -> SigningKey:
    with open(path, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    if not isinstance(key, PrivateKey):
        raise ValueError(f"{path}: unsupported key type {type(key).__name__}; use EC P-256, RSA or Ed25519")
    return signing_key(key)


def signing_key(key: PrivateKey) -> SigningKey:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.name != "secp256r1":
            raise ValueError("EC signing keys must use P-256 (ES256)")
        alg, jwk = "ES256", json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    elif isinstance(key, rsa.RSAPrivateKey):
        alg, jwk = "RS256", json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    else:
        alg, jwk = "EdDSA", json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(key.public_key()))
    kid = thumbprint(jwk)
    public = {**jwk, "kid": kid, "alg": alg, "use": "sig"}
    return SigningKey(private=key, kid=kid, alg=alg, public_jwk=public)


def thumbprint(jwk: dict[str, Any]) -> str:
    members = {name: jwk[name] for name in _THUMBPRINT_MEMBERS[jwk["kty"]]}
    digest = hashlib.sha256(json.dumps(members, separators=(",", ":"), sort_keys=True).encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


class Signer:
    """Signs with the first key; publishes and verifies with all."""

    def __init__(self, keys: list[SigningKey]) -> None:
        if not keys:
            raise ValueError("at least one signing key is required")
        self.keys = keys

    @classmethod
    def from_files(cls, paths: tuple[str, ...]) -> Signer:
        return cls([load_private_key(p) for p in paths])

    def sign(self, claims: dict[str, Any], typ: str = "at+jwt") -> str:
        current = self.keys[0]
        return jwt.encode(claims, current.private, algorithm=current.alg, headers={"kid": current.kid, "typ": typ})

    def jwks(self) -> dict[str, Any]:
        return {"keys": [k.public_jwk for k in self.keys]}

    def key_set(self) -> KeySet:
        return KeySet(
            VerificationKey(kid=k.kid, key=k.private.public_key(), algorithms=algorithms_for(k.private.public_key()))
            for k in self.keys
        )
