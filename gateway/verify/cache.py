"""A bounded LRU of verified tokens keyed by the token's SHA-256: a hit skips signature work only.

Expiry, the route's rules and revocation are still checked on every hit; the token itself is never stored.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Generic, TypeVar

from gateway.metrics import Metrics

V = TypeVar("V")


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("ascii", "replace")).digest()


class TokenCache(Generic[V]):
    def __init__(self, max_entries: int, metrics: Metrics | None = None) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[bytes, V] = OrderedDict()
        self._hit = metrics.counter(metrics.token_cache.labels("hit")) if metrics else None
        self._miss = metrics.counter(metrics.token_cache.labels("miss")) if metrics else None

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, digest: bytes) -> V | None:
        value = self._entries.get(digest)
        if value is None:
            if self._miss is not None:
                self._miss.inc()
            return None
        self._entries.move_to_end(digest)
        if self._hit is not None:
            self._hit.inc()
        return value

    def put(self, digest: bytes, value: V) -> None:
        if self.max_entries <= 0:
            return
        self._entries[digest] = value
        self._entries.move_to_end(digest)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def discard(self, digest: bytes) -> None:
        self._entries.pop(digest, None)
