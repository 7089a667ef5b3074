"""Per-issuer JWKS cache: fetched at start, refreshed on a schedule (Cache-Control may shorten it), refetched at
most once per cool-down for an unknown `kid`, and the last good key set is kept when the endpoint fails.

`jku`, `x5u`, `x5c` and embedded `jwk` headers are never consulted: keys come only from the configured source.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from gateway.config import IssuerSettings
from gateway.metrics import Metrics
from gateway.verify.keys import KeySet, from_jwks

log = logging.getLogger(__name__)

_MAX_DOCUMENT_BYTES = 1 << 20
_MAX_AGE = re.compile(r"max-age=(\d+)")
# First retry after a failed fetch, at the soonest: with jwks_min_refresh_interval 0 the back-off would otherwise
# stay at 0 and the refresher would hammer a failing endpoint in a loop.
_MIN_RETRY_S = 0.1


class IssuerKeys:
    """The current key set of one issuer, kept fresh from its JWKS endpoint (or fixed, for static keys)."""

    def __init__(
        self,
        settings: IssuerSettings,
        session: aiohttp.ClientSession | None,
        metrics: Metrics,
        static: KeySet | None = None,
        clock: Callable[[], float] = time.monotonic,
        last_good: KeySet | None = None,
    ) -> None:
        self.settings = settings
        self.keys: KeySet | None = static or last_good  # last_good: from a reload that kept the key source
        self._static = static is not None
        self._session = session
        self._metrics = metrics
        self._clock = clock
        self._jwks_uri = settings.jwks_uri
        self._last_attempt = float("-inf")
        self._fetching: asyncio.Task[bool] | None = None
        self._next_refresh = settings.jwks_refresh_interval
        self._failures = 0
        # 0 until keys arrive: an issuer that never got any must show, for the alert on gateway_jwks_keys == 0.
        metrics.jwks_keys.labels(settings.name).set(len(self.keys) if self.keys is not None else 0)

    @property
    def ready(self) -> bool:
        return self.keys is not None

    async def refresh(self) -> bool:
        """Fetch now, coalesced with any fetch already under way; True when a new key set was stored."""
        if self._static:
            return False
        if self._fetching is None or self._fetching.done():
            self._last_attempt = self._clock()
            self._fetching = asyncio.create_task(self._fetch())
        return await asyncio.shield(self._fetching)

    async def refresh_for_unknown_kid(self) -> bool:
        """An unknown kid may mean the issuer rotated: refetch, but at most once per cool-down."""
        if self._static:
            return False
        if self._fetching is not None and not self._fetching.done():
            return await asyncio.shield(self._fetching)
        if self._clock() - self._last_attempt < self.settings.jwks_min_refresh_interval:
            return False
        return await self.refresh()

    async def run_refresher(self) -> None:
        """Background loop: refresh on schedule; after a failure retry sooner, backing off to the schedule."""
        if self._static:
            return
        while True:
            await asyncio.sleep(self._next_refresh)
            await self.refresh()

    async def _fetch(self) -> bool:
        name = self.settings.name
        try:
            document, max_age = await self._get_jwks()
            keys = from_jwks(document)
            if not len(keys):
                raise ValueError("the JWKS has no usable signing keys")
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            return self._failed(exc)
        except Exception as exc:  # noqa: BLE001 - unforeseen: still a failed fetch; raising would end the refresher
            log.exception("unexpected error while fetching the JWKS", extra={"issuer": name})
            return self._failed(exc)
        self._failures = 0
        self.keys = keys
        interval = self.settings.jwks_refresh_interval
        if max_age is not None:
            interval = max(self.settings.jwks_min_refresh_interval, min(interval, max_age))
        self._next_refresh = interval
        self._metrics.jwks_refreshes.labels(name, "success").inc()
        self._metrics.jwks_keys.labels(name).set(len(keys))
        log.info("JWKS loaded", extra={"issuer": name, "keys": len(keys), "next_refresh_s": interval})
        return True

    def _failed(self, exc: BaseException) -> bool:
        """Count a failed fetch and schedule the retry: sooner after a first failure, backing off to the schedule."""
        self._failures += 1
        first_retry = max(self.settings.jwks_min_refresh_interval, _MIN_RETRY_S)
        self._next_refresh = min(first_retry * 2 ** min(self._failures - 1, 10), self.settings.jwks_refresh_interval)
        self._metrics.jwks_refreshes.labels(self.settings.name, "failure").inc()
        log.warning(
            "JWKS fetch failed; keeping the last good keys",
            extra={"issuer": self.settings.name, "error": _describe(exc), "have_keys": self.keys is not None},
        )
        return False

    async def _get_jwks(self) -> tuple[dict[str, Any], float | None]:
        if self._jwks_uri is None:
            self._jwks_uri = await self._discover()
        return await self._get_json(self._jwks_uri)

    async def _discover(self) -> str:
        issuer = self.settings.issuer
        document, _ = await self._get_json(issuer.rstrip("/") + "/.well-known/openid-configuration")
        if document.get("issuer") != issuer:
            raise ValueError("the discovery document names a different issuer")
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri.startswith(("https://", "http://")):
            raise ValueError("the discovery document has no usable jwks_uri")
        return jwks_uri

    async def _get_json(self, url: str) -> tuple[dict[str, Any], float | None]:
        assert self._session is not None  # noqa: S101 - only static issuers have no session
        timeout = aiohttp.ClientTimeout(total=self.settings.jwks_timeout)
        async with self._session.get(url, timeout=timeout, allow_redirects=False) as resp:
            if resp.status != 200:
                raise ValueError(f"HTTP {resp.status} from {url}")
            # StreamReader.read(n) returns what has arrived so far, not n bytes: a large JWKS comes in several
            # reads, so read to the end, refusing more than the limit.
            body = bytearray()
            async for chunk in resp.content.iter_any():
                body += chunk
                if len(body) > _MAX_DOCUMENT_BYTES:
                    raise ValueError(f"the document at {url} is larger than 1 MiB")
            max_age = _MAX_AGE.search(resp.headers.get("Cache-Control", ""))
        try:
            document = json.loads(body)
        except ValueError:
            raise ValueError(f"the document at {url} is not JSON") from None
        if not isinstance(document, dict):
            raise ValueError(f"the document at {url} is not a JSON object")
        return document, float(max_age.group(1)) if max_age else None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
