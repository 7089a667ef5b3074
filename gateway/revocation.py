"""The revocation mirror: an in-memory copy of the revoked set, so the per-request check touches no network.

Loaded at start, kept current by pub/sub notices, fully re-synced after every reconnect and periodically (a notice
lost in a disconnect is never lost for good). Its age is the time since it was last confirmed current: a notice,
a full sync, or a PONG on the subscription connection (which proves every earlier notice has been delivered).
When the age exceeds `max_staleness`, the route's on_unavailable decides.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from typing import Literal

from gateway import errors
from gateway.identity import Identity
from gateway.metrics import Metrics, multiprocess
from gateway.store import SEPARATOR, STORE_ERRORS, MemoryStore, RedisStore, RevocationStore

log = logging.getLogger(__name__)


class RevocationUnavailable(errors.DependencyUnavailable):
    reason, description = "revocation_unavailable", "the revocation list cannot be confirmed current"


class MissingTokenId(errors.AuthError):
    reason, description = "no_jti", "a long-lived token without jti cannot be revoked, so it is refused"


class Mirror:
    def __init__(self, store: RevocationStore, metrics: Metrics, resync_interval: float, max_staleness: float) -> None:
        self.store = store
        self.jtis: dict[str, float] = {}
        self.subjects: dict[str, float] = {}
        self._metrics = metrics
        self._resync_interval = resync_interval
        self._heartbeat = max(0.05, min(1.0, max_staleness / 4))
        self._confirmed: float | None = None  # monotonic time the mirror was last known current
        self._up = False  # store reachable (for logging transitions once, not every retry)
        self._replay: list[str] | None = None  # notices received while a full sync runs
        self.sessions = 0  # subscriptions opened: more than one means the connection was lost and re-made
        self.heartbeats = 0  # PONGs received on the subscription connection
        self._always_current = isinstance(store, MemoryStore)
        self.synced = asyncio.Event()  # set after the first full sync (readiness)
        if isinstance(store, MemoryStore):
            store.listener = self.apply
            self.synced.set()
        elif isinstance(store, RedisStore):
            store.listener = self.apply  # this instance's own writes apply at once (read-your-writes)
        if not multiprocess():  # computed at scrape; in multiprocess mode the sync loop writes it instead
            metrics.revocation_mirror_age.set_function(self.age)
        metrics.store_up.set(1 if self._always_current else 0)

    def age(self) -> float:
        if self._always_current:
            return 0.0
        return float("inf") if self._confirmed is None else time.monotonic() - self._confirmed

    def is_revoked(self, identity: Identity) -> bool:
        jti, issuer = identity.token_id, identity.issuer
        if jti is not None and self.jtis and (jti in self.jtis or f"{issuer}{SEPARATOR}{jti}" in self.jtis):
            return True
        subject = identity.subject
        if subject is None or not self.subjects:
            return False
        cutoff = max(self.subjects.get(subject, 0.0), self.subjects.get(f"{issuer}{SEPARATOR}{subject}", 0.0))
        if not cutoff:
            return False
        # Tokens issued before the cut-off are revoked; one without iat cannot prove it came after.
        return identity.issued_at is None or identity.issued_at < cutoff

    def apply(self, notice: str) -> None:
        if self._replay is not None:
            self._replay.append(notice)  # a sync is under way: re-applied to its snapshot before the swap
        try:
            change = json.loads(notice)
            table = self.jtis if change["kind"] == "jti" else self.subjects
            if change["op"] == "add":
                until = float(change["until"])
                if not math.isfinite(until):  # NaN would make a subject's cut-off compare false both ways
                    raise ValueError(until)
                table[str(change["member"])] = until
            else:
                table.pop(str(change["member"]), None)
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed revocation notice")  # the next full sync repairs the mirror
            return
        self._metrics.revoked_tokens.set(len(self.jtis))

    async def full_sync(self) -> None:
        """Replace the mirror with a fresh snapshot. Notices keep being applied meanwhile (the snapshot of 100,000
        entries takes a while); those that arrive during it are replayed onto the snapshot before the swap, so a
        change is never lost whichever side of the snapshot it landed on (adds and removes are idempotent, and the
        last notice per member is the latest write)."""
        started = time.monotonic()
        self._replay = []
        try:
            jtis, subjects = await self.store.snapshot()
            replay, self._replay = self._replay, None
            self.jtis, self.subjects = jtis, {s: t for s, t in subjects.items() if math.isfinite(t)}
            for notice in replay:
                self.apply(notice)
        finally:
            self._replay = None
        # Never backwards: PONGs received while the snapshot was under way confirmed a later moment already.
        self._confirmed = started if self._confirmed is None else max(self._confirmed, started)
        self._metrics.revoked_tokens.set(len(self.jtis))
        self.synced.set()

    async def run(self) -> None:
        """Background task: follow the store until cancelled, reconnecting with backoff."""
        if not isinstance(self.store, RedisStore):
            while True:  # the memory store is its own mirror; only expired entries need pruning
                await asyncio.sleep(self._resync_interval)
                await self.full_sync()
        backoff = 0.05
        unforeseen: type[Exception] | None = None  # logged once per streak, with its traceback
        while True:
            sessions = self.sessions
            try:
                await self._follow(self.store)
            except Exception as exc:  # a store error, or one not foreseen: either way the mirror must not stop
                if self.sessions != sessions:  # it had synced: a new failure, not the same one retried
                    backoff, unforeseen = 0.05, None
                self._publish_age()
                if not isinstance(exc, STORE_ERRORS):
                    if type(exc) is not unforeseen:
                        log.exception("revocation mirror: unexpected error; reconnecting")
                    unforeseen = type(exc)
                elif self._up:
                    log.error("store unreachable; revocation mirror is ageing", extra={"error": type(exc).__name__})
                self._set_up(False)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            else:
                backoff, unforeseen = 0.05, None

    def _publish_age(self) -> None:
        if multiprocess():
            self._metrics.revocation_mirror_age.set(self.age())

    def _set_up(self, up: bool) -> None:
        self._up = up
        self._metrics.store_up.set(1 if up else 0)

    async def _follow(self, store: RedisStore) -> None:
        """Until the store fails (raises) or, on a cluster, the slot moves to another node (returns)."""
        pubsub = await store.subscription()
        resync: asyncio.Task[None] | None = None
        try:
            await self.full_sync()  # after subscribing, so nothing published in between is missed
            self.sessions += 1
            if not self._up:
                log.info("store reachable; revocation mirror synced", extra={"revoked": len(self.jtis)})
            self._set_up(True)
            last_sync = ping_sent = time.monotonic()
            awaiting_pong = False
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=self._heartbeat)
                now = time.monotonic()
                self._publish_age()
                if message is not None and message["type"] == "message":
                    self.apply(message["data"])
                    self._confirmed = now
                elif message is not None and message["type"] == "pong":
                    self._confirmed, awaiting_pong = ping_sent, False
                    self.heartbeats += 1
                if not awaiting_pong and now - ping_sent >= self._heartbeat:
                    if await store.moved(pubsub):
                        log.info("revocation notices: the cluster slot moved; following it")
                        return
                    await pubsub.ping()
                    ping_sent, awaiting_pong = now, True
                elif awaiting_pong and now - ping_sent > max(2.0, 4 * self._heartbeat):
                    raise TimeoutError("no PONG on the subscription connection")
                if now - last_sync >= self._resync_interval and (resync is None or resync.done()):
                    if resync is not None:
                        resync.result()  # a failed re-sync means the store is in trouble: reconnect
                    # A task of its own: notices keep being applied (and replayed onto it) while it runs.
                    resync = asyncio.create_task(self.full_sync(), name="revocation-resync")
                    last_sync = now
        finally:
            if resync is not None and not resync.done():
                resync.cancel()
            await store.end_subscription(pubsub)


Policy = Literal["long_lived", "always", "never"]


class RevocationCheck:
    """The per-request check: memory only; when the mirror is stale, the route's on_unavailable decides."""

    def __init__(self, mirror: Mirror, metrics: Metrics, max_staleness: float) -> None:
        self.mirror = mirror
        self.max_staleness = max_staleness
        counter = metrics.revocation_checks
        self._ok = metrics.counter(counter.labels("ok"))  # every request on a route that checks: batched
        self._revoked = counter.labels("revoked")
        self._closed, self._open = counter.labels("stale_closed"), counter.labels("stale_open")
        self._no_jti = counter.labels("no_jti")

    def check(self, identity: Identity, policy: Policy, fail_open: bool) -> None:
        if policy == "never" or (policy == "long_lived" and not identity.long_lived):
            return
        if identity.long_lived and identity.token_id is None:
            self._no_jti.inc()
            raise MissingTokenId()
        # A stale mirror still knows what was revoked before it went stale: only what it cannot have heard of is
        # left to on_unavailable.
        if self.mirror.is_revoked(identity):
            self._revoked.inc()
            raise errors.Revoked()
        if self.mirror.age() > self.max_staleness:
            if not fail_open:
                self._closed.inc()
                raise RevocationUnavailable()
            self._open.inc()
            return
        self._ok.inc()
