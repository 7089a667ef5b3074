"""The shared store: revocations in Redis (layout in DESIGN.md), or in process memory for a single instance.

    {prefix}revoked:jti   sorted set   member = jti (or "{issuer}\\x1f{jti}" when scoped), score = token exp
    {prefix}revoked:sub   hash         subject (or "{issuer}\\x1f{subject}") -> cut-off: tokens issued before it
    {prefix}revocations   channel      one JSON notice per change, published by the script that makes it

Writes are idempotent (ZADD/HSET of the same value change nothing) and atomic with their notice.

Tokens minted by the gateway (gateway/tokens.py) keep their metadata here, never the token (only its SHA-256):

    {prefix}token:{jti}     hash        one minted token; EXPIREAT its exp + TOKEN_RETENTION (expired ones stay
                                        listable, as "expired", for that long)
    {prefix}tokens          sorted set  member = jti, score = created_at: the listing index, newest first
    {prefix}tokens:purge    sorted set  member = jti, score = when its index entry goes (exp + TOKEN_RETENTION)
    {prefix}family:{id}     sorted set  member = jti, score = exp: a refresh key family (the keys of one rotation
                                        chain and the access tokens minted from them), to revoke them together

Each field of `token:{jti}` has one writer, and every writer sets single fields (HSET/HSETNX inside a short Lua
script that first checks the hash exists), never the whole hash: concurrent revokes and uses lose nothing, and no
writer re-creates a purged hash.

    mint        jti kind subject audiences scopes claims note created_at expires_at token_sha256 rotate family parent
    revoke      revoked_at (first revoke wins) revoked_by revoke_reason
    exchange    retired_at (first exchange of a rotating refresh key wins) replaced_by
    last use    first_seen (minimum) last_used_at (maximum) last_client last_user_agent (with last_used_at)
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, cast
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

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


def cutoff_in(cutoffs: Mapping[str, float], subject: str, issuer: str) -> float:
    """The latest of `cutoffs` (subject members) revoking `issuer`'s tokens of `subject`: its own or every issuer's."""
    return max(cutoffs.get(member(subject, None), 0.0), cutoffs.get(member(subject, issuer), 0.0))


def parse_member(kind: Kind, raw: str, until: float) -> Revocation:
    issuer, sep, value = raw.partition(SEPARATOR)
    return Revocation(kind, value, until, issuer) if sep else Revocation(kind, raw, until)


Snapshot = tuple[dict[str, float], dict[str, float]]  # (jti members -> exp, subject members -> cut-off)


class RevocationStore(Protocol):
    async def add(self, revocation: Revocation) -> None: ...
    async def remove(self, kind: Kind, value: str, issuer: str | None) -> bool: ...
    async def snapshot(self) -> Snapshot: ...
    async def page(self, kind: Kind, offset: int, limit: int) -> list[Revocation]: ...
    async def subject_cutoff(self, subject: str, issuer: str) -> float: ...
    async def subject_cutoffs(self) -> dict[str, float]: ...
    async def close(self) -> None: ...


TOKEN_RETENTION = 30 * 86400.0
"""How long the metadata of a minted token outlives the token (so expired tokens can still be listed)."""

WriteOutcome = Literal["done", "already", "missing"]  # the field was set now / had been set before / no such token


@dataclass(frozen=True, slots=True)
class LastUse:
    """One use of a minted token, as the last-use tracker hands it to the store."""

    at: float  # unix seconds
    client: str | None  # the client's address
    user_agent: str | None


class TokenStore(Protocol):
    """Metadata of minted tokens (field names and their writers: the module docstring)."""

    async def put_token(
        self, jti: str, fields: Mapping[str, str], created_at: float, purge_at: float, family: str | None, exp: float
    ) -> None: ...
    async def get_token(self, jti: str) -> dict[str, str] | None: ...
    def scan_tokens(self) -> AsyncGenerator[dict[str, str], None]: ...  # newest first
    async def mark_revoked(self, jti: str, at: float, by: str, reason: str) -> WriteOutcome: ...
    async def retire_token(self, jti: str, at: float, replaced_by: str) -> WriteOutcome: ...
    async def record_uses(self, uses: Mapping[str, LastUse]) -> None: ...
    async def add_to_family(self, family: str, jti: str, exp: float, until: float) -> None: ...
    async def family_members(self, family: str, now: float) -> dict[str, float]: ...


class Store(RevocationStore, TokenStore, Protocol):
    """Everything the gateway keeps: revocations and the metadata of the tokens it minted."""


# KEYS = token hashes. ARGV = at, client, user agent of each, in order. first_seen only goes down, last_used_at only
# up, so two instances flushing out of order never move them backwards; nothing is written for an unknown (or
# purged) token.
_RECORD_USES = """
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then
    local text = ARGV[3 * i - 2]
    local at = tonumber(text)
    local first = tonumber(redis.call('HGET', key, 'first_seen'))
    if not first or at < first then redis.call('HSET', key, 'first_seen', text) end
    local last = tonumber(redis.call('HGET', key, 'last_used_at'))
    if not last or last < at then
      redis.call('HSET', key, 'last_used_at', text, 'last_client', ARGV[3 * i - 1], 'last_user_agent', ARGV[3 * i])
    end
  end
end
return 1
"""
USES_PER_CALL = 500  # a script holds Redis while it runs: a flush of many tokens is cut into short ones
# KEYS[1] = token hash. ARGV = first field (set once), its value, then pairs set along with it the first time.
# Returns 0: no such token, 1: set now, 2: had been set before (nothing changed).
_SET_ONCE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 2 end
if #ARGV > 2 then redis.call('HSET', KEYS[1], unpack(ARGV, 3)) end
return 1
"""
_OUTCOMES: dict[int, WriteOutcome] = {0: "missing", 1: "done", 2: "already"}

# Writes that span keys, or a key and a notice, are scripts rather than MULTIs: atomic alike, and a cluster runs them
# (its MULTIs take no PUBLISH, which has no key to route by). Every key a script touches is in KEYS, in one slot.
#
# KEYS[1] = revoked:jti or revoked:sub. ARGV = kind, member, value (exp or cut-off), channel, notice.
_REVOKE = """
if ARGV[1] == 'jti' then redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
else redis.call('HSET', KEYS[1], ARGV[2], ARGV[3]) end
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
"""
# KEYS[1] = revoked:jti or revoked:sub. ARGV = kind, member, channel, notice. Returns 1 if it was there.
_UNREVOKE = """
local removed
if ARGV[1] == 'jti' then removed = redis.call('ZREM', KEYS[1], ARGV[2])
else removed = redis.call('HDEL', KEYS[1], ARGV[2]) end
redis.call('PUBLISH', ARGV[3], ARGV[4])
return removed
"""
# KEYS = token hash, tokens index, purge index[, family]. ARGV = jti, expire-at (whole seconds), created_at,
# purge_at, exp (for the family), then the hash's field/value pairs.
_KEEP_MINTED = """
redis.call('HSET', KEYS[1], unpack(ARGV, 6))
redis.call('EXPIREAT', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
if KEYS[4] then
  redis.call('ZADD', KEYS[4], ARGV[5], ARGV[1])
  redis.call('EXPIREAT', KEYS[4], ARGV[2])
end
return 1
"""
# KEYS[1] = family. ARGV = jti, exp, now, expire-at (whole seconds).
_JOIN_FAMILY = """
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
redis.call('EXPIREAT', KEYS[1], ARGV[4])
return 1
"""


RedisClient = aioredis.Redis | RedisCluster
STORE_ERRORS = (RedisError, RedisClusterException, OSError)  # OSError: TimeoutError too
"""What a store that is down or unreachable raises. A cluster client that reaches no node raises
RedisClusterException, which is not a RedisError."""
CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")


class RedisStore:
    def __init__(self, client: RedisClient, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self.jti_key = f"{prefix}revoked:jti"
        self.sub_key = f"{prefix}revoked:sub"
        self.channel = f"{prefix}revocations"
        self.tokens_key = f"{prefix}tokens"
        self.purge_key = f"{prefix}tokens:purge"
        # Told of this store's own revocation writes once they are made (the mirror, for read-your-writes: its
        # notice comes back over pub/sub too, but a script's reply can reach the writer first).
        self.listener: Callable[[str], None] | None = None

    async def _eval(self, script: str, keys: list[str], args: Sequence[str | int]) -> Any:
        """Run a script: EVAL, not EVALSHA, since a cluster's node starts with no scripts after a failover and
        redis-py then loads them on every primary (failing while any is down). They run on writes only."""
        return await self.client.eval(script, len(keys), *keys, *args)

    def _told(self, notice: str) -> None:
        if self.listener is not None:
            self.listener(notice)

    async def subscription(self) -> PubSub:
        """A subscription to the notices, on a connection of its own. On a cluster it is to the node serving the
        slot (the scripts publish there; `moved` tells when that changes), as a plain client: redis-py's
        cluster subscription borrows from the node's pool, which the cluster client closes on any ClusterDownError
        and every few MOVED."""
        if not isinstance(self.client, RedisCluster):
            pubsub = self.client.pubsub()
        else:
            await self.client.exists(self.jti_key)  # learns (or re-learns, after a failover) who serves the slot
            owner = self.client.get_node_from_key(self.jti_key)
            if owner is None:
                raise RedisClusterException("no node serves the slot of store.key_prefix")
            kwargs = {k: v for k, v in owner.connection_kwargs.items() if k != "event_dispatcher"}
            pool = aioredis.ConnectionPool(connection_class=owner.connection_class, **kwargs)
            pubsub = aioredis.Redis.from_pool(pool).pubsub()
        await pubsub.subscribe(self.channel)
        return pubsub

    async def end_subscription(self, pubsub: PubSub) -> None:
        await cast(Any, pubsub).aclose()  # untyped in some redis-py releases
        if isinstance(self.client, RedisCluster):
            await pubsub.connection_pool.disconnect()  # its own (subscription): nothing else uses it

    async def moved(self, pubsub: PubSub) -> bool:
        """Whether the slot is no longer served by the node `pubsub` listens on (a reshard, a failover): notices are
        published on the new one, and reach the old one only over the cluster bus, if at all, while its PONGs go
        on. A keyed command refreshes who serves the slot (MOVED). Always False for a single Redis."""
        if not isinstance(self.client, RedisCluster):
            return False
        await self.client.exists(self.jti_key)
        owner = self.client.get_node_from_key(self.jti_key)
        connection = pubsub.connection
        return owner is None or connection is None or (connection.host, connection.port) != (owner.host, owner.port)

    def _set_of(self, kind: Kind) -> str:
        return self.jti_key if kind == "jti" else self.sub_key

    async def add(self, revocation: Revocation) -> None:
        args = [revocation.kind, revocation.member, repr(revocation.until), self.channel, revocation.notice("add")]
        await self._eval(_REVOKE, [self._set_of(revocation.kind)], args)
        self._told(args[-1])

    async def remove(self, kind: Kind, value: str, issuer: str | None) -> bool:
        gone = Revocation(kind, value, 0.0, issuer)
        args = [kind, gone.member, self.channel, gone.notice("remove")]
        removed = bool(await self._eval(_UNREVOKE, [self._set_of(kind)], args))
        self._told(args[-1])
        return removed

    async def snapshot(self) -> Snapshot:
        # Not one MULTI (a cluster's take no keyless commands, and need none here): a change made between the reads
        # is also a notice, which the mirror replays onto this snapshot.
        async with self.client.pipeline(transaction=False) as pipe:
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

    async def subject_cutoff(self, subject: str, issuer: str) -> float:
        """The latest cut-off revoking `issuer`'s tokens of `subject` (0: none)."""
        cutoffs = await self.client.hmget(self.sub_key, [member(subject, None), member(subject, issuer)])
        return max((t for t in (float(c) for c in cutoffs if c is not None) if math.isfinite(t)), default=0.0)

    async def subject_cutoffs(self) -> dict[str, float]:
        """Every subject revocation, by member (few: one per offboarded user or leaked credential family)."""
        cutoffs = {str(m): float(v) for m, v in (await self.client.hgetall(self.sub_key)).items()}
        return {m: t for m, t in cutoffs.items() if math.isfinite(t)}  # NaN, written before input was checked

    def token_key(self, jti: str) -> str:
        return f"{self.prefix}token:{jti}"

    def family_key(self, family: str) -> str:
        return f"{self.prefix}family:{family}"

    async def put_token(
        self, jti: str, fields: Mapping[str, str], created_at: float, purge_at: float, family: str | None, exp: float
    ) -> None:
        keys = [self.token_key(jti), self.tokens_key, self.purge_key]
        if family is not None:
            keys.append(self.family_key(family))
        args: list[str | int] = [jti, int(purge_at) + 1, repr(created_at), repr(purge_at), repr(exp)]
        args += [part for pair in fields.items() for part in pair]
        await self._eval(_KEEP_MINTED, keys, args)

    async def get_token(self, jti: str) -> dict[str, str] | None:
        raw = await self.client.hgetall(self.token_key(jti))
        return {str(k): str(v) for k, v in raw.items()} or None

    async def scan_tokens(self) -> AsyncGenerator[dict[str, str], None]:
        """Every token's fields, newest first; the index is pruned of purged tokens first.

        The index is read whole (a jti per token: small) and the hashes fetched 100 at a time, so a caller that
        stops early (one page) fetches only what it needs."""
        stale = [str(m) for m in await self.client.zrangebyscore(self.purge_key, "-inf", time.time())]
        if stale:
            # The index first: if the second removal is lost, the next listing finds the jti stale again.
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.zrem(self.tokens_key, *stale)
                pipe.zrem(self.purge_key, *stale)
                await pipe.execute()
        jtis = [str(m) for m in await self.client.zrevrange(self.tokens_key, 0, -1)]
        for start in range(0, len(jtis), 100):
            async with self.client.pipeline(transaction=False) as pipe:
                for jti in jtis[start : start + 100]:
                    pipe.hgetall(self.token_key(jti))
                rows: list[dict[str, str]] = await pipe.execute()
            for row in rows:
                if row:
                    yield row

    async def mark_revoked(self, jti: str, at: float, by: str, reason: str) -> WriteOutcome:
        args = ["revoked_at", repr(at), "revoked_by", by, "revoke_reason", reason]
        return _OUTCOMES[int(await self._eval(_SET_ONCE, [self.token_key(jti)], args))]

    async def retire_token(self, jti: str, at: float, replaced_by: str) -> WriteOutcome:
        args = ["retired_at", repr(at), "replaced_by", replaced_by]
        return _OUTCOMES[int(await self._eval(_SET_ONCE, [self.token_key(jti)], args))]

    async def record_uses(self, uses: Mapping[str, LastUse]) -> None:
        """One script call per USES_PER_CALL tokens (a cluster pipelines no scripts; one call needs no pipeline)."""
        items = list(uses.items())
        for start in range(0, len(items), USES_PER_CALL):
            batch = items[start : start + USES_PER_CALL]
            args = [part for _, use in batch for part in (repr(use.at), use.client or "", use.user_agent or "")]
            await self._eval(_RECORD_USES, [self.token_key(jti) for jti, _ in batch], args)

    async def add_to_family(self, family: str, jti: str, exp: float, until: float) -> None:
        args: list[str | int] = [jti, repr(exp), repr(time.time()), int(until) + 1]
        await self._eval(_JOIN_FAMILY, [self.family_key(family)], args)

    async def family_members(self, family: str, now: float) -> dict[str, float]:
        rows = await self.client.zrangebyscore(self.family_key(family), f"({now!r}", "+inf", withscores=True)
        return {str(row[0]): float(row[1]) for row in rows}

    async def close(self) -> None:
        await self.client.aclose()


class MemoryStore:
    """One process only: the store is its own mirror, so changes apply at once through `listener`."""

    def __init__(self) -> None:
        self.jtis: dict[str, float] = {}
        self.subjects: dict[str, float] = {}
        self.listener: Callable[[str], Awaitable[None] | None] | None = None
        self.tokens: dict[str, dict[str, str]] = {}  # jti -> fields, as in the Redis hash
        self.token_index: dict[str, tuple[float, float]] = {}  # jti -> (created_at, purge_at)
        self.families: dict[str, dict[str, float]] = {}  # family -> {jti: exp}

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

    async def subject_cutoff(self, subject: str, issuer: str) -> float:
        return cutoff_in(self.subjects, subject, issuer)

    async def subject_cutoffs(self) -> dict[str, float]:
        return dict(self.subjects)  # checked on the way in: always finite

    async def put_token(
        self, jti: str, fields: Mapping[str, str], created_at: float, purge_at: float, family: str | None, exp: float
    ) -> None:
        self.tokens[jti] = dict(fields)
        self.token_index[jti] = (created_at, purge_at)
        if family is not None:
            self.families.setdefault(family, {})[jti] = exp

    async def get_token(self, jti: str) -> dict[str, str] | None:
        self._purge_tokens()
        found = self.tokens.get(jti)
        return dict(found) if found is not None else None

    async def scan_tokens(self) -> AsyncGenerator[dict[str, str], None]:
        self._purge_tokens()
        for jti, _ in sorted(self.token_index.items(), key=lambda item: (-item[1][0], item[0])):
            found = self.tokens.get(jti)
            if found is not None:
                yield dict(found)

    async def mark_revoked(self, jti: str, at: float, by: str, reason: str) -> WriteOutcome:
        return self._set_once(jti, {"revoked_at": repr(at), "revoked_by": by, "revoke_reason": reason})

    async def retire_token(self, jti: str, at: float, replaced_by: str) -> WriteOutcome:
        return self._set_once(jti, {"retired_at": repr(at), "replaced_by": replaced_by})

    async def record_uses(self, uses: Mapping[str, LastUse]) -> None:
        for jti, use in uses.items():
            fields = self.tokens.get(jti)
            if fields is None:
                continue
            if "first_seen" not in fields or use.at < float(fields["first_seen"]):
                fields["first_seen"] = repr(use.at)
            if "last_used_at" in fields and float(fields["last_used_at"]) >= use.at:
                continue
            fields.update(last_used_at=repr(use.at), last_client=use.client or "", last_user_agent=use.user_agent or "")

    async def add_to_family(self, family: str, jti: str, exp: float, until: float) -> None:
        members = self.families.setdefault(family, {})
        members[jti] = exp
        now = time.time()
        for gone in [m for m, e in members.items() if e < now]:
            del members[gone]

    async def family_members(self, family: str, now: float) -> dict[str, float]:
        return {m: e for m, e in self.families.get(family, {}).items() if e > now}

    async def close(self) -> None:
        return None

    def _set_once(self, jti: str, fields: dict[str, str]) -> WriteOutcome:
        found = self.tokens.get(jti)
        if found is None:
            return "missing"
        first = next(iter(fields))
        if first in found:
            return "already"
        found.update(fields)
        return "done"

    def _purge_tokens(self) -> None:
        now = time.time()
        for jti in [j for j, (_, purge_at) in self.token_index.items() if purge_at < now]:
            del self.token_index[jti]
            self.tokens.pop(jti, None)

    async def _notify(self, notice: str) -> None:
        if self.listener is not None:
            result = self.listener(notice)
            if result is not None:
                await result


def connect_redis(settings: StoreSettings) -> RedisClient:
    """A client for redis://, rediss://, unix://, redis+sentinel://[password@]host:port[,host:port]/service[/db]
    or redis+cluster://[user:password@]host:port[,host:port] (rediss+ for TLS).

    Timeouts are short: a hung Redis must show up as a stale mirror, not as requests that hang. Nothing is contacted
    here: a cluster client learns its slots on its first command.
    """
    # RESP2: under RESP3 (redis-py 8's default) redis-py mis-parses the PONG on a subscription connection, so the
    # mirror's heartbeat never came back and it reconnected every few seconds.
    options: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": 2.0,
        "socket_connect_timeout": 2.0,
        "protocol": 2,
    }
    url = settings.redis_url
    if url.startswith(CLUSTER_SCHEMES):
        return _cluster(url, settings.key_prefix, options)
    if url.startswith(("redis+sentinel://", "rediss+sentinel://")):
        parts = urlsplit(url)
        hosts = [_host_port(h, 26379) for h in _hosts(parts.netloc)]
        path = [p for p in parts.path.split("/") if p]
        if not path:
            raise ValueError("a redis+sentinel:// URL must name the service: redis+sentinel://host:26379/mymaster")
        password = unquote(parts.password) if parts.password else None
        # untyped in some redis-py releases
        sentinel = cast(Any, Sentinel)(hosts, sentinel_kwargs={"password": password}, password=password, **options)
        db = int(path[1]) if len(path) > 1 else 0
        master: aioredis.Redis = sentinel.master_for(path[0], db=db, ssl=url.startswith("rediss"))
        return master
    return aioredis.Redis.from_url(url, **options)


def display_url(url: str) -> str:
    """`url` for messages: without its userinfo (user and password) and query (redis-py takes a password there)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    return scheme + sep + rest.rsplit("@", 1)[-1].partition("?")[0].partition("#")[0]


def _cluster(url: str, prefix: str, options: dict[str, Any]) -> RedisCluster:
    """Every key of the gateway in one hash slot (a hash tag in the prefix): its scripts touch several keys, which a
    cluster allows only within a slot. The data is small (revocations and token metadata), so one
    shard holds it; PUBLISH reaches the subscribers on every node."""
    check_cluster_prefix(url, prefix)
    parts = urlsplit(url)
    if parts.path.strip("/") not in ("", "0") or parts.query:
        raise ValueError("a redis+cluster:// URL names only nodes: a cluster has database 0 alone and takes no options")
    nodes = [ClusterNode(*_host_port(h, 6379)) for h in _hosts(parts.netloc)]
    return RedisCluster(
        startup_nodes=nodes,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        ssl=url.startswith("rediss"),
        dynamic_startup_nodes=False,  # seeds stay as given: a DNS name (a managed service's endpoint) is kept
        # One retry: enough to follow a MOVED, where redis-py's default (three, re-learning the slots between) made
        # a call to a hung node take 22 s instead of 2.
        retry=Retry(NoBackoff(), 1),
        **options,
    )


def check_cluster_prefix(url: str, prefix: str) -> None:
    if url.startswith(CLUSTER_SCHEMES) and hash_tag(prefix) is None:
        raise ValueError(
            'with Redis Cluster the prefix must hold a hash tag, so that every key lands in one slot: e.g. "{gw}:"'
        )


def hash_tag(key: str) -> str | None:
    """What Redis Cluster hashes of `key`: the text between its first `{` and the next `}`, if not empty."""
    start = key.find("{")
    end = key.find("}", start + 1)
    return key[start + 1 : end] if start >= 0 and end > start + 1 else None


def _hosts(netloc: str) -> list[str]:
    return netloc.rsplit("@", 1)[-1].split(",")


def _host_port(text: str, default_port: int) -> tuple[str, int]:
    """`host`, `host:port`, `[v6]` or `[v6]:port`."""
    host, port = text, ""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":")
    elif ":" in text:
        host, port = text.rsplit(":", 1)
    valid_port = port == "" or (port.isascii() and port.isdigit())
    if (
        not host
        or (":" in host and not text.startswith("["))
        or not valid_port
        or not 0 < int(port or default_port) < 65536
    ):
        raise ValueError("a Redis URL lists a node as host or host:port (IPv6 in brackets), comma-separated")
    return host, int(port or default_port)
