"""A route's rules for an already-verified identity: required scopes (all of) and required claim values."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway import errors
from gateway.identity import Identity


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    required_scopes: frozenset[str]
    required_claims: tuple[tuple[str, str | int | bool], ...]
    scope_list: tuple[str, ...]  # in config order, for the WWW-Authenticate scope parameter

    @classmethod
    def build(cls, scopes: tuple[str, ...], claims: Mapping[str, str | int | bool]) -> RoutePolicy:
        return cls(frozenset(scopes), tuple(claims.items()), scopes)

    def check(self, identity: Identity) -> None:
        """Raise InsufficientScope (403) or Forbidden (403) when the identity falls short."""
        if not self.required_scopes <= identity.scopes:
            raise errors.InsufficientScope(self.scope_list)
        for name, expected in self.required_claims:
            value = identity.claims.get(name)
            if not _same(value, expected) and not (isinstance(value, list) and any(_same(v, expected) for v in value)):
                raise errors.Forbidden()


def _same(value: Any, expected: str | int | bool) -> bool:
    """Equal as JSON values: Python has True == 1 == 1.0; JSON keeps its booleans apart from its one number type."""
    return bool(value == expected) and isinstance(value, bool) is isinstance(expected, bool)
