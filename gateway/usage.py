"""Last use of minted tokens: when, from which address and user agent — without a store write per request.

The request path only assigns into a dict (`record`): the newest use of each token wins. A background task
(`run`, started by the server) flushes that dict to the store, at most once per token per `interval`
(tokens.last_use_interval): a token used 10,000 times in a minute costs one write when it is first seen, and one
more (its latest use) when the interval has passed or the gateway stops. The store applies a use only if it is
newer than the one it holds, so instances flushing out of order never move `last_used_at` backwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Protocol

from gateway.store import STORE_ERRORS, LastUse

log = logging.getLogger(__name__)
MAX_USER_AGENT = 256  # a longer User-Agent is cut: it is shown to operators, not parsed


class UseSink(Protocol):
    async def record_uses(self, uses: Mapping[str, LastUse]) -> None: ...


class UsageTracker:
    """Throttled, off-request-path recorder of the last use of each minted token (by jti)."""

    def __init__(
        self,
        sink: UseSink,
        interval: float = 60.0,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sink = sink
        self.interval = interval  # may change on reload
        self.writes = 0  # per-token writes sent to the store (one script call carries up to USES_PER_CALL)
        self._clock = clock
        self._monotonic = monotonic
        self._pending: dict[str, LastUse] = {}  # jti -> newest use not yet written
        self._written: dict[str, float] = {}  # jti -> monotonic time of its last write (pruned after interval)
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    def record(self, jti: str, client: str | None, user_agent: str | None) -> None:
        """Note one use. Called on the request path: a dict assignment, nothing else."""
        self._pending[jti] = LastUse(self._clock(), client, user_agent)

    @property
    def pending(self) -> int:
        """Tokens with a use not yet written."""
        return len(self._pending)

    @property
    def throttled(self) -> int:
        """Tokens written within the last interval (their next write waits for it to pass)."""
        return len(self._written)

    async def flush(self, force: bool = False) -> int:
        """Write the pending uses whose token was not written within `interval` (all of them with `force`).

        Returns how many tokens were written. On a store error the uses stay pending (unless a newer one arrived)
        and the error is logged once until a flush succeeds again; an unforeseen error drops that flush's uses."""
        now = self._monotonic()
        due: dict[str, LastUse] = {}
        for jti in list(self._pending):
            last = self._written.get(jti)
            if force or last is None or now - last >= self.interval:
                due[jti] = self._pending.pop(jti)
        if due:
            try:
                await self.sink.record_uses({jti: _trim(use) for jti, use in due.items()})
            except asyncio.CancelledError:  # stopping mid-write: keep them for the final flush
                for jti, use in due.items():
                    self._pending.setdefault(jti, use)
                raise
            except STORE_ERRORS as exc:
                for jti, use in due.items():
                    self._pending.setdefault(jti, use)
                if not self._failing:
                    log.warning("last-use records not written; retrying", extra={"error": type(exc).__name__})
                self._failing = True
                return 0
            except Exception:  # unforeseen: the batch is dropped (kept, it could fail every flush), the task lives on
                log.exception("last-use records dropped: unexpected error", extra={"tokens": len(due)})
                return 0
            self._failing = False
            self.writes += len(due)
            for jti in due:
                self._written[jti] = now
        for jti in [j for j, at in self._written.items() if now - at >= self.interval and j not in self._pending]:
            del self._written[jti]
        return len(due)

    async def run(self) -> None:
        """Background task: flush every tick (a quarter of the interval, at most a second) until cancelled."""
        while True:
            await asyncio.sleep(max(0.01, min(1.0, self.interval / 4)))
            await self.flush()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="last-use-tracker")

    async def stop(self) -> None:
        """Cancel the task and write what is still pending (throttle or not: it would be lost otherwise)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        with contextlib.suppress(*STORE_ERRORS):
            await self.flush(force=True)


def _trim(use: LastUse) -> LastUse:
    agent = _text(use.user_agent)
    return LastUse(use.at, _text(use.client), agent[:MAX_USER_AGENT] if agent is not None else None)


def _text(value: str | None) -> str | None:
    """`value` as valid UTF-8 (Redis takes nothing else): the listener keeps header bytes that are not UTF-8 as
    surrogates (surrogateescape); they are written as \\xNN, so what was sent stays visible to operators."""
    if value is None:
        return None
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
