"""Who the client is when the gateway sits behind load balancers: `listen.trusted_proxies` names them.

A request from a trusted proxy carries the client's address in X-Forwarded-For, each proxy appending the address it
saw. Read from the right, every hop a trusted proxy wrote is believed; the first address that is not a trusted
proxy's is the client (what nginx's real_ip_recursive does). A request from anyone else is its own client, whatever
X-Forwarded-For it sends: the header is the client's to forge. The address is for logs and last-use records;
the X-Forwarded-For sent upstream still ends with the direct peer (proxy.py).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_HOPS = 32  # proxies believed in a row, at most: a chain is short, and a client may pad the header


def client_address(peer: str | None, forwarded_for: Sequence[str], trusted: Sequence[Network]) -> str | None:
    """The client's address: `peer` unless it is a trusted proxy, then the X-Forwarded-For hop it vouches for."""
    if not trusted or not is_trusted(peer, trusted):
        return peer
    client = peer
    for hop in _hops_from_the_right(forwarded_for):
        address = _address(hop)
        if address is None:
            return client  # not an address: the trusted hop to its right is as far as the chain can be believed
        client = str(address)
        if not any(address in network for network in trusted):
            return client
    return client  # every hop trusted (or MAX_HOPS of them): the leftmost seen is as near the client as it goes


def _hops_from_the_right(forwarded_for: Sequence[str]) -> Iterator[str]:
    """At most MAX_HOPS hops, right to left, without splitting the rest of a header a client may have padded."""
    left = MAX_HOPS
    for value in reversed(forwarded_for):
        for hop in reversed(value.rsplit(",", left)):
            if left == 0:
                return
            left -= 1
            yield hop.strip()


def is_trusted(peer: str | None, trusted: Sequence[Network]) -> bool:
    address = _address(peer) if peer is not None else None
    return address is not None and any(address in network for network in trusted)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address, with the port some proxies add (`192.0.2.1:443`, `[2001:db8::1]:443`) dropped, and an IPv4 one
    written IPv6-mapped (a dual-stack listener's peers) taken as IPv4."""
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
