"""Forged and malformed tokens against a real gateway: each is refused with the exact status, error, challenge and
metric reason, reaches nothing upstream, and never shows up in a response, a log line or a metric.

Every row builds its credential from real keys (the IdP's, or an attacker's generated for the session) and sends
it over HTTP to a gateway started from YAML; the IdP serves a real JWKS and the upstream records what reaches it.
Rows that must pass (leeway boundaries, scheme spellings, every key type) are in a separate table below.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.support import (
    AUDIENCE,
    ISSUER,
    IdP,
    Key,
    RunningGateway,
    Upstream,
    b64,
    challenge,
    claims_for,
    forge,
    log_text,
    self_signed_cert,
    serve_app,
    sign_jws,
    start_gateway,
)

STRICT_ISSUER = "https://strict.idp.test/"  # same keys as ISSUER, but require_typ at+jwt and max_lifetime 1h
HMAC_ISSUER = "https://hmac.idp.test/"  # a shared-secret issuer (HS256 only)
DOWN_ISSUER = "https://down.idp.test/"  # its JWKS endpoint answers 500
HMAC_ENV = "TG_TEST_FORGED_HMAC_SECRET"
REALM = "gateway"


@dataclass(frozen=True)
class Kit:
    """Everything a row may use to build its credential."""

    rsa: Key  # the IdP's keys (kids rsa-1, ec-1, ed-1)
    ec: Key
    ed: Key
    rogue_rsa: Key  # attacker keys of the same types, under the same kids
    rogue_ec: Key
    rogue_ed: Key
    attacker_url: str  # a server on 127.0.0.1 that must never be contacted
    hmac_secret: bytes

    def genuine(self, **claims: Any) -> str:
        """A token the gateway accepts on /orders (claims may be overridden; None drops one)."""
        return self.rsa.sign(**claims)


Credential = str | list[tuple[str, str]]  # a token (sent as Authorization: Bearer), or the exact request headers
Build = Callable[[Kit], Credential]


@dataclass(frozen=True)
class Row:
    id: str
    doc: str
    build: Build
    status: int
    error: str
    reason: str
    path: str = "/orders/1"

    @property
    def route(self) -> str:
        return self.path.strip("/").split("/")[0]


def now() -> int:
    return int(time.time())


def segments(token: str) -> list[str]:
    return token.split(".")


def with_segment(token: str, index: int, value: str) -> str:
    parts = segments(token)
    parts[index] = value
    return ".".join(parts)


def header_of(token: str) -> dict[str, Any]:
    segment = segments(token)[0]
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    return decoded


def signature_bytes(token: str) -> bytes:
    segment = segments(token)[2]
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def rsa_signature_with_urlsafe_chars(kit: Kit) -> str:
    """A genuine token whose signature contains '-' or '_' (nearly every RS256 signature does)."""
    for _ in range(100):
        token = kit.genuine()
        if "-" in segments(token)[2] or "_" in segments(token)[2]:
            return token
    raise AssertionError("no RS256 signature with - or _ in 100 tries")


def non_canonical_signature(kit: Kit) -> str:
    """A genuine token whose signature's last character has its unused low bits set: same bytes, other text."""
    token = kit.genuine()
    sig = segments(token)[2]
    # 256 bytes -> 342 characters; the last one carries 2 bits of data and 4 unused bits (which must be zero).
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(sig[-1])
    assert len(sig) % 4 == 2 and last & 0b1111 == 0
    return with_segment(token, 2, sig[:-1] + alphabet[last | 0b0001])


def strict_token(kit: Kit, typ: str | None = "at+jwt", **claims: Any) -> str:
    header: dict[str, Any] = {"alg": "RS256", "kid": kit.rsa.kid}
    if typ is not None:
        header["typ"] = typ
    return sign_jws(kit.rsa.private, "RS256", header, claims_for(iss=STRICT_ISSUER, **claims))


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def x5c_of(key: Key) -> str:
    der = x509.load_pem_x509_certificate(self_signed_cert(key)).public_bytes(serialization.Encoding.DER)
    return base64.b64encode(der).decode()


def alg_none_rows() -> list[Row]:
    rows = []
    for spelling in ("none", "None", "NONE", "nOnE"):
        rows.append(
            Row(
                f"alg-{spelling}-unsigned",
                f"alg {spelling!r} with an empty signature is never accepted, whatever its case.",
                lambda k, s=spelling: forge({"alg": s, "typ": "JWT", "kid": "rsa-1"}, claims_for()),
                401,
                "invalid_token",
                "algorithm",
            )
        )
        rows.append(
            Row(
                f"alg-{spelling}-with-signature",
                f"alg {spelling!r} carrying a genuine RS256 signature is refused before any key is tried.",
                lambda k, s=spelling: forge(
                    {"alg": s, "typ": "JWT", "kid": "rsa-1"}, claims_for(), signature_bytes(k.genuine())
                ),
                401,
                "invalid_token",
                "algorithm",
            )
        )
    return rows


DENY = "invalid_token"

ROWS: list[Row] = [
    *alg_none_rows(),
    Row(
        "alg-missing",
        "A header without alg is refused even when an RS256 signature is attached.",
        lambda k: sign_jws(k.rsa.private, "RS256", {"kid": "rsa-1"}, claims_for()),
        401, DENY, "algorithm",
    ),
    Row(
        "alg-as-list",
        "alg as a JSON list is not an algorithm name.",
        lambda k: sign_jws(k.rsa.private, "RS256", {"alg": ["RS256"], "kid": "rsa-1"}, claims_for()),
        401, DENY, "algorithm",
    ),
    Row(
        "alg-empty",
        "An empty alg is refused.",
        lambda k: sign_jws(k.rsa.private, "RS256", {"alg": "", "kid": "rsa-1"}, claims_for()),
        401, DENY, "algorithm",
    ),
    # --- key confusion ---
    Row(
        "hs256-keyed-with-rsa-public-pem",
        "Key confusion: HS256 keyed with the issuer's RSA public key PEM is refused (HS256 is not allowed there).",
        lambda k: sign_jws(k.rsa.public_pem(), "HS256", {"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}, claims_for()),
        401, DENY, "algorithm",
    ),
    Row(
        "hs256-keyed-with-rsa-jwk-json",
        "Key confusion: HS256 keyed with the issuer's published JWK text is refused.",
        lambda k: sign_jws(
            json.dumps(k.rsa.public_jwk()).encode(), "HS256", {"alg": "HS256", "kid": "rsa-1"}, claims_for()
        ),
        401, DENY, "algorithm",
    ),
    Row(
        "hs256-on-rsa-only-issuer",
        "An HS256 token for an issuer that only allows public-key algorithms is refused.",
        lambda k: sign_jws(secrets.token_bytes(32), "HS256", {"alg": "HS256", "typ": "JWT"}, claims_for()),
        401, DENY, "algorithm",
    ),
    Row(
        "hmac-issuer-hs256-keyed-with-rsa-pem",
        "On the HMAC issuer, a token keyed with the RSA public PEM instead of the shared secret fails its signature.",
        lambda k: sign_jws(k.rsa.public_pem(), "HS256", {"alg": "HS256"}, claims_for(iss=HMAC_ISSUER)),
        401, DENY, "bad_signature", "/hmac/1",
    ),
    Row(
        "hmac-issuer-wrong-secret",
        "On the HMAC issuer, a token keyed with another secret fails its signature.",
        lambda k: sign_jws(secrets.token_bytes(32), "HS256", {"alg": "HS256"}, claims_for(iss=HMAC_ISSUER)),
        401, DENY, "bad_signature", "/hmac/1",
    ),
    Row(
        "hmac-issuer-hs512-with-right-secret",
        "On an HS256-only issuer, HS512 with the right secret is refused: the allowlist pins the algorithm.",
        lambda k: sign_jws(k.hmac_secret, "HS512", {"alg": "HS512"}, claims_for(iss=HMAC_ISSUER)),
        401, DENY, "algorithm", "/hmac/1",
    ),
    Row(
        "hmac-issuer-rs256",
        "On the HMAC issuer, an RS256 token (even one signed by a key the gateway knows) is refused.",
        lambda k: k.rsa.sign(iss=HMAC_ISSUER),
        401, DENY, "algorithm", "/hmac/1",
    ),
    # --- wrong keys ---
    Row(
        "rogue-rsa-under-real-rsa-kid",
        "A different RSA key signing under the real RSA kid fails the signature check.",
        lambda k: k.rogue_rsa.sign(),
        401, DENY, "bad_signature",
    ),
    Row(
        "rogue-ec-under-real-ec-kid",
        "A different P-256 key signing under the real EC kid fails the signature check.",
        lambda k: k.rogue_ec.sign(),
        401, DENY, "bad_signature",
    ),
    Row(
        "rogue-ed25519-under-real-ed-kid",
        "A different Ed25519 key signing under the real EdDSA kid fails the signature check.",
        lambda k: k.rogue_ed.sign(),
        401, DENY, "bad_signature",
    ),
    Row(
        "ec-signature-under-rsa-kid",
        "Wrong key under the right kid: an ES256 token naming the RSA key's kid is refused (key type mismatch).",
        lambda k: sign_jws(k.ec.private, "ES256", {"alg": "ES256", "kid": "rsa-1"}, claims_for()),
        401, DENY, "algorithm",
    ),
    Row(
        "rs256-under-ec-kid",
        "Key/alg type mismatch: RS256 naming the EC key's kid is refused before any signature work.",
        lambda k: sign_jws(k.rsa.private, "RS256", {"alg": "RS256", "kid": "ec-1"}, claims_for()),
        401, DENY, "algorithm",
    ),
    Row(
        "es256-under-ed25519-kid",
        "Key/alg type mismatch: ES256 naming the Ed25519 key's kid is refused.",
        lambda k: sign_jws(k.ec.private, "ES256", {"alg": "ES256", "kid": "ed-1"}, claims_for()),
        401, DENY, "algorithm",
    ),
    Row(
        "unknown-kid",
        "A kid the issuer never published is an unknown key.",
        lambda k: sign_jws(k.rogue_rsa.private, "RS256", {"alg": "RS256", "kid": "rogue-1"}, claims_for()),
        401, DENY, "unknown_kid",
    ),
    Row(
        "kid-not-a-string",
        "A numeric kid is malformed.",
        lambda k: sign_jws(k.rsa.private, "RS256", {"alg": "RS256", "kid": 1}, claims_for()),
        401, DENY, "malformed",
    ),
    Row(
        "no-kid-rogue-rsa",
        "Without a kid the issuer's single RSA key is tried, and a rogue RSA signature fails against it.",
        lambda k: sign_jws(k.rogue_rsa.private, "RS256", {"alg": "RS256", "typ": "JWT"}, claims_for()),
        401, DENY, "bad_signature",
    ),
    Row(
        "payload-swapped-after-signing",
        "A genuine signature over another payload (sub and scope changed) fails.",
        lambda k: with_segment(k.genuine(), 1, b64(claims_for(sub="root", scope="orders:read orders:admin"))),
        401, DENY, "bad_signature",
    ),
    Row(
        "header-swapped-after-signing",
        "A genuine signature under an edited header (typ changed) fails.",
        lambda k: with_segment(k.genuine(), 0, b64({"alg": "RS256", "typ": "at+jwt", "kid": "rsa-1"})),
        401, DENY, "bad_signature",
    ),
    Row(
        "signature-one-byte-short",
        "A genuine signature with its last byte removed fails.",
        lambda k: (lambda t: with_segment(t, 2, b64(signature_bytes(t)[:-1])))(k.genuine()),
        401, DENY, "bad_signature",
    ),
    Row(
        "signature-of-another-token",
        "The signature of another genuine token does not verify this one.",
        lambda k: with_segment(k.genuine(sub="mallory"), 2, segments(k.genuine())[2]),
        401, DENY, "bad_signature",
    ),
    Row(
        "empty-signature-rs256",
        "A genuine header and payload with the signature left off fails.",
        lambda k: with_segment(k.genuine(), 2, ""),
        401, DENY, "bad_signature",
    ),
    # --- time ---
    Row(
        "expired-an-hour-ago",
        "A token that expired an hour ago is expired.",
        lambda k: k.genuine(iat=now() - 7200, exp=now() - 3600),
        401, DENY, "expired",
    ),
    Row(
        "expired-beyond-leeway",
        "A token that expired 60 s ago is expired under a 30 s leeway.",
        lambda k: k.genuine(exp=now() - 60),
        401, DENY, "expired",
    ),
    Row(
        "nbf-in-an-hour",
        "A token not valid for another hour is not valid yet.",
        lambda k: k.genuine(nbf=now() + 3600),
        401, DENY, "not_yet_valid",
    ),
    Row(
        "nbf-beyond-leeway",
        "A token valid only in 60 s is not valid yet under a 30 s leeway.",
        lambda k: k.genuine(nbf=now() + 60),
        401, DENY, "not_yet_valid",
    ),
    Row(
        "iat-in-the-future",
        "A token issued an hour from now is not valid yet.",
        lambda k: k.genuine(iat=now() + 3600, exp=now() + 7200),
        401, DENY, "not_yet_valid",
    ),
    Row(
        "exp-missing",
        "A token without exp is refused: every token must expire.",
        lambda k: k.genuine(exp=None),
        401, DENY, "missing_claim",
    ),
    Row(
        "exp-null",
        "exp: null counts as missing.",
        lambda k: k.rsa.sign({"exp": None}),
        401, DENY, "missing_claim",
    ),
    Row(
        "exp-as-numeric-string",
        "exp as a string of digits is not a NumericDate (RFC 7519 §2), even though it parses as a number.",
        lambda k: k.genuine(exp=str(now() + 600)),
        401, DENY, "malformed",
    ),
    Row(
        "exp-as-word",
        "exp as a word is malformed.",
        lambda k: k.genuine(exp="tomorrow"),
        401, DENY, "malformed",
    ),
    Row(
        "exp-infinite",
        "exp: Infinity (accepted by Python's JSON parser) is malformed.",
        lambda k: k.genuine(exp=float("inf")),
        401, DENY, "malformed",
    ),
    Row(
        "exp-beyond-float-range",
        "exp of 10**400 (a valid JSON integer) is malformed, not a server error.",
        lambda k: k.genuine(exp=10**400),
        401, DENY, "malformed",
    ),
    Row(
        "nbf-as-string",
        "nbf as a string is malformed.",
        lambda k: k.genuine(nbf=str(now() - 10)),
        401, DENY, "malformed",
    ),
    # --- issuer, audience, subject ---
    Row(
        "wrong-iss",
        "An issuer the gateway does not know is refused.",
        lambda k: k.genuine(iss="https://evil.test/"),
        401, DENY, "issuer",
    ),
    Row(
        "iss-differs-only-in-case",
        "iss compares exactly: another spelling of the issuer URL is another issuer.",
        lambda k: k.genuine(iss="https://IDP.test/"),
        401, DENY, "issuer",
    ),
    Row(
        "missing-iss",
        "A token without iss names no issuer.",
        lambda k: k.genuine(iss=None),
        401, DENY, "issuer",
    ),
    Row(
        "iss-as-list",
        "iss as a JSON list is refused, not a server error.",
        lambda k: sign_jws(k.rsa.private, "RS256", {"alg": "RS256", "kid": "rsa-1"}, claims_for(iss=[ISSUER])),
        401, DENY, "issuer",
    ),
    Row(
        "iss-as-object",
        "iss as a JSON object is refused, not a server error.",
        lambda k: sign_jws(k.rsa.private, "RS256", {"alg": "RS256", "kid": "rsa-1"}, claims_for(iss={"u": ISSUER})),
        401, DENY, "issuer",
    ),
    Row(
        "iss-of-another-route",
        "A valid token of a configured issuer this route does not accept is refused.",
        lambda k: strict_token(k),
        401, DENY, "issuer",
    ),
    Row(
        "wrong-aud",
        "A token for another audience is refused.",
        lambda k: k.genuine(aud="api://billing"),
        401, DENY, "audience",
    ),
    Row(
        "missing-aud",
        "A token without aud is refused.",
        lambda k: k.genuine(aud=None),
        401, DENY, "missing_claim",
    ),
    Row(
        "aud-list-without-ours",
        "An aud list that does not contain our audience is refused.",
        lambda k: k.genuine(aud=["api://billing", "api://orders-staging"]),
        401, DENY, "audience",
    ),
    Row(
        "aud-as-number",
        "A numeric aud is refused.",
        lambda k: k.genuine(aud=7),
        401, DENY, "audience",
    ),
    Row(
        "sub-not-a-string",
        "A numeric sub is malformed (RFC 7519 §4.1.2: a StringOrURI).",
        lambda k: k.genuine(sub=42),
        401, DENY, "malformed",
    ),
    Row(
        "jti-not-a-string",
        "A numeric jti is malformed.",
        lambda k: k.genuine(jti=42),
        401, DENY, "malformed",
    ),
    Row(
        "scope-insufficient",
        "A valid token without the route's required scope gets 403 insufficient_scope naming the scope.",
        lambda k: k.genuine(),
        403, "insufficient_scope", "scope", "/admin/1",
    ),
    Row(
        "scope-absent",
        "A valid token with no scope claim at all gets 403 on a route requiring one.",
        lambda k: k.genuine(scope=None),
        403, "insufficient_scope", "scope",
    ),
    Row(
        "scope-as-substring",
        "A scope that only contains the required one as a substring does not satisfy it.",
        lambda k: k.genuine(scope="orders:reader orders:read-only"),
        403, "insufficient_scope", "scope",
    ),
    # --- encoding ---
    Row(
        "header-not-base64url",
        "A header segment with a character outside base64url is malformed.",
        lambda k: (lambda t: with_segment(t, 0, "eyJh~" + segments(t)[0][4:]))(k.genuine()),
        401, DENY, "malformed",
    ),
    Row(
        "payload-not-base64url",
        "A payload segment with a character outside base64url is malformed.",
        lambda k: (lambda t: with_segment(t, 1, "~" + segments(t)[1]))(k.genuine()),
        401, DENY, "malformed",
    ),
    Row(
        "signature-not-base64url",
        "A genuine signature with a non-base64url character inserted is malformed (no lenient decoding).",
        lambda k: (lambda t: with_segment(t, 2, segments(t)[2][:10] + "~" + segments(t)[2][10:]))(k.genuine()),
        401, DENY, "malformed",
    ),
    Row(
        "signature-standard-base64-alphabet",
        "A genuine signature rewritten with + and / (standard base64) is a different token and malformed.",
        lambda k: (lambda t: with_segment(t, 2, segments(t)[2].replace("-", "+").replace("_", "/")))(
            rsa_signature_with_urlsafe_chars(k)
        ),
        401, DENY, "malformed",
    ),
    Row(
        "signature-padded",
        "A genuine signature with '=' padding appended is malformed: JWS segments are unpadded (RFC 7515 §2).",
        lambda k: k.genuine() + "==",
        401, DENY, "malformed",
    ),
    Row(
        "signature-non-canonical-bits",
        "A genuine signature whose unused trailing bits are set decodes to the same bytes but is malformed.",
        non_canonical_signature,
        401, DENY, "malformed",
    ),
    Row(
        "header-padded",
        "'=' inside the token (a padded header segment) is not a b64token: 400 invalid_request.",
        lambda k: with_segment(k.genuine(), 0, b64({"alg": "RS256", "kid": "rsa-1"}) + "="),
        400, "invalid_request", "invalid_request",
    ),
    Row(
        "header-length-one-past-multiple-of-four",
        "A segment whose length leaves 1 character over a multiple of 4 cannot be base64url.",
        lambda k: with_segment(k.genuine(), 0, "eyJhbGciOiJSUzI1NiJ9A"),
        401, DENY, "malformed",
    ),
    Row(
        "one-segment",
        "One segment is not a JWS.",
        lambda k: segments(k.genuine())[1],
        401, DENY, "malformed",
    ),
    Row(
        "two-segments",
        "Two segments (signature missing with its dot) is not a JWS.",
        lambda k: ".".join(segments(k.genuine())[:2]),
        401, DENY, "malformed",
    ),
    Row(
        "four-segments",
        "Four segments is not a compact JWS.",
        lambda k: k.genuine() + "." + segments(k.genuine())[2],
        401, DENY, "malformed",
    ),
    Row(
        "five-segments-jwe-shape",
        "A five-segment JWE is not a JWS the gateway can verify.",
        lambda k: ".".join([b64({"alg": "RSA-OAEP", "enc": "A256GCM"}), "AAAA", "AAAA", "AAAA", "AAAA"]),
        401, DENY, "malformed",
    ),
    Row(
        "all-segments-empty",
        "Two dots and nothing else is malformed.",
        lambda k: "..",
        401, DENY, "malformed",
    ),
    Row(
        "empty-header-segment",
        "An empty header segment is malformed.",
        lambda k: with_segment(k.genuine(), 0, ""),
        401, DENY, "malformed",
    ),
    Row(
        "empty-payload-segment",
        "An empty payload segment is malformed.",
        lambda k: with_segment(k.genuine(), 1, ""),
        401, DENY, "malformed",
    ),
    Row(
        "header-not-json",
        "A header that is not JSON is malformed.",
        lambda k: with_segment(k.genuine(), 0, b64("alg=RS256")),
        401, DENY, "malformed",
    ),
    Row(
        "header-json-array",
        "A header that is a JSON array is malformed.",
        lambda k: with_segment(k.genuine(), 0, b64('["RS256"]')),
        401, DENY, "malformed",
    ),
    Row(
        "header-json-string",
        "A header that is a JSON string is malformed.",
        lambda k: with_segment(k.genuine(), 0, b64('"RS256"')),
        401, DENY, "malformed",
    ),
    Row(
        "header-invalid-utf8",
        "A header that is not UTF-8 is malformed.",
        lambda k: with_segment(k.genuine(), 0, b64(b'{"alg":"RS256","x":"\xff\xfe"}')),
        401, DENY, "malformed",
    ),
    Row(
        "header-deeply-nested",
        "A header nested 2000 levels deep is malformed, not a server error (recursion limit).",
        lambda k: forge(b64('{"alg":"RS256","x":' + nested(2000) + "}"), claims_for(), b"sig"),
        401, DENY, "malformed",
    ),
    Row(
        "payload-not-json",
        "A payload that is not JSON is malformed.",
        lambda k: with_segment(k.genuine(), 1, b64("sub=alice")),
        401, DENY, "malformed",
    ),
    Row(
        "payload-json-string",
        "A payload that is a JSON string is malformed.",
        lambda k: with_segment(k.genuine(), 1, b64('"alice"')),
        401, DENY, "malformed",
    ),
    Row(
        "payload-json-array",
        "A payload that is a JSON array is malformed.",
        lambda k: with_segment(k.genuine(), 1, b64("[1,2,3]")),
        401, DENY, "malformed",
    ),
    Row(
        "payload-deeply-nested",
        "A payload nested 2000 levels deep is malformed, not a server error.",
        lambda k: forge({"alg": "RS256", "kid": "rsa-1"}, b64('{"iss":' + nested(2000) + "}"), b"sig"),
        401, DENY, "malformed",
    ),
    # --- size and characters ---
    Row(
        "oversized",
        "A token over 8 KiB is refused before it is parsed.",
        lambda k: k.genuine(padding="x" * 8192),
        401, DENY, "oversized",
    ),
    Row(
        "non-b64token-character",
        "A token with a character RFC 6750 b64token does not allow is a malformed request.",
        lambda k: k.genuine()[:20] + "!" + k.genuine()[20:],
        400, "invalid_request", "invalid_request",
    ),
    Row(
        "space-inside-token",
        "A space inside the credential is a malformed request.",
        lambda k: [("Authorization", "Bearer " + segments(k.genuine())[0] + " " + segments(k.genuine())[1])],
        400, "invalid_request", "invalid_request",
    ),
    # --- headers that must not be trusted ---
    Row(
        "embedded-jwk-attacker-key",
        "An attacker key embedded as a jwk header is not trusted: its kid is unknown.",
        lambda k: sign_jws(
            k.rogue_rsa.private,
            "RS256",
            {"alg": "RS256", "kid": "attacker", "jwk": {**k.rogue_rsa.public_jwk(), "kid": "attacker"}},
            claims_for(),
        ),
        401, DENY, "unknown_kid",
    ),
    Row(
        "embedded-jwk-under-real-kid",
        "An attacker key embedded as a jwk header under the real kid is ignored: the published key decides.",
        lambda k: sign_jws(
            k.rogue_rsa.private, "RS256", {"alg": "RS256", "kid": "rsa-1", "jwk": k.rogue_rsa.public_jwk()}, claims_for()
        ),
        401, DENY, "bad_signature",
    ),
    Row(
        "jku-to-attacker",
        "A jku header pointing at an attacker's JWKS is never followed.",
        lambda k: sign_jws(
            k.rogue_rsa.private, "RS256", {"alg": "RS256", "kid": "attacker", "jku": f"{k.attacker_url}/jwks"}, claims_for()
        ),
        401, DENY, "unknown_kid",
    ),
    Row(
        "jku-to-attacker-under-real-kid",
        "A jku header with the real kid is not followed either: the signature fails against the published key.",
        lambda k: sign_jws(
            k.rogue_rsa.private, "RS256", {"alg": "RS256", "kid": "rsa-1", "jku": f"{k.attacker_url}/jwks"}, claims_for()
        ),
        401, DENY, "bad_signature",
    ),
    Row(
        "x5u-to-attacker",
        "An x5u header pointing at an attacker's certificate is never followed.",
        lambda k: sign_jws(
            k.rogue_rsa.private, "RS256", {"alg": "RS256", "kid": "attacker", "x5u": f"{k.attacker_url}/cert.pem"}, claims_for()
        ),
        401, DENY, "unknown_kid",
    ),
    Row(
        "x5c-attacker-certificate",
        "An attacker certificate in x5c is not trusted: the issuer's own RSA key is tried and fails.",
        lambda k: sign_jws(k.rogue_rsa.private, "RS256", {"alg": "RS256", "x5c": [x5c_of(k.rogue_rsa)]}, claims_for()),
        401, DENY, "bad_signature",
    ),
    Row(
        "crit-exp",
        "A crit header naming a parameter the gateway does not implement is refused (RFC 7515 §4.1.11).",
        lambda k: k.rsa.sign(headers={"crit": ["exp"], "exp": now() + 600}),
        401, DENY, "crit",
    ),
    Row(
        "crit-b64-unencoded-payload",
        "An RFC 7797 unencoded-payload token (crit b64) is refused.",
        lambda k: forge({"alg": "RS256", "kid": "rsa-1", "b64": False, "crit": ["b64"]}, claims_for(), b"sig"),
        401, DENY, "crit",
    ),
    Row(
        "b64-false-without-crit",
        "A validly signed token whose header says b64: false (RFC 7797) without crit is refused, as pyjwt does.",
        lambda k: sign_jws(k.rsa.private, "RS256", {"alg": "RS256", "kid": "rsa-1", "b64": False}, claims_for()),
        401, DENY, "malformed",
    ),
    Row(
        "kid-null",
        "A validly signed token with \"kid\": null is refused (a kid is a string), as pyjwt does.",
        lambda k: sign_jws(k.rsa.private, "RS256", {"alg": "RS256", "kid": None}, claims_for()),
        401, DENY, "malformed",
    ),
    Row(
        "typ-jwt-on-at-jwt-route",
        "On a route whose issuer requires typ at+jwt, a typ JWT token (such as an ID token) is refused.",
        lambda k: strict_token(k, typ="JWT"),
        401, DENY, "typ", "/strict/1",
    ),
    Row(
        "typ-missing-on-at-jwt-route",
        "On a route whose issuer requires typ at+jwt, a token without typ is refused.",
        lambda k: strict_token(k, typ=None),
        401, DENY, "typ", "/strict/1",
    ),
    Row(
        "lifetime-over-max",
        "A token living 2 h is refused by an issuer with max_lifetime 1h.",
        lambda k: strict_token(k, iat=now(), exp=now() + 7200),
        401, DENY, "lifetime", "/strict/1",
    ),
    Row(
        "lifetime-without-iat",
        "Without iat the lifetime cannot be checked, so an issuer with max_lifetime refuses it.",
        lambda k: strict_token(k, iat=None),
        401, DENY, "missing_claim", "/strict/1",
    ),
    # --- the request rather than the token ---
    Row(
        "two-authorization-headers",
        "Two Authorization headers are a malformed request, even if both carry valid tokens.",
        lambda k: [("Authorization", f"Bearer {k.genuine()}"), ("Authorization", f"Bearer {k.genuine()}")],
        400, "invalid_request", "invalid_request",
    ),
    Row(
        "basic-scheme",
        "Basic credentials carry no bearer token: 401 with a bare Bearer challenge.",
        lambda k: [("Authorization", "Basic " + base64.b64encode(b"alice:secret-password").decode())],
        401, "unauthorized", "missing",
    ),
    Row(
        "scheme-glued-to-token",
        "'Bearer' glued to the token is another scheme, so no bearer token at all.",
        lambda k: [("Authorization", f"Bearer{k.genuine()}")],
        401, "unauthorized", "missing",
    ),
    Row(
        "bearer-without-token",
        "Bearer with nothing after it is a malformed request.",
        lambda k: [("Authorization", "Bearer")],
        400, "invalid_request", "invalid_request",
    ),
    Row(
        "bearer-then-spaces",
        "Bearer followed only by spaces is a malformed request.",
        lambda k: [("Authorization", "Bearer    ")],
        400, "invalid_request", "invalid_request",
    ),
    Row(
        "no-credential",
        "No Authorization header: 401 with a bare Bearer challenge and no error code (RFC 6750 §3.1).",
        lambda k: [],
        401, "unauthorized", "missing",
    ),
    # --- a dependency the gateway must consult ---
    Row(
        "issuer-keys-unavailable",
        "When the issuer's JWKS cannot be had, a token of that issuer gets 503 with Retry-After, never 401.",
        lambda k: k.rsa.sign(iss=DOWN_ISSUER),
        503, "temporarily_unavailable", "keys_unavailable", "/down/1",
    ),
]  # fmt: skip


PASSING: list[Row] = [
    Row("rs256", "A genuine RS256 token passes.", lambda k: k.genuine(), 200, "", "ok"),
    Row("es256", "A genuine ES256 token passes.", lambda k: k.ec.sign(), 200, "", "ok"),
    Row("eddsa", "A genuine EdDSA token passes.", lambda k: k.ed.sign(), 200, "", "ok"),
    Row(
        "rs256-without-kid",
        "Without a kid, the issuer's single RSA key verifies a genuine token.",
        lambda k: sign_jws(k.rsa.private, "RS256", {"alg": "RS256", "typ": "JWT"}, claims_for()),
        200, "", "ok",
    ),
    Row(
        "exp-within-leeway",
        "A token that expired 10 s ago still passes under a 30 s leeway.",
        lambda k: k.genuine(exp=now() - 10),
        200, "", "ok",
    ),
    Row(
        "nbf-within-leeway",
        "A token valid from 10 s from now already passes under a 30 s leeway.",
        lambda k: k.genuine(nbf=now() + 10),
        200, "", "ok",
    ),
    Row(
        "iat-within-leeway",
        "A token issued 10 s in the future passes under a 30 s leeway (clock skew).",
        lambda k: k.genuine(iat=now() + 10),
        200, "", "ok",
    ),
    Row(
        "aud-list-with-ours",
        "An aud list containing our audience passes.",
        lambda k: k.genuine(aud=["api://billing", AUDIENCE]),
        200, "", "ok",
    ),
    Row(
        "scope-as-scp-list",
        "Scopes given as an scp list satisfy the route.",
        lambda k: k.genuine(scope=None, scp=["orders:read"]),
        200, "", "ok",
    ),
    Row(
        "lowercase-bearer",
        "The scheme is case-insensitive (RFC 7235 §2.1): 'bearer' passes.",
        lambda k: [("Authorization", f"bearer {k.genuine()}")],
        200, "", "ok",
    ),
    Row(
        "uppercase-bearer",
        "'BEARER' passes.",
        lambda k: [("Authorization", f"BEARER {k.genuine()}")],
        200, "", "ok",
    ),
    Row(
        "several-spaces-after-scheme",
        "Several spaces between scheme and token are tolerated.",
        lambda k: [("Authorization", f"Bearer   {k.genuine()}")],
        200, "", "ok",
    ),
    Row(
        "at-jwt",
        "typ at+jwt passes on the route that requires it.",
        lambda k: strict_token(k),
        200, "", "ok", "/strict/1",
    ),
    Row(
        "application-at-jwt",
        "typ application/at+jwt (the full media type) passes too (RFC 9068 §2.1).",
        lambda k: strict_token(k, typ="application/AT+JWT"),
        200, "", "ok", "/strict/1",
    ),
    Row(
        "lifetime-exactly-max",
        "A lifetime of exactly max_lifetime passes.",
        lambda k: strict_token(k, iat=now(), exp=now() + 3600),
        200, "", "ok", "/strict/1",
    ),
    Row(
        "hmac-right-secret",
        "The HMAC issuer's own shared secret verifies.",
        lambda k: sign_jws(k.hmac_secret, "HS256", {"alg": "HS256", "typ": "JWT"}, claims_for(iss=HMAC_ISSUER)),
        200, "", "ok", "/hmac/1",
    ),
    Row(
        "admin-scope",
        "A token with the admin scope passes the admin route.",
        lambda k: k.genuine(scope="orders:admin"),
        200, "", "ok", "/admin/1",
    ),
]  # fmt: skip


# --- fixtures ---


@pytest.fixture(scope="session")
def hmac_secret() -> bytes:
    return secrets.token_urlsafe(48).encode()


@pytest.fixture(scope="session")
def rogue_keys() -> tuple[Key, Key, Key]:
    return Key.rsa("rsa-1"), Key.ec("ec-1"), Key.ed25519("ed-1")


@pytest.fixture
async def attacker() -> AsyncIterator[Upstream]:
    """A server on 127.0.0.1 that records any request: jku/x5u must never make the gateway call it."""
    recorder = Upstream()
    runner, recorder.url = await serve_app(recorder.app())
    yield recorder
    await runner.cleanup()


@pytest.fixture
async def down_idp() -> AsyncIterator[IdP]:
    provider = IdP(keys=[], fail=True)
    runner, provider.url = await serve_app(provider.app())
    yield provider
    await runner.cleanup()


@pytest.fixture
async def gw(
    idp: IdP,
    down_idp: IdP,
    upstream: Upstream,
    hmac_secret: bytes,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[RunningGateway]:
    monkeypatch.setenv(HMAC_ENV, hmac_secret.decode())
    config = f"""
issuers:
  - name: corp
    issuer: {ISSUER}
    jwks_uri: {idp.url}/jwks
    audiences: [{AUDIENCE}]
    algorithms: [RS256, ES256, EdDSA]
    leeway: 30s
  - name: strict
    issuer: {STRICT_ISSUER}
    jwks_uri: {idp.url}/jwks
    audiences: [{AUDIENCE}]
    algorithms: [RS256, ES256, EdDSA]
    require_typ: at+jwt
    max_lifetime: 1h
  - name: shared
    issuer: {HMAC_ISSUER}
    hmac_secret_env: {HMAC_ENV}
    audiences: [{AUDIENCE}]
    algorithms: [HS256]
  - name: down
    issuer: {DOWN_ISSUER}
    jwks_uri: {down_idp.url}/jwks
    audiences: [{AUDIENCE}]
routes:
  - name: orders
    match: {{path_prefix: /orders}}
    upstream: {{url: "{upstream.url}"}}
    auth: {{mode: jwt, issuers: [corp], required_scopes: [orders:read]}}
  - name: admin
    match: {{path_prefix: /admin}}
    upstream: {{url: "{upstream.url}"}}
    auth: {{mode: jwt, issuers: [corp], required_scopes: [orders:admin]}}
  - name: strict
    match: {{path_prefix: /strict}}
    upstream: {{url: "{upstream.url}"}}
    auth: {{mode: jwt, issuers: [strict]}}
  - name: hmac
    match: {{path_prefix: /hmac}}
    upstream: {{url: "{upstream.url}"}}
    auth: {{mode: jwt, issuers: [shared]}}
  - name: down
    match: {{path_prefix: /down}}
    upstream: {{url: "{upstream.url}"}}
    auth: {{mode: jwt, issuers: [down]}}
"""
    async for running in start_gateway(config, tmp_path):
        yield running


@pytest.fixture
def kit(
    rsa_key: Key, ec_key: Key, ed_key: Key, rogue_keys: tuple[Key, Key, Key], attacker: Upstream, hmac_secret: bytes
) -> Kit:
    return Kit(rsa_key, ec_key, ed_key, *rogue_keys, attacker.url, hmac_secret)


# --- helpers ---


def request_headers(credential: Credential) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {credential}")] if isinstance(credential, str) else credential


def secrets_in(credential: Credential) -> list[str]:
    """The strings that must never be echoed: the token and its signature (when long enough to be meaningful)."""
    values = [credential] if isinstance(credential, str) else [v.partition(" ")[2] for _, v in credential]
    found = []
    for value in values:
        found.append(value)
        parts = value.split(".")
        if len(parts) == 3:
            found.append(parts[2])
    return [s for s in found if len(s) >= 16]


def auth_decisions(gw: RunningGateway) -> dict[tuple[str, str, str], float]:
    out = {}
    for family in gw.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == "gateway_auth_decisions_total" and sample.value:
                out[(sample.labels["route"], sample.labels["outcome"], sample.labels["reason"])] = sample.value
    return out


async def send(
    http: aiohttp.ClientSession, gw: RunningGateway, row: Row, credential: Credential
) -> tuple[int, dict[str, Any] | None, str, Mapping[str, str]]:
    async with http.get(gw.url + row.path, headers=request_headers(credential)) as resp:
        text = await resp.text()
        body = await resp.json() if resp.content_type == "application/json" else None
        return resp.status, body, text, resp.headers.copy()


def assert_never_echoed(credential: Credential, *texts: str) -> None:
    for secret in secrets_in(credential):
        for text in texts:
            assert secret not in text


# --- the tables ---


@pytest.mark.parametrize("row", [pytest.param(r, id=r.id) for r in ROWS])
async def test_forged_token_is_refused(
    row: Row,
    kit: Kit,
    gw: RunningGateway,
    upstream: Upstream,
    attacker: Upstream,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    credential = row.build(kit)

    status, body, text, headers = await send(http, gw, row, credential)

    assert status == row.status, f"{row.doc} -> {status} {text}"
    assert body is not None and body["error"] == row.error and body["error_description"]
    www = headers.get("WWW-Authenticate")
    if row.status == 503:
        assert www is None
        assert int(headers["Retry-After"]) > 0
    elif row.error == "unauthorized":
        assert www == f'Bearer realm="{REALM}"'  # RFC 6750 §3.1: no error code when no credential was presented
    else:
        assert www is not None
        scheme, params = challenge(www)
        assert scheme == "Bearer" and params["realm"] == REALM and params["error"] == row.error
        assert params["error_description"] == body["error_description"]
        if row.error == "insufficient_scope":
            assert params["scope"] == ("orders:admin" if row.route == "admin" else "orders:read")
    outcome = "error" if row.status >= 500 else "deny"
    assert auth_decisions(gw) == {(row.route, outcome, row.reason): 1.0}
    assert upstream.requests == []
    assert attacker.requests == []  # jku / x5u / anything else: the attacker's server was never called
    async with http.get(f"{gw.admin_url}/metrics") as resp:
        exposition = await resp.text()
    assert_never_echoed(credential, text, json.dumps(dict(headers)), log_text(caplog.records), exposition)


@pytest.mark.parametrize("row", [pytest.param(r, id=r.id) for r in PASSING])
async def test_boundary_token_passes(
    row: Row,
    kit: Kit,
    gw: RunningGateway,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    credential = row.build(kit)

    status, _, text, headers = await send(http, gw, row, credential)

    assert status == 200, f"{row.doc} -> {status} {text}"
    assert headers.get("X-Upstream") == "yes"
    assert len(upstream.requests) == 1
    assert "Authorization" not in upstream.requests[0]["headers"]
    assert auth_decisions(gw) == {(row.route, "allow", "ok"): 1.0}
    assert_never_echoed(credential, log_text(caplog.records))


def test_tables_are_large_and_unambiguous() -> None:
    """The refusal table covers at least 40 forgeries, and every row has its own id and one-sentence doc."""
    ids = [r.id for r in ROWS + PASSING]
    assert len(ROWS) >= 40
    assert len(ids) == len(set(ids))
    assert all(r.doc.endswith(".") and r.doc.count(". ") == 0 for r in ROWS + PASSING)


async def test_token_beyond_the_header_limit_is_refused_by_the_server(
    kit: Kit, gw: RunningGateway, upstream: Upstream, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """A token longer than the listener's header limit (16 KiB) is a 431 from the HTTP server itself, before the
    gateway's handler runs; the answer does not echo it and nothing is forwarded or counted as a decision."""
    caplog.set_level(logging.DEBUG)
    token = kit.genuine(padding="x" * 20000)
    assert len(token) > 16384

    async with http.get(f"{gw.url}/orders/1", headers={"Authorization": f"Bearer {token}"}) as resp:
        text = await resp.text()
        status = resp.status

    assert status == 431
    assert json.loads(text) == {"error": "invalid_request", "error_description": "request header fields too large"}
    assert upstream.requests == []
    assert auth_decisions(gw) == {}
    assert_never_echoed(token, text, log_text(caplog.records))
    assert token[-200:] not in text and token[:200] not in text
