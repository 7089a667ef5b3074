"""The shared store: revocations in Redis (layout in DESIGN.md), or in process memory for a single instance.

    {prefix}revoked:jti   sorted set   member = jti (or "{issuer}\\x1f{jti}" when scoped), score = token exp
    {prefix}revoked:sub   hash         subject (or "{issuer}\\x1f{subject}") -> cut-off: tokens issued before it
    {prefix}revocations   channel      one JSON notice per change, published in the same MULTI as the change

Writes are idempotent (ZADD/HSET of the same value change nothing) and atomic with their notice.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel

from gateway.config import StoreSettings

Kind = Literal["jti", "subject"]
SEPARATOR = "\x1f"  # issuer names never contain it (config pattern); the admin API refuses control characters


@dataclass(frozen=True, slots=True)
class Revocation:
    kind: Kind
    value: str  # a jti or a subject
    until: float  # jti: the token's exp (kept until then); subject: cut-off (tokens issued before are revoked)
    issuer: str | None = None  # scoped to one issuer's tokens, or (None) to every issuer's

    @property
    def member(self) -> str:
        return member(self.value, self.issuer)

    def notice(self, op: Literal["add", "remove"]) -> str:
        return json.dumps({"op": op, "kind": self.kind, "member": self.member, "until": self.until})

    def as_json(self) -> dict[str, Any]:
        field = "expires_at" if self.kind == "jti" else "before"
        return {"kind": self.kind, self.kind: self.value, "issuer": self.issuer, field: self.until}


def member(value: str, issuer: str | None) -> str:
    return value if issuer is None else f"{issuer}{SEPARATOR}{value}"


def parse_member(kind: Kind, raw: str, until: float) -> Revocation:
    issuer, sep, value = raw.partition(SEPARATOR)
    return Revocation(kind, value, until, issuer) if sep else Revocation(kind, raw, until)


Snapshot = tuple[dict[str, float], dict[str, float]]  # (jti members -> exp, subject members -> cut-off)


class RevocationStore(Protocol):
    async def add(self, revocation: Revocation) -> None: ...
    async def remove(self, kind: Kind, value: str, issuer: str | None) -> bool: ...
    async def snapshot(self) -> Snapshot: ...
    async def page(self, kind: Kind, offset: int, limit: int) -> list[Revocation]: ...
    async def close(self) -> None: ...


class RedisStore:
    def __init__(self, client: aioredis.Redis, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self.jti_key = f"{prefix}revoked:jti"
        self.sub_key = f"{prefix}revoked:sub"
        self.channel = f"{prefix}revocations"

    async def add(self, revocation: Revocation) -> None:
        async with self.client.pipeline(transaction=True) as pipe:
            if revocation.kind == "jti":
                pipe.zadd(self.jti_key, {revocation.member: revocation.until})
            else:
                pipe.hset(self.sub_key, revocation.member, repr(revocation.until))
            pipe.publish(self.channel, revocation.notice("add"))
            await pipe.execute()

    async def remove(self, kind: Kind, value: str, issuer: str | None) -> bool:
        gone = Revocation(kind, value, 0.0, issuer)
        async with self.client.pipeline(transaction=True) as pipe:
            if kind == "jti":
                pipe.zrem(self.jti_key, gone.member)
            else:
                pipe.hdel(self.sub_key, gone.member)
            pipe.publish(self.channel, gone.notice("remove"))
            removed, _ = await pipe.execute()
        return bool(removed)

    async def snapshot(self) -> Snapshot:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.zremrangebyscore(self.jti_key, "-inf", time.time())  # entries outlive their token by nothing
            pipe.zrange(self.jti_key, 0, -1, withscores=True)
            pipe.hgetall(self.sub_key)
            _, jtis, subjects = await pipe.execute()
        return {m: float(s) for m, s in jtis}, {m: float(v) for m, v in subjects.items()}

    async def page(self, kind: Kind, offset: int, limit: int) -> list[Revocation]:
        if kind == "jti":
            rows = await self.client.zrange(self.jti_key, offset, offset + limit - 1, withscores=True)
            return [parse_member("jti", str(row[0]), float(row[1])) for row in rows]
        # Subjects are few (one per offboarded user or leaked credential family): sort them for stable pages.
        subjects = await self.client.hgetall(self.sub_key)
        ordered = sorted((str(m), float(v)) for m, v in subjects.items())[offset : offset + limit]
        return [parse_member("subject", m, v) for m, v in ordered]

    async def close(self) -> None:
        await self.client.aclose()


class MemoryStore:
    """One process only: the store is its own mirror, so changes apply at once through `listener`."""

    def __init__(self) -> None:
        self.jtis: dict[str, float] = {}
        self.subjects: dict[str, float] = {}
        self.listener: Callable[[str], Awaitable[None] | None] | None = None

    async def add(self, revocation: Revocation) -> None:
        table = self.jtis if revocation.kind == "jti" else self.subjects
        table[revocation.member] = revocation.until
        await self._notify(revocation.notice("add"))

    async def remove(self, kind: Kind, value: str, issuer: str | None) -> bool:
        gone = Revocation(kind, value, 0.0, issuer)
        removed = (self.jtis if kind == "jti" else self.subjects).pop(gone.member, None) is not None
        await self._notify(gone.notice("remove"))
        return removed

    async def snapshot(self) -> Snapshot:
        now = time.time()
        for key in [k for k, exp in self.jtis.items() if exp < now]:
            del self.jtis[key]
        return dict(self.jtis), dict(self.subjects)

    async def page(self, kind: Kind, offset: int, limit: int) -> list[Revocation]:
        if kind == "jti":
            rows = sorted(self.jtis.items(), key=lambda item: (item[1], item[0]))
        else:
            rows = sorted(self.subjects.items())
        return [parse_member(kind, m, v) for m, v in rows[offset : offset + limit]]

    async def close(self) -> None:
        return None

    async def _notify(self, notice: str) -> None:
        if self.listener is not None:
            result = self.listener(notice)
            if result is not None:
                await result


def connect_redis(settings: StoreSettings) -> aioredis.Redis:
    """A client for redis://, rediss://, unix:// or redis+sentinel://[password@]host:port[,host:port]/service[/db].

    Timeouts are short: a hung Redis must show up as a stale mirror, not as requests that hang.
    """
    options: dict[str, Any] = {"decode_responses": True, "socket_timeout": 2.0, "socket_connect_timeout": 2.0}
    url = settings.redis_url
    if url.startswith(("redis+sentinel://", "rediss+sentinel://")):
        parts = urlsplit(url)
        hosts = [(h.rsplit(":", 1)[0], int(h.rsplit(":", 1)[1]) if ":" in h else 26379) for h in _hosts(parts.netloc)]
        path = [p for p in parts.path.split("/") if p]
        if not path:
            raise ValueError("a redis+sentinel:// URL must name the service: redis+sentinel://host:26379/mymaster")
        password = unquote(parts.password) if parts.password else None
        sentinel = Sentinel(hosts, sentinel_kwargs={"password": password}, password=password, **options)  # type: ignore[no-untyped-call]
        db = int(path[1]) if len(path) > 1 else 0
        master: aioredis.Redis = sentinel.master_for(path[0], db=db, ssl=url.startswith("rediss"))
        return master
    return aioredis.Redis.from_url(url, **options)


def _hosts(netloc: str) -> list[str]:
    return netloc.rsplit("@", 1)[-1].split(",")
