"""Match a request to a route: host, exact path / prefix / glob, and method; first match in file order wins."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from gateway import errors
from gateway.config import MatchSettings

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Matcher:
    host: re.Pattern[str] | None
    path: re.Pattern[str]
    methods: frozenset[str]

    @classmethod
    def compile(cls, match: MatchSettings) -> Matcher:
        methods = set(match.methods)
        if "GET" in methods:
            # HEAD is GET without the body (RFC 9110 §9.3.2), and upstreams answer it so: a GET-only route that let
            # HEAD fall through to a later, more open one would show that route's headers without a token.
            methods.add("HEAD")
        return cls(
            host=_host_pattern(match.host) if match.host else None,
            path=_path_pattern(match),
            methods=frozenset(methods),
        )

    def matches(self, method: str, host: str, path: str) -> bool:
        if self.methods and method not in self.methods:
            return False
        if self.host is not None and not self.host.fullmatch(host):
            return False
        return self.path.fullmatch(path) is not None


class RouteTable(Generic[T]):
    """Routes in file order; `match` returns the first whose matcher accepts the request."""

    def __init__(self, entries: Sequence[tuple[Matcher, T]]) -> None:
        self._entries = tuple(entries)

    def match(self, method: str, host: str, path: str) -> T:
        """Raise InvalidRequest for a path the upstream could read differently, NoRoute when nothing matches."""
        if ";" in path:
            path = without_parameters(path)
        if "/." in path and any(seg in (".", "..") for seg in path.split("/")):
            # Matching /public/../admin against /public would let the upstream resolve it to /admin.
            raise errors.InvalidRequest("the path contains . or .. segments")
        if "//" in path:
            # nginx and others merge slashes: //admin must not miss an /admin route and fall through to another.
            raise errors.InvalidRequest("the path contains an empty segment (//)")
        host = _bare_host(host)
        for matcher, value in self._entries:
            if matcher.matches(method, host, path):
                return value
        raise errors.NoRoute()


def without_parameters(path: str) -> str:
    """`path` without its segments' parameters (`/admin;jsessionid=1/x` -> `/admin/x`), as servlet containers and
    Spring read it before routing: matched with them, `/admin;x` missed an exact `/admin` route and fell through to a
    later, more open one, and `/public/..;/admin` hid a `..` segment."""
    return "/".join(segment.partition(";")[0] for segment in path.split("/"))


def _bare_host(host: str) -> str:
    host = host.lower()
    if host.startswith("["):  # [::1]:8080
        return host[: host.find("]") + 1]
    host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    # "admin.example.com." is the same name as "admin.example.com" (and upstreams treat it so): without this, the
    # trailing dot skipped a host-restricted route and fell through to a later, perhaps more open, one.
    return host.removesuffix(".")


def _host_pattern(host: str) -> re.Pattern[str]:
    host = host.lower().removesuffix(".")  # as the request's host is read: _bare_host
    if host.startswith("*."):
        return re.compile(r"[^.]+(?:\.[^.]+)*" + re.escape(host[1:]))
    return re.compile(re.escape(host))


def _path_pattern(match: MatchSettings) -> re.Pattern[str]:
    # DOTALL: the path is matched decoded, and %0A decodes to a newline that `.` must still cover
    # (without it /orders/a%0Ab fell through to a later route, or to 404).
    if match.path is not None:
        # With or without a trailing slash: most upstreams serve /admin/ as /admin, so an exact /admin route that
        # missed /admin/ let it fall through to a later, more open route.
        exact = match.path.rstrip("/")
        return re.compile(re.escape(exact) + "/?" if exact else "/", re.DOTALL)
    if match.path_prefix is not None:
        prefix = match.path_prefix.rstrip("/")
        # Segment boundary: /orders matches /orders and /orders/1, not /ordersx. (Path parameters, /orders;x, are
        # gone before matching: RouteTable.match.)
        return re.compile(re.escape(prefix) + r"(?:/.*)?" if prefix else r"/.*", re.DOTALL)
    assert match.path_glob is not None  # noqa: S101 - guaranteed by MatchSettings validation
    return re.compile(_glob_to_regex(match.path_glob), re.DOTALL)


def _glob_to_regex(glob: str) -> str:
    out = []
    i = 0
    while i < len(glob):
        if glob.startswith("/**/", i):
            # Zero or more whole segments: /a/**/z matches /a/z as well as /a/x/y/z (as in gitignore and Ant).
            out.append("(?:/.*)?/")
            i += 4
        elif glob.startswith("/**", i) and i + 3 == len(glob):
            # A trailing /** covers the directory itself too, like a prefix: /files/** matches /files.
            out.append("(?:/.*)?")
            i += 3
        elif glob.startswith("**", i):
            out.append(".*")
            i += 2
        elif glob[i] == "*":
            out.append("[^/]*")
            i += 1
        elif glob[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(glob[i]))
            i += 1
    return "".join(out)
