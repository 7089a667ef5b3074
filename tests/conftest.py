"""Shared fixtures: keys, a real IdP (JWKS + discovery), a recording upstream, an HTTP client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

import aiohttp
import pytest

from tests.support import IdP, Key, RichUpstream, Upstream, serve_app, serve_app_cancelling

if TYPE_CHECKING:
    from tests.redis_support import PrivateRedis


@pytest.fixture(scope="session")
def rsa_key() -> Key:
    return Key.rsa()


@pytest.fixture(scope="session")
def ec_key() -> Key:
    return Key.ec()


@pytest.fixture(scope="session")
def ed_key() -> Key:
    return Key.ed25519()


@pytest.fixture
async def idp(rsa_key: Key, ec_key: Key, ed_key: Key) -> AsyncIterator[IdP]:
    provider = IdP(keys=[rsa_key, ec_key, ed_key])
    runner, provider.url = await serve_app(provider.app())
    yield provider
    await runner.cleanup()


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    recorder = Upstream()
    runner, recorder.url = await serve_app(recorder.app())
    yield recorder
    await runner.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


@pytest.fixture
async def rich_upstream() -> AsyncIterator[RichUpstream]:
    """The recording upstream with status/bytes/hash/slow/ws routes; handlers are cancelled when clients leave."""
    recorder = RichUpstream()
    runner, recorder.url = await serve_app_cancelling(recorder.app())
    yield recorder
    await runner.cleanup()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """REDIS_URL, else the shared Redis on 127.0.0.1:6379, else a private redis-server; else one clear failure."""
    from tests.redis_support import resolve_url

    try:
        url, private = resolve_url()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield url
    if private is not None:
        private.close()


@pytest.fixture(scope="session")
def redis_cluster_url() -> Iterator[str]:
    """REDIS_CLUSTER_URL, else a private three-node Redis Cluster; else one clear failure."""
    from tests.redis_support import resolve_cluster_url

    try:
        url, private = resolve_cluster_url()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield url
    if private is not None:
        private.close()


@pytest.fixture(params=["redis", "cluster"])
def shared_url(request: pytest.FixtureRequest) -> str:
    """A real Redis, then a real Redis Cluster: what instances share, both ways it can be deployed."""
    return str(request.getfixturevalue("redis_cluster_url" if request.param == "cluster" else "redis_url"))


@pytest.fixture
def key_prefix() -> str:
    """A unique Redis key prefix per test: tests sharing one Redis never see each other's keys. It is a hash tag,
    as Redis Cluster needs (every key of a prefix in one slot), so every test may run against a cluster too."""
    import uuid

    return f"{{test:{uuid.uuid4().hex[:12]}}}:"


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    """A redis-server of this test's own, for tests that stop or break Redis."""
    from tests.redis_support import PrivateRedis

    try:
        server = PrivateRedis()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    server.start()
    yield server
    server.close()
