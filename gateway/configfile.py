"""Load a YAML config file into `Settings`: interpolate ${ENV}, validate, resolve every cross-reference.

Every error names the file, the path inside it (`routes[2].auth.issuers[0]`) and what was expected.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from gateway.config import GATEWAY_ISSUER_NAME, Settings

# ${NAME} or ${NAME:-default}; $${ is a literal ${ (as docker compose reads $$).
_ENV_REF = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
MAX_VALUES = 100_000  # a config has hundreds; YAML aliases can make a small file expand to billions
# Fields holding file paths: relative ones are read relative to the config file, not the working directory.
_PATH_FIELDS = {"pem_file", "signing_key_file", "client_secret_file"}
_PATH_LIST_FIELDS = {"signing_key_files"}


class ConfigError(Exception):
    """The config file is invalid; `problems` lists each as 'path: what was expected'."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


def load(path: str | Path, env: Mapping[str, str] | None = None) -> Settings:
    """Read, interpolate and validate the config file at `path`."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read the file: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), [f"not UTF-8 text (byte {exc.start})"]) from None
    return loads(text, source=str(path), base_dir=path.parent, env=env)


def loads(
    text: str, source: str = "<config>", base_dir: Path | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Validate config text; `base_dir` anchors relative file paths."""
    try:
        raw = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(source, [f"{where}not valid YAML ({getattr(exc, 'problem', exc)})"]) from None
    except RecursionError:
        raise ConfigError(source, ["(top level): nested too deeply"]) from None
    if not isinstance(raw, dict):
        raise ConfigError(source, ["(top level): expected a mapping of sections (listen, issuers, routes, ...)"])
    problems: list[str] = []
    try:
        data = _interpolate(raw, "", os.environ if env is None else env, problems, [MAX_VALUES])
    except _TooLarge:
        raise ConfigError(
            source, [f"(top level): more than {MAX_VALUES:,} values once YAML aliases are expanded"]
        ) from None
    except RecursionError:
        raise ConfigError(source, ["(top level): nested too deeply"]) from None
    if base_dir is not None:
        _anchor_paths(data, base_dir)
    if problems:
        raise ConfigError(source, problems)
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, [_describe(err) for err in _causes(exc.errors())]) from None
    problems = list(cross_reference_problems(settings))
    if problems:
        raise ConfigError(source, problems)
    return settings


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping: PyYAML keeps the last, silently, so a second
    `auth:` written lower down a route replaced the first (an open route where a closed one was meant)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str | int | float | bool):
                continue  # unhashable keys are refused by the base class
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


class _TooLarge(Exception):
    pass


def _interpolate(node: Any, path: str, env: Mapping[str, str], problems: list[str], budget: list[int]) -> Any:
    """A copy of `node` with ${ENV} references replaced. `budget` counts the values copied: aliases are copied
    each time they are used (a 500-byte file of nested aliases expanded to billions)."""
    budget[0] -= 1
    if budget[0] < 0:
        raise _TooLarge()
    if isinstance(node, dict):
        return {k: _interpolate(v, _join(path, str(k)), env, problems, budget) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, f"{path}[{i}]", env, problems, budget) for i, v in enumerate(node)]
    if not isinstance(node, str) or "${" not in node:
        return node

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name is None:
            return "${"  # $${
        if default is not None and "${" in default:
            problems.append(f"{path}: a default may not hold another ${{...}} (write $${{ for a literal ${{)")
            return ""
        if name in env and (env[name] or default is None):
            return env[name]
        if default is not None:
            return default
        problems.append(f"{path}: environment variable {name} is not set (use ${{{name}:-default}} for a default)")
        return ""

    return _ENV_REF.sub(substitute, node)


def _anchor_paths(node: Any, base_dir: Path) -> None:
    if isinstance(node, list):
        for item in node:
            _anchor_paths(item, base_dir)
    elif isinstance(node, dict):
        for key, value in node.items():
            if key in _PATH_FIELDS and isinstance(value, str) and value:
                node[key] = str(base_dir / value)
            elif key in _PATH_LIST_FIELDS and isinstance(value, list):
                node[key] = [str(base_dir / v) if isinstance(v, str) else v for v in value]
            else:
                _anchor_paths(value, base_dir)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _causes(errors: list[Any]) -> list[Any]:
    """The errors less a list's "too short" when its items failed: pydantic counts only the items that validated,
    so one broken route in `routes` also reported "routes: Tuple should have at least 1 item"."""

    def inside(outer: tuple[Any, ...], error: Any) -> bool:
        return len(error["loc"]) > len(outer) and error["loc"][: len(outer)] == outer

    return [e for e in errors if not (e["type"] == "too_short" and any(inside(e["loc"], o) for o in errors))]


def _describe(error: Any) -> str:
    path = ""
    for part in error["loc"]:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not str(part).startswith(("function-", "tagged-union", "literal[")):
            path = _join(path, str(part))
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown field (check the spelling)"
    elif error["type"] == "missing":
        message = "required field is missing"
    elif error["type"] in ("tuple_type", "list_type", "model_type", "dict_type") and error.get("input") is None:
        # `issuers:` with every entry commented out is null in YAML
        message = "empty: give its entries, or remove it (or write [] / {})"
    elif error["type"] == "too_short":  # pydantic says "Tuple should have at least 1 item after validation, not 0"
        least = error["ctx"]["min_length"]
        message = f"needs at least {least} {'entry' if least == 1 else 'entries'}"
    return f"{path or '(top level)'}: {message}"


def cross_reference_problems(settings: Settings) -> Iterator[str]:
    """Names that point nowhere, duplicates, and files that do not exist."""
    issuer_names = {i.name for i in settings.issuers}
    issuer_urls = {i.name: i.issuer for i in settings.issuers}
    introspection_names = {i.name for i in settings.introspection}
    if GATEWAY_ISSUER_NAME in introspection_names:
        # Identities carry the issuer or endpoint name; "gateway" must always mean a token the gateway minted.
        yield f"introspection: the name '{GATEWAY_ISSUER_NAME}' is reserved for the gateway's own issuer"
    if settings.tokens is not None:
        if GATEWAY_ISSUER_NAME in issuer_names:
            yield f"issuers: the name '{GATEWAY_ISSUER_NAME}' is reserved for the gateway's own issuer (tokens:)"
        issuer_names.add(GATEWAY_ISSUER_NAME)
        issuer_urls[GATEWAY_ISSUER_NAME] = settings.tokens.issuer
    for section, names in (
        ("issuers", [i.name for i in settings.issuers]),
        ("introspection", [i.name for i in settings.introspection]),
        ("routes", [r.name for r in settings.routes]),
    ):
        seen: set[str] = set()
        for index, name in enumerate(names):
            if name in seen:
                yield f"{section}[{index}].name: '{name}' is used twice; names must be unique"
            seen.add(name)
    for index, route in enumerate(settings.routes):
        where = f"routes[{index}].auth"
        auth = route.auth
        by_url: dict[str, str] = {}
        for i, name in enumerate(auth.issuers):
            if name not in issuer_names:
                yield f"{where}.issuers[{i}]: unknown issuer '{name}' (known: {_known(issuer_names)})"
            elif issuer_urls[name] in by_url and by_url[issuer_urls[name]] != name:
                # A token's iss could not tell them apart; one issuer may list several audiences instead.
                yield (
                    f"{where}.issuers[{i}]: '{name}' has the same issuer URL as '{by_url[issuer_urls[name]]}' "
                    f"({issuer_urls[name]}); a route accepts one issuer per URL (give one issuer both audiences)"
                )
            else:
                by_url[issuer_urls[name]] = name
        if auth.introspection is not None and auth.introspection not in introspection_names:
            yield (
                f"{where}.introspection: unknown introspection endpoint '{auth.introspection}' "
                f"(known: {_known(introspection_names)})"
            )
        if auth.mode in ("jwt", "jwt_or_introspect") and not auth.issuers:
            yield f"{where}.issuers: mode {auth.mode} needs at least one issuer"
        if auth.mode in ("introspect", "jwt_or_introspect") and auth.introspection is None:
            yield f"{where}.introspection: mode {auth.mode} needs an introspection endpoint"
        if auth.mode == "none" and (auth.issuers or auth.required_scopes or auth.required_claims):
            yield f"{where}: mode none checks no token; remove issuers, required_scopes and required_claims"
        if auth.mode == "none" and route.forward.identity_headers:
            yield f"routes[{index}].forward.identity_headers: mode none has no identity to forward"
    for index, issuer in enumerate(settings.issuers):
        for k, key in enumerate(issuer.keys):
            if not os.path.isfile(key.pem_file):
                yield f"issuers[{index}].keys[{k}].pem_file: no such file {key.pem_file}"
    if settings.tokens is not None:
        for k, key_file in enumerate(settings.tokens.key_files):
            if not os.path.isfile(key_file):
                field = "signing_key_file" if settings.tokens.signing_key_file else f"signing_key_files[{k}]"
                yield f"tokens.{field}: no such file {key_file} (create one with: gateway keys generate --out FILE)"


def _known(names: set[str]) -> str:
    return ", ".join(sorted(names)) or "none configured"
