"""Who the client is when the gateway sits behind load balancers: `listen.trusted_proxies` names them.

A request from a trusted proxy carries the client's address in X-Forwarded-For, each proxy appending the address it
saw. Read from the right, every hop a trusted proxy wrote is believed; the first address that is not a trusted
proxy's is the client (what nginx's real_ip_recursive does). A request from anyone else is its own client, whatever
X-Forwarded-For it sends: the header is the client's to forge. The address is for logs and last-use records;
the X-Forwarded-For sent upstream still ends with the direct peer (proxy.py).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def client_address(peer: str | None, forwarded_for: Sequence[str], trusted: Sequence[Network]) -> str | None:
    """The client's address: `peer` unless it is a trusted proxy, then the X-Forwarded-For hop it vouches for."""
    if not trusted or not _trusted(peer, trusted):
        return peer
    client = peer
    hops = [hop.strip() for value in forwarded_for for hop in value.split(",")]
    for hop in reversed(hops):
        address = _address(hop)
        if address is None:
            return client  # not an address: the trusted hop to its right is as far as the chain can be believed
        client = str(address)
        if not any(address in network for network in trusted):
            return client
    return client  # every hop a trusted proxy: the leftmost is as near the client as the chain goes


def _trusted(peer: str | None, trusted: Sequence[Network]) -> bool:
    address = _address(peer) if peer is not None else None
    return address is not None and any(address in network for network in trusted)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address, an IPv4 one written IPv6-mapped (a dual-stack listener's peers) taken as IPv4."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
