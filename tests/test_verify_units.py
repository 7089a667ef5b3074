"""Unit tests of the verification building blocks: which key verifies which algorithm, key-set look-ups, JWKS
parsing that skips what it cannot use, strict base64url, and the verified-token LRU. Keys are generated here."""

from __future__ import annotations

import base64
import json
import math
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa, x25519

from gateway import errors
from gateway.config import IssuerSettings
from gateway.identity import Identity
from gateway.metrics import Metrics
from gateway.revocation import Mirror, RevocationCheck
from gateway.store import MemoryStore, Revocation
from gateway.verify import Judge, jwt_local
from gateway.verify.cache import TokenCache, token_digest
from gateway.verify.jwks import IssuerKeys
from gateway.verify.jwt_local import JwtVerifier, NotMine, Verified, _b64decode, _peek, _typ_matches
from gateway.verify.keys import MAX_CANDIDATES, KeySet, VerificationKey, algorithms_for, from_jwks, from_pem_file
from gateway.verify.policy import RoutePolicy
from tests.support import AUDIENCE, ISSUER, Key, b64, self_signed_cert

RSA_ALGS = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}


def vk(kid: str | None, key: Any) -> VerificationKey:
    return VerificationKey(kid=kid, key=key, algorithms=algorithms_for(key))


def pem(public: Any) -> bytes:
    return bytes(public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


# --- algorithms_for ---


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: rsa.generate_private_key(65537, 2048).public_key(), RSA_ALGS),
        (lambda: ec.generate_private_key(ec.SECP256R1()).public_key(), {"ES256"}),
        (lambda: ec.generate_private_key(ec.SECP384R1()).public_key(), {"ES384"}),
        (lambda: ec.generate_private_key(ec.SECP521R1()).public_key(), {"ES512"}),
        (lambda: ec.generate_private_key(ec.SECP256K1()).public_key(), set()),
        (lambda: ed25519.Ed25519PrivateKey.generate().public_key(), {"EdDSA"}),
        (lambda: ed448.Ed448PrivateKey.generate().public_key(), {"EdDSA"}),
        (lambda: x25519.X25519PrivateKey.generate().public_key(), set()),
        (lambda: b"a shared secret of thirty-two bytes!", {"HS256", "HS384", "HS512"}),
        (lambda: "a str is not a key", set()),
    ],
    ids=["rsa", "p256", "p384", "p521", "secp256k1", "ed25519", "ed448", "x25519", "hmac-bytes", "str"],
)
def test_algorithms_for_follows_the_key_type(make: Any, expected: set[str]) -> None:
    key = make()
    assert algorithms_for(key) == expected
    # Signature checks skip pyjwt's prepare_key for key objects, relying on this pinning: pyjwt must agree that the
    # key fits every algorithm it is pinned to (and hand the very object back), or a token would meet a 500.
    for alg in expected:
        prepared = jwt.get_algorithm_by_name(alg).prepare_key(key)
        assert prepared is key or isinstance(key, bytes)


# --- KeySet.find / has_kid / contains ---


@pytest.fixture(scope="module")
def pubs() -> dict[str, Any]:
    return {
        "rsa1": rsa.generate_private_key(65537, 2048).public_key(),
        "rsa2": rsa.generate_private_key(65537, 2048).public_key(),
        "ec": ec.generate_private_key(ec.SECP256R1()).public_key(),
        "ed": ed25519.Ed25519PrivateKey.generate().public_key(),
    }


def test_find_by_kid_returns_that_key_whatever_the_alg(pubs: dict[str, Any]) -> None:
    keys = KeySet([vk("r1", pubs["rsa1"]), vk("e", pubs["ec"])])
    assert keys.find("r1", "RS256") == (keys.keys[0],)
    # The kid decides; the verifier then refuses an alg the key cannot do (ES256 on an RSA key).
    (found,) = keys.find("r1", "ES256")
    assert "ES256" not in found.algorithms
    assert keys.find("nope", "RS256") == ()


def test_find_picks_among_keys_sharing_a_kid_by_alg(pubs: dict[str, Any]) -> None:
    # RFC 7517 §4.5: keys of different types may share a kid.
    keys = KeySet([vk("s", pubs["rsa1"]), vk("s", pubs["ec"])])
    assert keys.find("s", "RS256") == (keys.keys[0],)
    assert keys.find("s", "ES256") == (keys.keys[1],)
    assert keys.find("s", "EdDSA") == (keys.keys[0],)  # none fits: the verifier refuses the alg


def test_find_without_kid_gives_every_key_fitting_alg_up_to_a_bound(pubs: dict[str, Any]) -> None:
    one_rsa = KeySet([vk("r1", pubs["rsa1"]), vk("e", pubs["ec"])])
    assert one_rsa.find(None, "RS256") == (one_rsa.keys[0],)
    assert one_rsa.find(None, "ES256") == (one_rsa.keys[1],)
    assert one_rsa.find(None, "EdDSA") == ()
    two_rsa = KeySet([vk("r1", pubs["rsa1"]), vk("e", pubs["ec"]), vk("r2", pubs["rsa2"])])
    assert two_rsa.find(None, "RS256") == (two_rsa.keys[0], two_rsa.keys[2])  # in order: the verifier tries each
    many = KeySet(vk(f"r{i}", pubs["rsa1"]) for i in range(MAX_CANDIDATES + 3))
    assert many.find(None, "RS256") == many.keys[:MAX_CANDIDATES]


def test_kidless_keys_answer_an_unknown_kid(pubs: dict[str, Any]) -> None:
    single = KeySet([vk(None, pubs["rsa1"]), vk("e", pubs["ec"])])
    assert single.find("any-kid", "RS256") == (single.keys[0],)
    assert single.find("any-kid", "EdDSA") == ()
    double = KeySet([vk(None, pubs["rsa1"]), vk("r2", pubs["rsa2"]), vk(None, pubs["rsa2"])])
    assert double.find("any-kid", "RS256") == (double.keys[0], double.keys[2])


def test_has_kid_and_contains(pubs: dict[str, Any]) -> None:
    keys = KeySet([vk("r1", pubs["rsa1"])])
    assert keys.has_kid("r1") and keys.has_kid(None) and not keys.has_kid("r2")
    assert keys.contains(vk("r1", pubs["rsa1"]))
    reloaded = from_jwks({"keys": [{**_jwk(pubs["rsa1"]), "kid": "r1"}]})
    assert reloaded.contains(keys.keys[0])  # the same key material parsed again still counts as the same key
    assert not keys.contains(vk("r1", pubs["rsa2"]))  # same kid, other material
    assert not keys.contains(vk("r9", pubs["rsa1"]))  # same material, other kid
    assert len(keys) == 1


# --- from_jwks ---


def _jwk(public: Any) -> dict[str, Any]:
    if isinstance(public, rsa.RSAPublicKey):
        text = jwt.algorithms.RSAAlgorithm.to_jwk(public)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        text = jwt.algorithms.ECAlgorithm.to_jwk(public)
    else:
        text = jwt.algorithms.OKPAlgorithm.to_jwk(public)
    parsed: dict[str, Any] = json.loads(text)
    return parsed


def test_from_jwks_keeps_usable_signing_keys(pubs: dict[str, Any]) -> None:
    keys = from_jwks(
        {
            "keys": [
                {**_jwk(pubs["rsa1"]), "kid": "r1", "use": "sig", "alg": "RS256"},
                {**_jwk(pubs["rsa2"]), "kid": "r2", "alg": "PS256"},  # alg narrows what the key may verify
                {**_jwk(pubs["ec"]), "kid": "e"},
                {**_jwk(pubs["ed"]), "kid": "d"},
                {**_jwk(pubs["ec"])},  # no kid at all is fine
            ]
        }
    )
    assert [(k.kid, k.algorithms) for k in keys.keys] == [
        ("r1", frozenset({"RS256"})),
        ("r2", frozenset({"PS256"})),
        ("e", frozenset({"ES256"})),
        ("d", frozenset({"EdDSA"})),
        (None, frozenset({"ES256"})),
    ]


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(lambda p: {**_jwk(p["rsa1"]), "kid": "x", "use": "enc"}, id="encryption-key"),
        pytest.param(lambda p: {"kty": "oct", "k": b64(b"s" * 32), "kid": "x"}, id="oct-key"),
        pytest.param(
            lambda p: {"kty": "oct", "k": b64(b"s" * 32), "kid": "x", "use": "sig", "alg": "HS256"}, id="oct-sig"
        ),
        pytest.param(lambda p: "not a key", id="string"),
        pytest.param(lambda p: 7, id="number"),
        pytest.param(lambda p: None, id="null"),
        pytest.param(lambda p: {}, id="empty-object"),
        pytest.param(lambda p: {"kty": "RSA", "kid": "x"}, id="rsa-without-modulus"),
        pytest.param(lambda p: {"kty": "RSA", "n": 5, "e": "AQAB"}, id="rsa-modulus-not-string"),
        pytest.param(lambda p: {"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}, id="ec-point-off-curve"),
        pytest.param(lambda p: {"kty": "EC", "crv": ["P-256"], "x": "AA", "y": "AA"}, id="ec-crv-list"),
        pytest.param(lambda p: {"kty": "OKP", "crv": "X25519", "x": b64(b"x" * 32)}, id="x25519"),
        pytest.param(lambda p: {"kty": "PQC", "x": "AA"}, id="unknown-kty"),
        pytest.param(lambda p: {**_jwk(p["rsa1"]), "kid": "x", "alg": "none"}, id="alg-none"),
        pytest.param(lambda p: {**_jwk(p["rsa1"]), "kid": "x", "alg": "ES256"}, id="alg-of-another-type"),
        pytest.param(lambda p: {**_jwk(p["rsa1"]), "kid": "x", "alg": "HS256"}, id="rsa-with-hs256"),
        pytest.param(lambda p: {**_jwk(p["rsa1"]), "kid": 5}, id="kid-not-string"),
        pytest.param(lambda p: {**_jwk(p["rsa1"]), "kid": "x", "use": ["sig"]}, id="use-not-string"),
        pytest.param(
            lambda p: {**_jwk(rsa.generate_private_key(65537, 1024).public_key()), "kid": "weak"},  # noqa: S505
            id="rsa-1024",
        ),
    ],
)
def test_from_jwks_skips_unusable_keys(raw: Any, pubs: dict[str, Any]) -> None:
    good = {**_jwk(pubs["ec"]), "kid": "good"}
    keys = from_jwks({"keys": [raw(pubs), good]})
    assert [k.kid for k in keys.keys] == ["good"]


@pytest.mark.parametrize("document", [{}, {"keys": {}}, {"keys": "x"}, {"keys": None}])
def test_from_jwks_without_a_keys_list_is_an_error(document: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="keys"):
        from_jwks(document)


# --- from_pem_file ---


def test_from_pem_file_reads_public_keys_and_certificates(tmp_path: Path) -> None:
    ec_key = Key.ec()
    (tmp_path / "ec.pem").write_bytes(ec_key.public_pem())
    (tmp_path / "ec.crt").write_bytes(self_signed_cert(ec_key))
    direct = from_pem_file(str(tmp_path / "ec.pem"), "k1")
    from_cert = from_pem_file(str(tmp_path / "ec.crt"), None)
    assert direct.algorithms == from_cert.algorithms == frozenset({"ES256"})
    assert direct.key == from_cert.key and direct.kid == "k1" and from_cert.kid is None


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: rsa.generate_private_key(65537, 1024).public_key(), "2048"),  # noqa: S505 - must be refused
        (lambda: x25519.X25519PrivateKey.generate().public_key(), "unsupported key type"),
    ],
    ids=["rsa-1024", "x25519"],
)
def test_from_pem_file_refuses_keys_that_cannot_sign_safely(make: Any, message: str, tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(pem(make()))
    with pytest.raises(ValueError, match=message):
        from_pem_file(str(path), None)


# --- TokenCache ---


def test_token_cache_is_a_bounded_lru_and_counts_hits() -> None:
    metrics = Metrics()
    cache = TokenCache[str](2, metrics)
    a, b, c = token_digest("a.b.c"), token_digest("d.e.f"), token_digest("g.h.i")
    cache.put(a, "A")
    cache.put(b, "B")
    assert cache.get(a) == "A"  # a is now the most recently used
    cache.put(c, "C")  # evicts b, the least recently used
    assert len(cache) == 2
    assert cache.get(b) is None
    assert (cache.get(a), cache.get(c)) == ("A", "C")
    cache.discard(a)
    assert cache.get(a) is None and len(cache) == 1

    def count(result: str) -> float | None:
        return metrics.registry.get_sample_value("gateway_token_cache_requests_total", {"result": result})

    assert (count("hit"), count("miss")) == (3, 2)


def test_token_cache_of_size_zero_stores_nothing() -> None:
    cache = TokenCache[str](0)
    cache.put(token_digest("t"), "T")
    assert len(cache) == 0 and cache.get(token_digest("t")) is None


def test_token_cache_holds_no_token_only_its_digest() -> None:
    token = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"
    digest = token_digest(token)
    assert len(digest) == 32 and token.encode() not in digest
    assert digest == token_digest(token) != token_digest(token + "x")
    assert len(token_digest("ünïcödé")) == 32  # never raises, whatever a header carried


# --- strict base64url and typ ---


@pytest.mark.parametrize(
    ("segment", "ok"),
    [
        ("", True),
        ("eyJhIjoxfQ", True),
        ("_-8", True),
        ("eyJhIjoxfQ==", False),  # padding
        ("eyJhIjox+Q", False),  # standard alphabet
        ("eyJhIjox/Q", False),
        ("eyJh~joxfQ", False),
        ("eyJhIjoxfQAAA", False),  # length 1 past a multiple of 4
        ("_-9", False),  # unused low bits set: the same bytes as "_-8"
        ("QR", False),  # likewise ("QQ" is canonical)
    ],
)
def test_b64decode_accepts_only_canonical_unpadded_base64url(segment: str, ok: bool) -> None:
    if ok:
        assert base64.urlsafe_b64encode(_b64decode(segment)).rstrip(b"=").decode() == segment
    else:
        with pytest.raises(ValueError):
            _b64decode(segment)


def test_b64decode_matches_a_decode_encode_round_trip_on_every_last_character() -> None:
    """The canonical check looks only at the last character's unused bits; it must refuse exactly what a
    decode-then-encode comparison refuses, for every length class and every final character."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    for prefix in ("", "e", "ey", "eyJ", "eyJh"):
        for last in alphabet:
            segment = prefix + last
            try:
                expected: bytes | None = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
                if base64.urlsafe_b64encode(expected).rstrip(b"=").decode() != segment:
                    expected = None
            except ValueError:
                expected = None
            try:
                got: bytes | None = _b64decode(segment)
            except ValueError:
                got = None
            assert got == expected, segment


def test_a_jose_header_not_in_utf8_is_malformed() -> None:
    utf16_header = base64.urlsafe_b64encode('{"alg":"RS256"}'.encode("utf-16")).rstrip(b"=").decode()
    with pytest.raises(NotMine):
        _peek(f"{utf16_header}.eyJhIjoxfQ.c2ln")


@pytest.mark.parametrize(
    "text",
    ['{"sub":"a"}', ' {"sub":"a"}', '{"sub":"a"}\n', '\t{"sub":"a"} ', '{"sub":"a"}x', '{"sub":"a"}{"sub":"b"}',
     '{"sub":"a"', "", " ", '["a"]', '"a"', "1", "nul"],
)  # fmt: skip
def test_a_json_segment_is_read_exactly_as_json_loads_reads_it(text: str) -> None:
    """_json_segment's fast path (raw_decode) takes only what it reads whole; the rest must still be decided by
    json.loads: JSON's surrounding whitespace accepted, anything after the value or a truncated value refused."""
    segment = base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()
    try:
        expected: Any = json.loads(text)
    except ValueError:
        expected = ValueError
    if expected is ValueError:
        with pytest.raises(ValueError):
            jwt_local._json_segment(segment)
    else:
        assert jwt_local._json_segment(segment) == expected
    token = f"{b64({'alg': 'RS256'})}.{segment}.c2ln"
    if isinstance(expected, dict):
        assert _peek(token)[1] == expected
    else:  # not JSON, or JSON but not a claims set
        with pytest.raises(NotMine):
            _peek(token)


@pytest.mark.parametrize(
    "value",
    [0, -1, 1796330371, 1796330371.5, 1e308, -1e308, 2**1024 - 2**970 - 1, -(2**1024 - 2**970) + 1,
     2**1024 - 2**970, -(2**1024 - 2**970), 10**400, float("inf"), float("-inf"), float("nan"), True, False, None,
     "1796330371", [1]],
)  # fmt: skip
def test_a_numeric_date_is_a_json_number_float_can_hold(value: Any) -> None:
    """RFC 7519 §2: a NumericDate is a number; bool is not one, and an integer float() refuses (it rounds to 2**1024)
    or an infinite or NaN float is malformed rather than a 500 later."""
    try:
        expected = type(value) in (int, float) and math.isfinite(float(value))
    except OverflowError:
        expected = False
    assert jwt_local._is_numeric_date(value) is expected


def test_parsed_headers_are_remembered_boundedly_and_give_the_same_answers() -> None:
    """A header segment seen before is not decoded again; the memo stays bounded whatever headers arrive, skips
    oversized ones (in characters or members), and a remembered header still goes with whatever claims and signature the token has."""
    jwt_local._HEADERS.clear()
    header = b64({"alg": "RS256", "kid": "k1", "typ": "at+jwt"})
    first = _peek(f"{header}.{b64({'sub': 'a'})}.c2ln")
    again = _peek(f"{header}.{b64({'sub': 'b'})}.c2lnMg")
    assert again[0] is first[0] == {"alg": "RS256", "kid": "k1", "typ": "at+jwt"}
    assert (again[1], again[2]) == ({"sub": "b"}, b"sig2")
    with pytest.raises(NotMine):  # a known header does not make a malformed payload or signature pass
        _peek(f"{header}.bm90IGpzb24.c2ln")
    with pytest.raises(NotMine):
        _peek(f"{header}.{b64({'sub': 'a'})}.c2ln=")
    for n in range(jwt_local._MAX_HEADERS + 10):
        _peek(f"{b64({'alg': 'RS256', 'kid': f'k{n}'})}.{b64({'sub': 'a'})}.c2ln")
        assert len(jwt_local._HEADERS) <= jwt_local._MAX_HEADERS
    big = b64({"alg": "RS256", "kid": "x" * jwt_local._MAX_HEADER_CHARS})
    assert _peek(f"{big}.{b64({'sub': 'a'})}.c2ln")[0]["alg"] == "RS256"
    assert big not in jwt_local._HEADERS
    many = b64({"alg": "RS256", **{f"m{n}": 1 for n in range(jwt_local._MAX_HEADER_MEMBERS)}})
    assert _peek(f"{many}.{b64({'sub': 'a'})}.c2ln")[0]["alg"] == "RS256"
    assert many not in jwt_local._HEADERS


@pytest.mark.parametrize(
    ("typ", "ok"),
    [("at+jwt", True), ("AT+JWT", True), ("application/at+jwt", True), ("JWT", False), (None, False), (7, False)],
)
def test_typ_matching_is_case_insensitive_with_or_without_application(typ: Any, ok: bool) -> None:
    assert _typ_matches(typ, "at+jwt") is ok


# --- JwtVerifier: tokens that are not this route's ---


async def test_opaque_and_foreign_tokens_are_not_mine(tmp_path: Path) -> None:
    """An opaque token, or a JWT of an issuer the route does not accept, raises NotMine (jwt_or_introspect then
    asks introspection) carrying the error jwt-only mode answers."""
    key = Key.rsa()
    metrics = Metrics()
    settings = IssuerSettings(name="corp", issuer=ISSUER, jwks_uri="http://127.0.0.1:9/jwks", audiences=(AUDIENCE,))
    keys = IssuerKeys(settings, None, metrics, static=KeySet([vk(key.kid, key.private.public_key())]))
    verifier = JwtVerifier({"corp": keys}, TokenCache[Verified](10, metrics))
    cases: list[tuple[str, frozenset[str], type[errors.AuthError]]] = [
        ("an-opaque-token", frozenset({"corp"}), errors.Malformed),
        (key.sign(iss="https://other.test/"), frozenset({"corp"}), errors.WrongIssuer),
        (key.sign(), frozenset({"elsewhere"}), errors.WrongIssuer),
    ]
    for token, allowed, expected in cases:
        with pytest.raises(NotMine) as caught:
            await verifier.verify(token, allowed)
        assert type(caught.value.error) is expected
    assert (await verifier.verify(key.sign(), frozenset({"corp"}))).subject == "alice"
    with pytest.raises(NotMine):  # a cached token is still refused on a route that does not accept its issuer
        await verifier.verify(key.sign(), frozenset({"elsewhere"}))


async def test_a_cached_jwt_is_judged_at_once_and_meets_revocation_and_the_rules_again() -> None:
    """The first judgement of a token is an awaitable (signature work); later ones return the identity with nothing
    to await, and still apply revocation and the route's scopes: a hit skips the signature, nothing else."""
    key = Key.rsa()
    metrics = Metrics()
    settings = IssuerSettings(name="corp", issuer=ISSUER, jwks_uri="http://127.0.0.1:9/jwks", audiences=(AUDIENCE,))
    keys = IssuerKeys(settings, None, metrics, static=KeySet([vk(key.kid, key.private.public_key())]))
    verifier = JwtVerifier({"corp": keys}, TokenCache[Verified](10, metrics))
    store = MemoryStore()
    revocation = RevocationCheck(Mirror(store, metrics, 60.0, 5.0), metrics, 5.0)

    def judge(scopes: tuple[str, ...]) -> Judge:
        policy = RoutePolicy.build(scopes, {})
        return Judge(verifier, frozenset({"corp"}), policy, revocation, "always", fail_open=False, mode="jwt")

    reader, admin = judge(("orders:read",)), judge(("admin",))
    token = key.sign()
    first = reader.judge(token)
    assert not isinstance(first, Identity)
    identity = await first
    again = reader.judge(token)
    assert isinstance(again, Identity) and again == identity
    with pytest.raises(errors.InsufficientScope):
        admin.judge(token)  # raised at once, from the cache
    await store.add(Revocation("jti", str(identity.token_id), time.time() + 600))
    with pytest.raises(errors.Revoked):
        reader.judge(token)
    hits = metrics.registry.get_sample_value("gateway_token_cache_requests_total", {"result": "hit"})
    misses = metrics.registry.get_sample_value("gateway_token_cache_requests_total", {"result": "miss"})
    assert (hits, misses) == (3, 1)  # one look-up per judgement, the first one missed


def test_identity_header_text_of_claims() -> None:
    from gateway.identity import Identity

    claims = {"scp": ["a", "b"], "addr": {"city": "Paris"}, "admin": True, "n": 3, "mixed": ["x", {"k": 1}]}
    who = Identity(subject="s", scopes=frozenset(), claims=claims, issuer="corp", source="jwt")
    assert who.claim_text("scp") == "a b"
    assert who.claim_text("addr") == '{"city":"Paris"}'  # JSON, never a Python repr
    assert who.claim_text("admin") == "true"
    assert who.claim_text("n") == "3"
    assert who.claim_text("mixed") == 'x {"k":1}'
    assert who.claim_text("absent") is None
