"""Shared fixtures: keys, a real IdP (JWKS + discovery), a recording upstream, an HTTP client."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.support import IdP, Key, Upstream, serve_app


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
