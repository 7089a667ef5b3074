"""Route matching: a unit table for Matcher/RouteTable, then the same rules through a live gateway."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway import errors
from gateway.config import MatchSettings
from gateway.routing import Matcher, RouteTable
from tests.support import RunningGateway, Upstream, raw_http_request, start_gateway


def table(*matches: dict[str, Any]) -> RouteTable[str]:
    """A table whose values are route names r0, r1, ... in the given (file) order."""
    return RouteTable([(Matcher.compile(MatchSettings(**m)), f"r{i}") for i, m in enumerate(matches)])


def matched(rt: RouteTable[str], path: str, method: str = "GET", host: str = "api.example.com") -> str | None:
    try:
        return rt.match(method, host, path)
    except errors.NoRoute:
        return None


# --- paths -------------------------------------------------------------------------------------------------------

EXACT = table({"path": "/health"})
PREFIX = table({"path_prefix": "/orders"})
PREFIX_SLASH = table({"path_prefix": "/orders/"})
ROOT_PREFIX = table({"path_prefix": "/"})
GLOB = table({"path_glob": "/api/*/items"})
GLOB_DEEP = table({"path_glob": "/files/**"})
GLOB_MIDDLE = table({"path_glob": "/a/**/z"})
GLOB_SUFFIX = table({"path_glob": "/docs/*.md"})
GLOB_ANY = table({"path_glob": "/v?/x"})


@pytest.mark.parametrize(
    ("rt", "path", "hit"),
    [
        (EXACT, "/health", True),
        (EXACT, "/health/", True),  # most upstreams serve /health/ as /health: it must not fall through
        (table({"path": "/health/"}), "/health", True),
        (EXACT, "/healthz", False),
        (EXACT, "/HEALTH", False),  # paths are case-sensitive
        (PREFIX, "/orders", True),
        (PREFIX, "/orders/", True),
        (PREFIX, "/orders/1", True),
        (PREFIX, "/orders/1/lines/2", True),
        (PREFIX, "/ordersx", False),
        (PREFIX, "/orders-archive/1", False),
        (PREFIX, "/order", False),
        (PREFIX, "/api/orders", False),
        (PREFIX, "/orders/a\nb", True),  # %0A decoded: still under /orders
        (PREFIX_SLASH, "/orders", True),  # a trailing slash in the config does not change the boundary
        (PREFIX_SLASH, "/orders/9", True),
        (PREFIX_SLASH, "/ordersx", False),
        (ROOT_PREFIX, "/", True),
        (ROOT_PREFIX, "/anything/at/all", True),
        (GLOB, "/api/v1/items", True),
        (GLOB, "/api/items", False),  # * is exactly one segment (here: at least the slash around it)
        (GLOB, "/api/v1/v2/items", False),  # * does not cross a /
        (GLOB, "/api/v1/items/1", False),
        (GLOB_DEEP, "/files/a", True),
        (GLOB_DEEP, "/files/a/b/c.txt", True),
        (GLOB_DEEP, "/files", True),  # like a prefix: the directory itself
        (GLOB_DEEP, "/filesx", False),
        (GLOB_MIDDLE, "/a/z", True),  # ** is zero or more segments
        (GLOB_MIDDLE, "/a/b/z", True),
        (GLOB_MIDDLE, "/a/b/c/d/z", True),
        (GLOB_MIDDLE, "/az", False),
        (GLOB_MIDDLE, "/a/b/zz", False),
        (GLOB_SUFFIX, "/docs/readme.md", True),
        (GLOB_SUFFIX, "/docs/sub/readme.md", False),
        (GLOB_SUFFIX, "/docs/readme.mdx", False),
        (GLOB_ANY, "/v1/x", True),
        (GLOB_ANY, "/v10/x", False),
    ],
)
def test_path_patterns(rt: RouteTable[str], path: str, hit: bool) -> None:
    assert (matched(rt, path) == "r0") is hit


def test_glob_metacharacters_of_regex_are_literal() -> None:
    rt = table({"path_glob": "/a.b/(x)+/*"})
    assert matched(rt, "/a.b/(x)+/1") == "r0"
    assert matched(rt, "/aXb/(x)+/1") is None
    assert matched(rt, "/a.b/xx/1") is None


# --- hosts -------------------------------------------------------------------------------------------------------

HOST = table({"host": "api.example.com", "path_prefix": "/"})
WILDCARD = table({"host": "*.example.com", "path_prefix": "/"})
MIXED_CASE_CONFIG = table({"host": "API.Example.COM", "path_prefix": "/"})


@pytest.mark.parametrize(
    ("rt", "host", "hit"),
    [
        (HOST, "api.example.com", True),
        (HOST, "api.example.com:8443", True),  # the port is stripped
        (HOST, "API.EXAMPLE.COM", True),  # hosts compare case-insensitively
        (HOST, "Api.Example.Com:80", True),
        (HOST, "api.example.com.", True),  # the absolute (trailing-dot) form is the same name
        (HOST, "api.example.com.:8443", True),
        (HOST, "api.example.com..", False),
        (HOST, "api.example.org", False),
        (HOST, "xapi.example.com", False),
        (HOST, "api.example.com.evil.net", False),
        (HOST, "api-example.com", False),  # the dot is literal
        (HOST, "", False),
        (WILDCARD, "a.example.com", True),
        (WILDCARD, "a.b.example.com", True),
        (WILDCARD, "A.EXAMPLE.com:9000", True),
        (WILDCARD, "a.example.com.", True),
        (WILDCARD, "example.com", False),  # the wildcard needs at least one label
        (WILDCARD, ".example.com", False),
        (WILDCARD, "evilexample.com", False),
        (WILDCARD, "a.example.com.evil.net", False),
        (MIXED_CASE_CONFIG, "api.example.com", True),
    ],
)
def test_host_patterns(rt: RouteTable[str], host: str, hit: bool) -> None:
    assert (matched(rt, "/x", host=host) == "r0") is hit


def test_ipv6_host_with_port() -> None:
    rt = table({"host": "[::1]", "path_prefix": "/"})
    assert matched(rt, "/", host="[::1]:8080") == "r0"
    assert matched(rt, "/", host="[::1]") == "r0"
    assert matched(rt, "/", host="[::2]:8080") is None


def test_no_host_in_config_matches_any_host() -> None:
    rt = table({"path_prefix": "/"})
    for host in ("a.example.com", "10.0.0.1:80", "", "[::1]:1"):
        assert matched(rt, "/", host=host) == "r0"


# --- methods and order -------------------------------------------------------------------------------------------


def test_methods() -> None:
    rt = table({"path_prefix": "/orders", "methods": ["GET", "POST"]})
    assert matched(rt, "/orders", "GET") == "r0"
    assert matched(rt, "/orders", "POST") == "r0"
    assert matched(rt, "/orders", "DELETE") is None
    assert matched(rt, "/orders", "HEAD") == "r0", "HEAD is GET without a body: a GET route covers it"
    assert matched(table({"path_prefix": "/orders", "methods": ["POST"]}), "/orders", "HEAD") is None
    assert matched(table({"path_prefix": "/"}), "/", "PATCH") == "r0"  # no methods: any


def test_first_match_in_file_order_wins() -> None:
    rt = table(
        {"path_prefix": "/orders", "methods": ["POST"]},
        {"path": "/orders/special"},
        {"path_prefix": "/orders"},
        {"path_prefix": "/"},
    )
    assert matched(rt, "/orders/special", "POST") == "r0"  # earlier and broader beats later and exact
    assert matched(rt, "/orders/special", "GET") == "r1"
    assert matched(rt, "/orders/1", "GET") == "r2"
    assert matched(rt, "/elsewhere", "GET") == "r3"


def test_host_and_path_must_both_match() -> None:
    rt = table(
        {"host": "admin.example.com", "path_prefix": "/"},
        {"host": "*.example.com", "path_prefix": "/public"},
    )
    assert matched(rt, "/x", host="admin.example.com") == "r0"
    assert matched(rt, "/public/1", host="www.example.com") == "r1"
    assert matched(rt, "/private", host="www.example.com") is None


def test_no_match_raises_no_route() -> None:
    with pytest.raises(errors.NoRoute) as info:
        table({"path": "/a"}).match("GET", "h", "/b")
    assert info.value.status == 404
    assert info.value.body()["error"] == "not_found"


# --- dot segments ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["/public/../admin", "/a/./b", "/..", "/.", "/public/..", "/a/b/../../c", "/./a"],
)
def test_dot_segments_are_refused(path: str) -> None:
    rt = table({"path_prefix": "/"})
    with pytest.raises(errors.InvalidRequest) as info:
        rt.match("GET", "h", path)
    assert info.value.status == 400


@pytest.mark.parametrize("path", ["//admin", "/v//x", "/a/b//", "//"])
def test_empty_segments_are_refused(path: str) -> None:
    # nginx merges slashes: //admin would miss an /admin route, fall through to a later one, and reach /admin.
    with pytest.raises(errors.InvalidRequest, match="empty segment"):
        table({"path_prefix": "/"}).match("GET", "h", path)


@pytest.mark.parametrize(("path", "hit"), [("/admin;jsessionid=1", True), ("/admin;x/y", True), ("/adminx", False)])
def test_semicolon_ends_a_prefix_segment(path: str, hit: bool) -> None:
    # Servlet containers strip ;parameters: /admin;x is /admin to them, so the /admin route must judge it.
    assert (matched(table({"path_prefix": "/admin"}), path) == "r0") is hit


@pytest.mark.parametrize(
    ("match", "path"),
    [
        ({"path": "/admin"}, "/admin;jsessionid=1"),
        ({"path": "/admin"}, "/admin;"),
        ({"path_glob": "/api/*/reports/**"}, "/api/v1/reports;x/x"),
        ({"path_glob": "/api/*/reports/**"}, "/api/v1;x/reports"),
        ({"path_glob": "/files/**"}, "/files;x/a"),
        ({"path_glob": "/docs/*.md"}, "/docs/a.md;v=2"),
    ],
)
def test_path_parameters_do_not_skip_exact_or_glob_routes(match: dict[str, Any], path: str) -> None:
    """With a catch-all after it, a protected exact or glob route that missed /admin;x let the request through the
    catch-all, to an upstream that reads it as /admin."""
    assert matched(table(match, {"path_prefix": "/"}), path) == "r0"


def test_a_dot_segment_hidden_by_a_parameter_is_refused() -> None:
    # Tomcat reads /public/..;/admin as /admin.
    with pytest.raises(errors.InvalidRequest):
        table({"path_prefix": "/"}).match("GET", "h", "/public/..;/admin")


@pytest.mark.parametrize("path", ["/a/.well-known/x", "/a/..b", "/a/b..", "/a/...", "/.hidden", "/v1.2/x"])
def test_dots_inside_a_segment_are_fine(path: str) -> None:
    assert matched(table({"path_prefix": "/"}), path) == "r0"


def test_dot_segments_refused_before_matching() -> None:
    # Even when no route would match: an invalid path is 400, not 404.
    with pytest.raises(errors.InvalidRequest):
        table({"path": "/x"}).match("GET", "h", "/nothing/../x")


# --- through a live gateway --------------------------------------------------------------------------------------


@pytest.fixture
async def gw(upstream: Upstream, tmp_path: Path) -> AsyncIterator[RunningGateway]:
    config = f"""
routes:
  - name: public
    match: {{path_prefix: /public}}
    upstream: {{url: "{upstream.url}"}}
    auth: {{mode: none}}
  - name: by-host
    match: {{host: "*.tenant.test", path_glob: /t/*/info}}
    upstream: {{url: "{upstream.url}"}}
    auth: {{mode: none}}
"""
    async for running in start_gateway(config, tmp_path):
        yield running


async def test_live_no_match_is_404_json(gw: RunningGateway, upstream: Upstream, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{gw.url}/nowhere") as resp:
        assert resp.status == 404
        assert resp.content_type == "application/json"
        body = await resp.json()
    assert body["error"] == "not_found"
    assert isinstance(body["error_description"], str) and body["error_description"]
    assert upstream.requests == []
    assert gw.metric("gateway_http_requests_total", route="unmatched", method="GET", code="404") == 1


async def test_live_prefix_boundary(gw: RunningGateway, upstream: Upstream, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{gw.url}/public/a") as resp:
        assert resp.status == 200
    async with http.get(f"{gw.url}/publicity") as resp:
        assert resp.status == 404
    assert [r["path"] for r in upstream.requests] == ["/public/a"]


async def test_live_host_routing(gw: RunningGateway, upstream: Upstream, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{gw.url}/t/7/info", headers={"Host": "Shop.Tenant.Test:8080"}) as resp:
        assert resp.status == 200
    async with http.get(f"{gw.url}/t/7/info", headers={"Host": "tenant.test"}) as resp:
        assert resp.status == 404
    assert [r["path"] for r in upstream.requests] == ["/t/7/info"]


@pytest.mark.parametrize(
    "target", ["/public/%2e%2e/admin", "/public/%2E%2E/admin", "/public/../admin", "/public/./x", "/public/%2e/x"]
)
async def test_live_dot_segments_refused_400(gw: RunningGateway, upstream: Upstream, target: str) -> None:
    # Sent raw: a client library would normalise the path before it leaves.
    status, headers, body = await raw_http_request(gw.ports.proxy_port, f"GET {target} HTTP/1.1\r\nHost: x\r\n")
    assert status == 400
    assert b'"invalid_request"' in body
    assert upstream.requests == []
