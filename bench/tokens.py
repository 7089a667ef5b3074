"""Signing keys and token files for the load generators, cached in bench/results/ (gitignored)."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

RESULTS = Path(__file__).resolve().parent / "results"
ISSUER = "https://bench.example/"
AUDIENCE = "api://bench"
TOKEN_TTL = 2 * 3600
# A cached token file is reused only while its tokens outlive any run started now.
MIN_REMAINING = 3600
WARM_TOKENS = 1000
CHUNK = 2000


@dataclass(frozen=True)
class KeyPair:
    alg: str
    kid: str
    private_pem: Path
    public_pem: Path

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.public_pem.read_bytes()).hexdigest()[:12]


def ensure_keys(directory: Path = RESULTS / "keys") -> dict[str, KeyPair]:
    """An RS256 (2048-bit) and an ES256 key pair, made once and kept so token files stay valid."""
    directory.mkdir(parents=True, exist_ok=True)
    pairs = {
        "RS256": KeyPair("RS256", "rs1", directory / "rs256.pem", directory / "rs256.pub.pem"),
        "ES256": KeyPair("ES256", "es1", directory / "es256.pem", directory / "es256.pub.pem"),
    }
    for pair in pairs.values():
        if pair.private_pem.exists() and pair.public_pem.exists():
            continue
        key = (
            rsa.generate_private_key(public_exponent=65537, key_size=2048)
            if pair.alg == "RS256"
            else ec.generate_private_key(ec.SECP256R1())
        )
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        pair.private_pem.write_bytes(pem)
        os.chmod(pair.private_pem, 0o600)
        pair.public_pem.write_bytes(
            key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        )
    return pairs


def claims(subject: str, jti: str, now: int) -> dict[str, object]:
    return {"iss": ISSUER, "aud": AUDIENCE, "sub": subject, "exp": now + TOKEN_TTL, "iat": now, "jti": jti}


def sign(pair: KeyPair, payload: dict[str, object]) -> str:
    key = serialization.load_pem_private_key(pair.private_pem.read_bytes(), password=None)
    return jwt.encode(payload, key, algorithm=pair.alg, headers={"kid": pair.kid})  # type: ignore[arg-type]


_worker_key: object = None


def _init_worker(private_pem: bytes) -> None:
    global _worker_key
    _worker_key = serialization.load_pem_private_key(private_pem, password=None)


def _sign_range(alg: str, kid: str, kind: str, start: int, stop: int, now: int) -> list[str]:
    salt = secrets.token_hex(4)
    return [
        jwt.encode(claims(f"user-{i}", f"{kind}-{i}-{salt}", now), _worker_key, algorithm=alg, headers={"kid": kid})  # type: ignore[arg-type]
        for i in range(start, stop)
    ]


def token_file(pair: KeyPair, kind: str, count: int) -> Path:
    """A file of at least `count` distinct tokens, one a line; made with all cores when not cached."""
    directory = RESULTS / "tokens"
    directory.mkdir(parents=True, exist_ok=True)
    prefix = f"{pair.alg.lower()}-{pair.fingerprint}-{kind}"
    now = int(time.time())
    for meta_path in directory.glob(f"{prefix}-*.json"):
        meta = json.loads(meta_path.read_text())
        if meta["count"] >= count and meta["exp"] - now > MIN_REMAINING:
            return meta_path.with_suffix(".txt")
        meta_path.unlink()
        meta_path.with_suffix(".txt").unlink(missing_ok=True)
    path = directory / f"{prefix}-{count}.txt"
    started = time.monotonic()
    print(f"bench: signing {count:,} {pair.alg} tokens ({kind}) into {path.name}", flush=True)
    with ProcessPoolExecutor(initializer=_init_worker, initargs=(pair.private_pem.read_bytes(),)) as pool:
        starts = range(0, count, CHUNK)
        futures = [pool.submit(_sign_range, pair.alg, pair.kid, kind, s, min(s + CHUNK, count), now) for s in starts]
        with path.open("w") as out:
            for future in futures:
                out.writelines(token + "\n" for token in future.result())
    path.with_suffix(".json").write_text(json.dumps({"count": count, "exp": now + TOKEN_TTL}))
    print(f"bench: signed in {time.monotonic() - started:.1f}s", flush=True)
    return path


def first_token(path: Path) -> str:
    with path.open() as tokens:
        return tokens.readline().strip()
