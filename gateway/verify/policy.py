"""A route's rules for an already-verified identity: required scopes (all of) and required claim values."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway import errors
from gateway.identity import Identity


class JsonValue:
    """A required boolean or number, equal only to a claim of the same JSON type: Python has True == 1 == 1.0, JSON
    has a boolean apart from its one number type (so 1 and 1.0 stay equal). Strings need no wrapper: == is exact.
    Wrapped once at config load, so the check itself, on every request, is unchanged."""

    __slots__ = ("value",)

    def __init__(self, value: int | float | bool) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return other == self.value and (type(other) is bool) is (type(self.value) is bool)

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = None  # type: ignore[assignment]  # equal to values of other hashes

    def __repr__(self) -> str:
        return repr(self.value)


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    required_scopes: frozenset[str]
    required_claims: tuple[tuple[str, Any], ...]  # values: strings, or JsonValue
    scope_list: tuple[str, ...]  # in config order, for the WWW-Authenticate scope parameter

    @classmethod
    def build(cls, scopes: tuple[str, ...], claims: Mapping[str, str | int | bool]) -> RoutePolicy:
        required = tuple(
            (name, value if isinstance(value, str) else JsonValue(value)) for name, value in claims.items()
        )
        return cls(frozenset(scopes), required, scopes)

    def check(self, identity: Identity) -> None:
        """Raise InsufficientScope (403) or Forbidden (403) when the identity falls short."""
        if not self.required_scopes <= identity.scopes:
            raise errors.InsufficientScope(self.scope_list)
        for name, expected in self.required_claims:
            value = identity.claims.get(name)
            if value != expected and not (isinstance(value, list) and expected in value):
                raise errors.Forbidden()
