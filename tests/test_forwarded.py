"""The client's address behind trusted proxies: X-Forwarded-For believed only as far as trusted proxies wrote it."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

import aiohttp
import pytest

from gateway import configfile
from gateway.forwarded import MAX_HOPS, client_address
from tests.support import RichUpstream, open_route_config, start_gateway

LB = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32")]


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "client"),
    [
        ("203.0.113.7", ["198.51.100.1"], "203.0.113.7"),  # not a trusted proxy: its header is its own to forge
        ("10.0.0.9", [], "10.0.0.9"),  # a trusted proxy that says nothing is the client
        ("10.0.0.9", ["203.0.113.7"], "203.0.113.7"),
        ("10.0.0.9", ["198.51.100.1, 203.0.113.7"], "203.0.113.7"),  # left of the first untrusted hop: not believed
        ("10.0.0.9", ["203.0.113.7, 10.0.0.5"], "203.0.113.7"),  # through two trusted proxies
        ("10.0.0.9", ["203.0.113.7", "10.0.0.5"], "203.0.113.7"),  # the header repeated: one list
        ("10.0.0.9", ["10.0.0.1, 10.0.0.2"], "10.0.0.1"),  # every hop trusted: the leftmost
        ("10.0.0.9", ["203.0.113.7, not-an-address"], "10.0.0.9"),  # garbage from the peer: only the peer is sure
        ("10.0.0.9", ["203.0.113.7, , 10.0.0.5"], "10.0.0.5"),  # an empty hop ends what can be believed
        ("10.0.0.9", ["203.0.113.7:443, 10.0.0.5:8080"], "203.0.113.7"),  # ports some proxies add
        ("10.0.0.9", ["[2a00:1450::1]:443"], "2a00:1450::1"),
        ("10.0.0.9", ["[2a00:1450::1"], "2a00:1450::1"),
        ("10.0.0.9", ["203.0.113.7:443:1"], "10.0.0.9"),  # neither an address nor an address with a port
        ("2001:db8::1", ["2001:db8::2, 2a00:1450::1"], "2a00:1450::1"),
        ("2001:db8::1", ["2A00:1450:0::1"], "2a00:1450::1"),  # written as an address is written
        ("::ffff:10.0.0.9", ["::ffff:203.0.113.7"], "203.0.113.7"),  # a dual-stack listener's IPv4 peers
        (None, ["203.0.113.7"], None),
        ("not-an-address", ["203.0.113.7"], "not-an-address"),
    ],
)
def test_client_address(peer: str | None, forwarded_for: list[str], client: str | None) -> None:
    assert client_address(peer, forwarded_for, LB) == client


def test_a_chain_is_believed_for_at_most_max_hops_and_padding_is_not_parsed() -> None:
    trusted_chain = ", ".join(f"10.0.{n // 250}.{n % 250 + 1}" for n in range(MAX_HOPS + 5))
    # 37 trusted hops after the client: the 32 on the right are read, and the leftmost of those is as far as it goes.
    assert client_address("10.0.0.9", [f"203.0.113.7, {trusted_chain}"], LB) == "10.0.0.6"
    padded = "x" * 1_000_000 + ", 203.0.113.7"
    assert client_address("10.0.0.9", [padded], LB) == "203.0.113.7"


def test_without_trusted_proxies_the_peer_is_the_client() -> None:
    assert client_address("10.0.0.9", ["203.0.113.7"], []) == "10.0.0.9"


@pytest.mark.parametrize(
    ("trusted", "client"), [("[127.0.0.1]", "203.0.113.7"), ("[]", "127.0.0.1"), ("[10.0.0.0/8]", "127.0.0.1")]
)
async def test_the_access_log_names_the_client_behind_a_trusted_proxy(
    trusted: str, client: str, rich_upstream: RichUpstream, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    config = open_route_config(rich_upstream.url, f"trusted_proxies: {trusted}", "log: {access: true}")
    sent = {"X-Forwarded-For": "198.51.100.1, 203.0.113.7"}
    async for gw in start_gateway(config, tmp_path):
        async with aiohttp.ClientSession() as http, http.get(f"{gw.url}/who", headers=sent) as resp:
            assert resp.status == 200
    assert [getattr(r, "client", None) for r in caplog.records if r.name == "gateway.access"] == [client]
    # Upstream, the chain is passed on with the direct peer appended, whoever is trusted.
    assert rich_upstream.requests[-1]["headers"]["X-Forwarded-For"] == "198.51.100.1, 203.0.113.7, 127.0.0.1"


def test_an_ipv4_range_written_ipv6_mapped_is_loaded_as_ipv4() -> None:
    """A dual-stack listener's IPv4 peers are compared as IPv4, so a range written ::ffff:a.b.c.d/n must be too."""
    text = """
listen: {trusted_proxies: ["::ffff:10.0.0.0/104", "::ffff:192.0.2.7", "2001:db8::/32", "10.1.0.0/16",
                          "::ffff:198.51.100.9/128", "::ffff:0:0/96"]}
routes:
  - name: r
    match: {path_prefix: /}
    upstream: {url: "http://127.0.0.1:9"}
    auth: {mode: none}
"""
    trusted = configfile.loads(text).listen.trusted_proxies
    assert trusted == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("192.0.2.7/32"),
        ipaddress.ip_network("2001:db8::/32"),
        ipaddress.ip_network("10.1.0.0/16"),
        ipaddress.ip_network("198.51.100.9/32"),
        ipaddress.ip_network("0.0.0.0/0"),  # the whole mapped block: every IPv4 address
    )
    assert client_address("::ffff:203.0.113.50", ["198.51.100.1"], trusted) == "198.51.100.1"  # via 0.0.0.0/0
    trusted = trusted[:4]
    assert client_address("::ffff:10.0.0.9", ["203.0.113.7"], trusted) == "203.0.113.7"
    assert client_address("192.0.2.7", ["203.0.113.7"], trusted) == "203.0.113.7"
    assert client_address("192.0.2.8", ["203.0.113.7"], trusted) == "192.0.2.8"


@pytest.mark.parametrize(
    ("trusted", "warned"),
    [('["0.0.0.0/0", "10.0.0.0/8"]', ["0.0.0.0/0"]), ('["::ffff:0:0/96"]', ["0.0.0.0/0"]), ('["::/0"]', ["::/0"]),
     ('["10.0.0.0/8", "2001:db8::/32"]', [])],
)  # fmt: skip
async def test_a_range_that_trusts_every_address_is_warned_of_at_start(
    trusted: str, warned: list[str], rich_upstream: RichUpstream, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Trusting every address is allowed (a gateway only reachable through its load balancer), but then any client
    chooses the address logged and recorded for it: the operator is told so, once per such range."""
    caplog.set_level(logging.WARNING, logger="gateway.server")
    config = open_route_config(rich_upstream.url, f"trusted_proxies: {trusted}")
    async for _ in start_gateway(config, tmp_path):
        pass
    ranges = [getattr(r, "range", None) for r in caplog.records if "trusts every address" in r.getMessage()]
    assert ranges == warned
