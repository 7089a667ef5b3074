"""The last-use tracker: a dict assignment per request, a throttled write per token, off the request path.

The throttle is driven by an injected monotonic clock (no sleeping to let an interval pass); the stores are the real
MemoryStore and a real Redis."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import aiohttp
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.config import StoreSettings
from gateway.store import LastUse, MemoryStore, RedisStore, connect_redis
from gateway.usage import MAX_USER_AGENT, UsageTracker
from tests.support import RunningGateway, Upstream, raw_http_request
from tests.test_tokens import admin, admin_token, config, key_file, mint, running, until, use  # noqa: F401 - admin_token: autouse

INTERVAL = 60.0


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingStore(MemoryStore):
    """The real memory store, counting the writes it receives; `failures` makes the next ones fail like Redis."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.written = 0
        self.failures = 0

    async def record_uses(self, uses: Mapping[str, LastUse]) -> None:
        if self.failures:
            self.failures -= 1
            raise RedisConnectionError("connection refused")
        self.calls += 1
        self.written += len(uses)
        await super().record_uses(uses)


async def _with_token(store: MemoryStore | RedisStore, jti: str) -> None:
    now = time.time()
    fields = {"jti": jti, "kind": "access", "subject": "s", "created_at": repr(now)}
    await store.put_token(jti, fields, now, now + 3600, None, now + 3600)


@pytest.fixture
async def counting() -> CountingStore:
    store = CountingStore()
    await _with_token(store, "t1")
    return store


async def test_a_burst_costs_one_write_then_one_per_interval(counting: CountingStore) -> None:
    clock = Clock()
    tracker = UsageTracker(counting, INTERVAL, monotonic=clock)
    for i in range(10_000):
        tracker.record("t1", f"10.0.0.{i % 200}", f"agent/{i}")
    assert tracker.pending == 1, "the request path keeps one entry per token, whatever the rate"
    assert await tracker.flush() == 1
    assert counting.tokens["t1"]["last_user_agent"] == "agent/9999", "the newest use wins"
    for i in range(10_000):
        tracker.record("t1", "10.0.0.9", f"later/{i}")
        if i % 1000 == 0:
            clock.now += 1.0  # ten seconds pass, flushing on the way: all inside the interval
            assert await tracker.flush() == 0
    assert counting.written == 1 and tracker.pending == 1
    clock.now += INTERVAL
    assert await tracker.flush() == 1
    assert counting.tokens["t1"]["last_user_agent"] == "later/9999"
    assert counting.written == 2 and tracker.writes == 2
    assert await tracker.flush() == 0, "nothing pending, nothing written"


async def test_tokens_are_throttled_independently(counting: CountingStore) -> None:
    await _with_token(counting, "t2")
    clock = Clock()
    tracker = UsageTracker(counting, INTERVAL, monotonic=clock)
    tracker.record("t1", "a", "ua")
    assert await tracker.flush() == 1
    tracker.record("t1", "a", "ua")
    tracker.record("t2", "b", "ua")
    assert await tracker.flush() == 1, "t2 is due, t1 is not"
    assert counting.tokens["t2"]["last_client"] == "b"
    assert tracker.throttled == 2
    clock.now += INTERVAL
    assert await tracker.flush() == 1  # t1's pending use
    clock.now += INTERVAL
    assert await tracker.flush() == 0
    assert tracker.throttled == 0, "throttle entries are dropped once their interval has passed"


async def test_a_failed_write_keeps_the_newest_use_and_logs_once(
    counting: CountingStore, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    tracker = UsageTracker(counting, INTERVAL, monotonic=clock)
    counting.failures = 2
    tracker.record("t1", "a", "first")
    assert await tracker.flush() == 0
    tracker.record("t1", "a", "second")  # arrives while the store is down
    assert await tracker.flush() == 0
    assert tracker.pending == 1 and "last_used_at" not in counting.tokens["t1"]
    assert len([r for r in caplog.records if r.name == "gateway.usage"]) == 1, "one warning per outage"
    assert await tracker.flush() == 1
    assert counting.tokens["t1"]["last_user_agent"] == "second"


async def test_stop_writes_what_the_throttle_held_back(counting: CountingStore) -> None:
    tracker = UsageTracker(counting, INTERVAL)
    tracker.start()
    tracker.record("t1", "a", "first")

    async def written() -> bool:
        return counting.written == 1

    await until(written)  # the background task's first tick
    tracker.record("t1", "a", "last")
    await tracker.stop()
    assert counting.written == 2 and counting.tokens["t1"]["last_user_agent"] == "last"
    await tracker.stop()  # idempotent


async def test_long_user_agents_are_cut(counting: CountingStore) -> None:
    tracker = UsageTracker(counting, INTERVAL)
    tracker.record("t1", "a", "x" * 10_000)
    await tracker.flush()
    assert counting.tokens["t1"]["last_user_agent"] == "x" * MAX_USER_AGENT


@pytest.fixture(params=["memory", "redis", "cluster"])
async def store(request: pytest.FixtureRequest, key_prefix: str) -> AsyncIterator[MemoryStore | RedisStore]:
    if request.param == "memory":
        yield MemoryStore()
        return
    url = str(request.getfixturevalue("redis_cluster_url" if request.param == "cluster" else "redis_url"))
    redis_store = RedisStore(connect_redis(StoreSettings(redis_url=url, key_prefix=key_prefix)), key_prefix)
    yield redis_store
    keys = [k async for k in redis_store.client.scan_iter(f"{key_prefix}*")]
    if keys:
        await redis_store.client.delete(*keys)
    await redis_store.close()


async def test_uses_applied_out_of_order_never_move_back(store: MemoryStore | RedisStore) -> None:
    """Two instances flush independently: the store keeps the earliest first_seen and the latest last use."""
    await _with_token(store, "t1")
    await store.record_uses({"t1": LastUse(200.0, "10.0.0.2", "late")})
    await store.record_uses({"t1": LastUse(100.0, "10.0.0.1", "early")})
    await store.record_uses({"t1": LastUse(150.0, "10.0.0.3", "middle")})
    fields = await store.get_token("t1")
    assert fields is not None
    assert float(fields["first_seen"]) == 100.0 and float(fields["last_used_at"]) == 200.0
    assert (fields["last_client"], fields["last_user_agent"]) == ("10.0.0.2", "late")


async def test_uses_of_unknown_tokens_create_nothing(store: MemoryStore | RedisStore, key_prefix: str) -> None:
    """Tokens of the gateway's issuer without metadata (exchanged access tokens, purged ones) leave no trace."""
    await store.record_uses({"ghost": LastUse(100.0, "10.0.0.1", "ua")})
    assert await store.get_token("ghost") is None
    if isinstance(store, RedisStore):
        assert await store.client.exists(f"{key_prefix}token:ghost") == 0


async def test_a_later_use_from_another_device_replaces_the_last_device(
    upstream: Upstream, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """Through a running gateway, with a short interval: each interval's newest use becomes the last device."""
    async for gw in running(config(upstream, [key_file(tmp_path)], interval="100ms"), tmp_path):
        token, meta = await mint(http, gw, scopes="tools:read")

        async def device(agent: str, gw: RunningGateway = gw, jti: str = meta["jti"]) -> bool:
            _, shown = await admin(http, gw, "GET", f"/admin/tokens/{jti}")
            return shown["last_device"] is not None and shown["last_device"]["user_agent"] == agent

        assert await use(http, gw, token, agent="laptop/1") == 200
        await until(lambda: device("laptop/1"))
        assert await use(http, gw, token, agent="phone/2") == 200
        await until(lambda: device("phone/2"))
        _, shown = await admin(http, gw, "GET", f"/admin/tokens/{meta['jti']}")
        assert shown["first_seen"] < shown["last_seen"]


async def test_recording_is_cheap_on_the_request_path(counting: CountingStore) -> None:
    """record() is synchronous (no await, no I/O): 100,000 calls take well under a second."""
    tracker = UsageTracker(counting, INTERVAL)
    started = time.perf_counter()
    for _ in range(100_000):
        tracker.record("t1", "10.0.0.1", "ua")
    assert time.perf_counter() - started < 1.0
    assert counting.calls == 0, "nothing reached the store from the request path"
    assert not asyncio.iscoroutinefunction(tracker.record)


async def test_a_user_agent_that_is_not_utf8_is_recorded_and_later_uses_still_are(
    upstream: Upstream,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    redis_url: str,
    key_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The listener keeps header bytes that are not UTF-8 as surrogates; Redis takes only UTF-8. They are recorded
    as \\xNN, and the tracker goes on recording (its task died on them, and every later use was lost)."""
    text = config(upstream, [key_file(tmp_path)], redis_url, key_prefix, interval="100ms")
    async for gw in running(text, tmp_path):
        token, meta = await mint(http, gw, scopes="tools:read")
        jti = meta["jti"]

        async def device(agent: str, gw: RunningGateway = gw, jti: str = jti) -> bool:
            _, shown = await admin(http, gw, "GET", f"/admin/tokens/{jti}")
            return shown["last_device"] is not None and shown["last_device"]["user_agent"] == agent

        head = f"GET /tools/x HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\nUser-Agent: evil\xff\r\n"
        status, _, _ = await raw_http_request(gw.ports.proxy_port, head)  # latin-1: the byte 0xff as sent
        assert status == 200
        await until(lambda: device("evil\\xff"))
        assert await use(http, gw, token, agent="laptop/2") == 200
        await until(lambda: device("laptop/2"))
        head = head.replace("evil\xff", "later\xfe")
        status, _, _ = await raw_http_request(gw.ports.proxy_port, head)  # pending when the gateway stops
        assert status == 200
    # The gateway stopped without raising; its final flush wrote the last use.
    store = RedisStore(connect_redis(StoreSettings(redis_url=redis_url)), key_prefix)
    try:
        fields = await store.get_token(jti)
        assert fields is not None and fields["last_user_agent"] == "later\\xfe"
        keys = [k async for k in store.client.scan_iter(f"{key_prefix}*")]
        await store.client.delete(*keys)
    finally:
        await store.close()
    assert not [r for r in caplog.records if r.name == "gateway.usage" and r.levelno >= logging.WARNING]


async def test_an_unforeseen_error_drops_one_batch_and_recording_goes_on(
    store: MemoryStore | RedisStore, caplog: pytest.LogCaptureFixture
) -> None:
    """A use the tracker cannot write for a reason it does not foresee (here a lone surrogate the listener never
    makes) costs that flush's batch, logged at error; the background task lives on and stop() does not raise."""
    await _with_token(store, "t1")
    await _with_token(store, "t2")
    tracker = UsageTracker(store, 0.04)
    tracker.start()
    tracker.record("t1", "10.0.0.1", "bad\ud800")
    tracker.record("t2", "10.0.0.2", "bad\ud800")

    async def dropped() -> bool:
        return tracker.pending == 0

    await until(dropped)
    tracker.record("t1", "10.0.0.1", "good/1")

    async def written() -> bool:
        fields = await store.get_token("t1")
        return fields is not None and fields.get("last_user_agent") == "good/1"

    await until(written)
    tracker.record("t2", "10.0.0.2", "bad\ud800")  # pending at stop: the final flush meets it too
    await tracker.stop()
    errors = [r for r in caplog.records if r.name == "gateway.usage" and r.levelno == logging.ERROR]
    assert errors and all(r.getMessage() == "last-use records dropped: unexpected error" for r in errors)
    fields = await store.get_token("t2")
    assert fields is not None and "last_used_at" not in fields
