"""The whole path once: a JWT route behind a real IdP and upstream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.support import AUDIENCE, ISSUER, IdP, Key, RunningGateway, Upstream, start_gateway


@pytest.fixture
async def gw(idp: IdP, upstream: Upstream, tmp_path: Path) -> AsyncIterator[RunningGateway]:
    config = f"""
issuers:
  - name: corp
    issuer: {ISSUER}
    jwks_uri: {idp.url}/jwks
    audiences: [{AUDIENCE}]
    algorithms: [RS256, ES256, EdDSA]
routes:
  - name: orders
    match: {{path_prefix: /orders}}
    upstream: {{url: "{upstream.url}"}}
    auth: {{mode: jwt, issuers: [corp], required_scopes: [orders:read]}}
    forward: {{identity_headers: {{X-Auth-Subject: sub}}}}
"""
    async for running in start_gateway(config, tmp_path):
        yield running


async def test_valid_token_reaches_upstream_with_identity(
    gw: RunningGateway, upstream: Upstream, rsa_key: Key, http: aiohttp.ClientSession
) -> None:
    token = rsa_key.sign()
    async with http.get(f"{gw.url}/orders/1", headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 200
    seen = upstream.requests[-1]
    assert seen["path"] == "/orders/1"
    assert seen["headers"]["X-Auth-Subject"] == "alice"
    assert "Authorization" not in seen["headers"]
    assert gw.metric("gateway_auth_decisions_total", route="orders", outcome="allow", reason="ok") == 1
