"""Token introspection (RFC 7662): ask the authorization server whether a token is active, and judge the answer.

One `Introspector` per configured endpoint, shared by every route that names it:

    memory cache (LRU) ─► shared cache (Redis, optional) ─► one call per token in flight ─► breaker ─► slots ─► POST

The caches hold the endpoint's answer, never a route's decision: an answer is judged (active, exp, nbf, iss, aud)
when used, and once it passed, later uses re-check only what time changes (exp, nbf); the route then applies its
own scopes and claims every time. Positive answers are kept for
`min(cache_ttl, exp - now)`, negative ones for `negative_cache_ttl`. Whenever the endpoint gives no well-formed
answer (timeout, connection error, a status other than 200, not JSON, `active` not a boolean, a body over 64 KiB),
the request gets a 503 and the breaker counts a failure. Such a request is never let through.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Literal
from urllib.parse import quote_plus, urlsplit

import aiohttp

from gateway import errors
from gateway.config import IntrospectionSettings
from gateway.identity import Identity
from gateway.metrics import Metrics
from gateway.store import STORE_ERRORS, RedisClient
from gateway.verify.cache import TokenCache

log = logging.getLogger(__name__)

MAX_ANSWER_BYTES = 64 * 1024
CACHE_ENTRIES = 10_000
SHARED_CACHE_TIMEOUT = 0.25  # a hung Redis must cost at most this much, not an endpoint timeout
OUTCOMES = ("active", "inactive", "error", "timeout", "breaker_open", "invalid")

Answer = Mapping[str, Any]
INACTIVE: Answer = MappingProxyType({"active": False})  # every negative answer, whatever else it said


class IntrospectionUnavailable(errors.DependencyUnavailable):
    reason, description = "introspection_unavailable", "the token introspection endpoint is unavailable"


class IntrospectionInvalid(errors.DependencyUnavailable):
    reason, description = "introspection_invalid", "the token introspection endpoint gave an invalid answer"


class BreakerOpen(IntrospectionUnavailable):
    reason = "introspection_breaker_open"

    def __init__(self, retry_after: int) -> None:
        self.retry_in = retry_after
        super().__init__()

    def headers(self, realm: str) -> dict[str, str]:
        return {"Retry-After": str(self.retry_in)}


class CallFailed(Exception):
    """The endpoint gave no usable answer; `problem` is for the log (never holds the token or the secret)."""

    outcome: ClassVar[str] = "error"
    error: ClassVar[type[errors.DependencyUnavailable]] = IntrospectionUnavailable

    def __init__(self, problem: str) -> None:
        self.problem = problem
        super().__init__(problem)


class BadAnswer(CallFailed):
    outcome, error = "invalid", IntrospectionInvalid


@dataclass(frozen=True, slots=True)
class ClientAuth:
    """How the gateway authenticates to the endpoint (RFC 7662 §2.1: the endpoint requires it)."""

    method: Literal["client_secret_basic", "client_secret_post", "bearer"]
    client_id: str | None
    secret: str = field(repr=False)

    @classmethod
    def resolve(cls, settings: IntrospectionSettings) -> ClientAuth:
        """Read the secret now, so a missing one fails the build (and `gateway check-config`), not a request."""
        where = f"introspection {settings.name}"
        if settings.auth_method != "bearer" and not settings.client_id:
            raise ValueError(f"{where}: auth_method {settings.auth_method} needs client_id")
        return cls(settings.auth_method, settings.client_id, _read_secret(settings, where))

    def headers(self) -> dict[str, str]:
        if self.method == "bearer":
            return {"Authorization": f"Bearer {self.secret}"}
        if self.method == "client_secret_basic":  # RFC 6749 §2.3.1: each part form-encoded, then base64
            pair = f"{quote_plus(self.client_id or '')}:{quote_plus(self.secret)}"
            return {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode("ascii")}
        return {}

    def form(self) -> dict[str, str]:
        if self.method == "client_secret_post":
            return {"client_id": self.client_id or "", "client_secret": self.secret}
        return {}


def _read_secret(settings: IntrospectionSettings, where: str) -> str:
    env, path = settings.client_secret_env, settings.client_secret_file
    if bool(env) == bool(path):
        raise ValueError(f"{where}: exactly one of client_secret_env or client_secret_file is required")
    if env:
        secret = os.environ.get(env, "")
        if not secret:
            raise ValueError(f"{where}: environment variable {env} (client_secret_env) is not set or empty")
        return secret
    try:
        secret = Path(str(path)).read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise ValueError(f"{where}: cannot read client_secret_file {path}: {exc.strerror}") from None
    if not secret:
        raise ValueError(f"{where}: client_secret_file {path} is empty")
    return secret


class Breaker:
    """Consecutive failures open it; `reset` seconds later one trial call (half-open) closes or re-opens it."""

    def __init__(self, failures: int, reset: float, on_change: Callable[[bool], None]) -> None:
        self.threshold = failures
        self.reset = reset
        self.failures = 0
        self.opened_at: float | None = None
        self.trial = False  # half-open: the one trial call is under way
        self._on_change = on_change

    def allow(self, now: float) -> bool:
        if self.opened_at is None:
            return True
        if self.trial or now < self.opened_at + self.reset:
            return False
        self.trial = True
        return True

    def retry_after(self, now: float) -> int:
        opened = self.opened_at if self.opened_at is not None else now
        return max(1, math.ceil(opened + self.reset - now))

    def succeeded(self) -> None:
        self.failures, self.trial = 0, False
        if self.opened_at is not None:
            self.opened_at = None
            self._on_change(False)

    def failed(self, now: float) -> None:
        self.failures += 1
        if self.trial or (self.opened_at is None and self.failures >= self.threshold):
            self.trial, self.opened_at = False, now
            self._on_change(True)


def parse_answer(body: bytes) -> Answer:
    """RFC 7662 §2.2: a JSON object whose `active` is a boolean; its other members of the types the RFC gives."""
    try:
        answer = json.loads(body, parse_constant=_no_constants)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than Python recurses
        raise BadAnswer("the answer is not JSON") from None
    if not isinstance(answer, dict):
        raise BadAnswer("the answer is not a JSON object")
    if "active" not in answer:
        raise BadAnswer("the answer has no `active` member")
    if not isinstance(answer["active"], bool):
        raise BadAnswer("`active` is not a boolean")
    if not answer["active"]:
        return INACTIVE
    answer = {name: value for name, value in answer.items() if value is not None}  # null is absent
    _check_types(answer)
    return answer


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_NUMBERS = ("exp", "iat", "nbf")
_STRINGS = ("scope", "client_id", "username", "token_type", "sub", "iss", "jti")


def _check_types(answer: Answer) -> None:
    for name in _NUMBERS:
        if name in answer and not _is_number(answer[name]):
            raise BadAnswer(f"`{name}` is not a number")
    for name in _STRINGS:
        if name in answer and not isinstance(answer[name], str):
            raise BadAnswer(f"`{name}` is not a string")
    aud = answer.get("aud")
    if aud is not None and not isinstance(aud, str):
        if not isinstance(aud, list) or not all(isinstance(a, str) for a in aud):
            raise BadAnswer("`aud` is neither a string nor a list of strings")


def _is_number(value: Any) -> bool:
    """A NumericDate: a finite JSON number (10**400 is an int that no float holds)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def judge_answer(answer: Answer, settings: IntrospectionSettings, now: float) -> Identity:
    """An answer judged as strictly as a local JWT (RFC 7662 §2.2, §4): active, then exp, nbf, iss and aud."""
    if answer.get("active") is not True:
        raise errors.Inactive()
    _check_exp(answer, now)
    _check_nbf(answer, now)
    _check_iss(answer, settings.issuer)
    _check_aud(answer, settings.audiences)
    return _identity(answer, settings.name)


def _check_exp(answer: Answer, now: float) -> None:
    if "exp" in answer and answer["exp"] <= now:
        raise errors.Expired()


def _check_nbf(answer: Answer, now: float) -> None:
    if "nbf" in answer and answer["nbf"] > now:
        raise errors.NotYetValid()


def _check_iss(answer: Answer, issuer: str | None) -> None:
    if issuer is not None and answer.get("iss") != issuer:
        raise errors.WrongIssuer()


def _check_aud(answer: Answer, audiences: tuple[str, ...]) -> None:
    if not audiences:
        return
    aud = answer.get("aud", [])
    if not set([aud] if isinstance(aud, str) else aud) & set(audiences):
        raise errors.WrongAudience()


def _identity(answer: Answer, endpoint: str) -> Identity:
    scope = answer.get("scope")
    return Identity(
        subject=answer.get("sub"),
        scopes=frozenset(scope.split()) if isinstance(scope, str) else frozenset(),
        claims=answer,
        issuer=endpoint,
        source="introspection",
        token_id=answer.get("jti"),
        expires_at=float(answer["exp"]) if "exp" in answer else None,
        issued_at=float(answer["iat"]) if "iat" in answer else None,
        # The authorization server answers for the token's validity on every call, so revocation: long_lived
        # leaves introspected tokens to it; revocation: always still checks them against the revoked set.
        long_lived=False,
    )


def _rejudged(entry: _Entry, now: float) -> Identity:
    """The identity of an answer judged acceptable before, if it still is at `now`."""
    _check_exp(entry.answer, now)
    _check_nbf(entry.answer, now)
    assert entry.identity is not None  # noqa: S101 - callers check
    return entry.identity


@dataclass(slots=True)
class _Entry:
    answer: Answer
    until: float  # clock time after which the answer must be asked again
    # The answer once judged acceptable: active, iss and aud do not change with time, so a later hit re-checks only
    # exp and nbf (`_rejudged`). None until a hit judged it (an answer may be refused, or not yet valid, at first).
    identity: Identity | None = None


class Introspector:
    """The client of one introspection endpoint, shared by every route that names it."""

    def __init__(
        self,
        settings: IntrospectionSettings,
        session: aiohttp.ClientSession,
        metrics: Metrics,
        redis: RedisClient | None = None,
        prefix: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        parts = urlsplit(settings.endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"introspection {settings.name}: endpoint must be an http:// or https:// URL")
        self.settings = settings
        self.auth = ClientAuth.resolve(settings)
        self.clock = clock
        self.breaker = Breaker(settings.breaker_failures, settings.breaker_reset, self._breaker_changed)
        self._session = session
        self._headers = {"Accept": "application/json", "Accept-Encoding": "identity", **self.auth.headers()}
        self._redis = redis if settings.shared_cache else None
        self._key_prefix = f"{prefix}introspection:{settings.name}:"
        self._shared_ok = True
        self._cache: TokenCache[_Entry] = TokenCache(CACHE_ENTRIES)
        self._in_flight: dict[bytes, asyncio.Task[Answer]] = {}
        self._slots = asyncio.Semaphore(settings.max_concurrency)
        self._calls = {outcome: metrics.introspection_requests.labels(settings.name, outcome) for outcome in OUTCOMES}
        self._hit = metrics.counter(metrics.introspection_cache.labels("hit"))
        self._miss = metrics.counter(metrics.introspection_cache.labels("miss"))
        self._duration = metrics.introspection_duration.labels(settings.name)
        self._breaker_open = metrics.introspection_breaker.labels(settings.name)
        self._breaker_open.set(0)
        if settings.shared_cache and redis is None:
            log.warning("introspection shared_cache needs store.redis_url; caching in memory only", extra=self._log)

    @property
    def _log(self) -> dict[str, str]:
        return {"endpoint": self.settings.name}

    def unchanged(self, settings: IntrospectionSettings) -> bool:
        """True when a reload may keep this client (and its cache and breaker) for `settings`."""
        return settings == self.settings and ClientAuth.resolve(settings) == self.auth

    def cached(self, digest: bytes) -> Identity | None:
        """Judge a token (by its `token_digest`) on an answer still fresh in this instance's memory, with nothing to
        await: the common case. None when the shared cache, a call in flight or a new call must answer."""
        entry = self._cache.get(digest)
        now = self.clock()
        if entry is None or entry.until <= now:
            return None
        self._hit.inc()
        if entry.identity is not None:
            return _rejudged(entry, now)
        entry.identity = judge_answer(entry.answer, self.settings, now)
        return entry.identity

    async def introspect(self, token: str, digest: bytes) -> Identity:
        """Judge `token` (`digest`: its `token_digest`) by the endpoint's answer: from a cache, or from one call
        however many ask at once."""
        answer = await self._answer(digest, token)
        return judge_answer(answer, self.settings, self.clock())

    async def _answer(self, digest: bytes, token: str) -> Answer:
        entry = self._cache.get(digest)
        if entry is not None and entry.until > self.clock():
            self._hit.inc()
            return entry.answer
        self._miss.inc()  # not in this instance's memory: then shared cache, a call in flight, or a new call
        task = self._in_flight.get(digest)
        if task is None:
            task = asyncio.create_task(self._fetch(digest, token), name=f"introspect:{self.settings.name}")
            self._in_flight[digest] = task
            task.add_done_callback(lambda done: self._landed(digest, done))
        # Shielded: a client that goes away does not cancel the call the others are waiting for.
        return await asyncio.shield(task)

    def _landed(self, digest: bytes, task: asyncio.Task[Answer]) -> None:
        if self._in_flight.get(digest) is task:
            del self._in_flight[digest]
        if not task.cancelled():
            task.exception()  # retrieved, so a failure every waiter abandoned is not reported as unhandled

    async def _fetch(self, digest: bytes, token: str) -> Answer:
        shared = await self._shared_get(digest)
        if shared is not None:
            answer, ttl = shared
        else:
            answer = await self._call(token)
            ttl = self._ttl(answer)
            await self._shared_put(digest, answer, ttl)
        if ttl > 0:
            self._cache.put(digest, _Entry(answer, self.clock() + ttl))
        return answer

    def _ttl(self, answer: Answer) -> float:
        """RFC 7662 §4: a positive answer for cache_ttl but never past the token's exp; a negative one as configured."""
        if answer["active"] is not True:
            return self.settings.negative_cache_ttl
        ttl = self.settings.cache_ttl
        if "exp" in answer:
            ttl = min(ttl, float(answer["exp"]) - self.clock())
        return ttl

    async def _call(self, token: str) -> Answer:
        now = self.clock()
        if not self.breaker.allow(now):
            self._calls["breaker_open"].inc()
            raise BreakerOpen(self.breaker.retry_after(now))
        try:
            async with asyncio.timeout(self.settings.timeout), self._slots:
                answer = await self._post(token)
        except TimeoutError:
            raise self._failed(CallFailed(f"no answer within {self.settings.timeout:g}s"), "timeout") from None
        except CallFailed as exc:
            raise self._failed(exc, exc.outcome) from None
        except BaseException:
            self.breaker.failed(self.clock())  # cancelled: a trial call must not leave the breaker half-open
            raise
        self.breaker.succeeded()
        self._calls["active" if answer["active"] else "inactive"].inc()
        return answer

    async def _post(self, token: str) -> Answer:
        """RFC 7662 §2.1: a form POST of the token and its type hint, authenticated as the client."""
        form = {"token": token, "token_type_hint": "access_token", **self.auth.form()}
        started = time.perf_counter()
        try:
            async with self._session.post(
                self.settings.endpoint, data=form, headers=self._headers, allow_redirects=False
            ) as response:
                if response.status != 200:
                    raise CallFailed(f"status {response.status}")
                body = await _read_limited(response, MAX_ANSWER_BYTES)
        except aiohttp.ClientError as exc:
            raise CallFailed(f"request failed ({type(exc).__name__})") from None
        finally:
            self._duration.observe(time.perf_counter() - started)
        return parse_answer(body)

    def _failed(self, failure: CallFailed, outcome: str) -> errors.DependencyUnavailable:
        self.breaker.failed(self.clock())
        self._calls[outcome].inc()
        log.warning(
            "introspection endpoint %s gave no usable answer: %s",
            self.settings.name,
            failure.problem,
            extra={**self._log, "outcome": outcome, "problem": failure.problem},
        )
        return failure.error()

    def _breaker_changed(self, opened: bool) -> None:
        self._breaker_open.set(1 if opened else 0)
        if opened:
            wait = self.settings.breaker_reset
            log.error("introspection breaker open: refusing calls for %gs", wait, extra=self._log)
        else:
            log.info("introspection breaker closed: the endpoint answers again", extra=self._log)

    async def _shared_get(self, digest: bytes) -> tuple[Answer, float] | None:
        if self._redis is None:
            return None
        key = self._key_prefix + digest.hex()
        try:
            async with asyncio.timeout(SHARED_CACHE_TIMEOUT), self._redis.pipeline(transaction=False) as pipe:
                pipe.get(key)
                pipe.pttl(key)
                raw, pttl = await pipe.execute()
        except STORE_ERRORS as exc:
            self._shared_failed(exc)
            return None
        self._shared_ok = True
        if raw is None or not isinstance(pttl, int) or pttl <= 0:
            return None
        try:
            return parse_answer(raw.encode() if isinstance(raw, str) else raw), pttl / 1000
        except BadAnswer:
            return None  # not ours, or from an older version: ask the endpoint

    async def _shared_put(self, digest: bytes, answer: Answer, ttl: float) -> None:
        milliseconds = int(ttl * 1000)
        if self._redis is None or milliseconds <= 0:
            return
        text = json.dumps(dict(answer), separators=(",", ":"))
        try:
            async with asyncio.timeout(SHARED_CACHE_TIMEOUT):
                await self._redis.set(self._key_prefix + digest.hex(), text, px=milliseconds)
        except STORE_ERRORS as exc:
            self._shared_failed(exc)

    def _shared_failed(self, exc: BaseException) -> None:
        if self._shared_ok:
            log.warning("introspection shared cache unreachable", extra={**self._log, "error": type(exc).__name__})
        self._shared_ok = False


async def _read_limited(response: aiohttp.ClientResponse, limit: int) -> bytes:
    if response.content_length is not None and response.content_length > limit:
        raise BadAnswer(f"the answer is larger than {limit} bytes")
    body = bytearray()
    async for chunk in response.content.iter_chunked(16384):
        body += chunk
        if len(body) > limit:
            raise BadAnswer(f"the answer is larger than {limit} bytes")
    return bytes(body)


def build_introspectors(
    endpoints: Iterable[IntrospectionSettings],
    session: aiohttp.ClientSession,
    metrics: Metrics,
    redis: RedisClient | None,
    prefix: str,
    previous: Mapping[str, Introspector],
) -> dict[str, Introspector]:
    """One client per endpoint; a reload keeps a client whose settings and secret did not change, with its cache."""
    built: dict[str, Introspector] = {}
    for settings in endpoints:
        old = previous.get(settings.name)
        if old is not None and old.unchanged(settings):
            built[settings.name] = old
        else:
            built[settings.name] = Introspector(settings, session, metrics, redis, prefix)
    return built
