"""Config loading: typed values, ${ENV} interpolation, durations, and errors that name file and path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from gateway import configfile, signing
from gateway.config import Settings, parse_duration

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "gateway.example.yaml"
MINIMAL = """
issuers:
  - name: corp
    issuer: https://idp.test/
    jwks_uri: https://idp.test/jwks
    audiences: [api]
routes:
  - name: r
    match: {path_prefix: /}
    upstream: {url: "http://127.0.0.1:9"}
    auth: {mode: jwt, issuers: [corp]}
"""


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("30s", 30),
        ("15m", 900),
        ("1h", 3600),
        ("365d", 365 * 86400),
        (" 2s ", 2),
        (7, 7),
        ("1.5s", 1.5),
        ("30", 30),  # a bare number is seconds, written as a string too: ${TIMEOUT:-30}
    ],
)
def test_durations(text: Any, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5 sec", "-1s", "1w", "s", True, -3, None, "\uff11s", "\u0663s"])
def test_bad_durations_are_refused(text: Any) -> None:
    with pytest.raises(ValueError, match="duration|negative"):
        parse_duration(text)


def test_minimal_config_gets_documented_defaults() -> None:
    settings = configfile.loads(MINIMAL)
    assert settings.listen.port == 8080
    assert settings.admin.host == "127.0.0.1"
    assert settings.issuers[0].leeway == 30.0
    assert settings.routes[0].auth.revocation == "long_lived"
    assert settings.routes[0].auth.max_token_bytes == 8192
    with pytest.raises(Exception, match="frozen"):
        settings.listen.port = 1  # type: ignore[misc]


def test_env_interpolation_with_defaults() -> None:
    text = (
        MINIMAL.replace("https://idp.test/jwks", "${JWKS:-https://fallback/jwks}").replace("port: 8080", "")
        + "store: {redis_url: '${REDIS:-}', key_prefix: '${PREFIX}'}\n"
    )
    settings = configfile.loads(text, env={"PREFIX": "t1:"})
    assert settings.issuers[0].jwks_uri == "https://fallback/jwks"
    assert settings.store.redis_url == ""
    assert settings.store.key_prefix == "t1:"
    settings = configfile.loads(text, env={"PREFIX": "t2:", "JWKS": "https://env/jwks"})
    assert settings.issuers[0].jwks_uri == "https://env/jwks"


ERROR_CASES = [
    # (replace this, with this) in MINIMAL -> a problem that contains this text
    (("issuers: [corp]", "issuers: [corp, nope]"), "routes[0].auth.issuers[1]: unknown issuer 'nope' (known: corp)"),
    (("audiences: [api]", "audiences: [api]\n    leeway: soon"), "issuers[0].leeway: expected a duration"),
    # Found at load, not by each worker as it starts (and is restarted, over and over)
    (("issuers:\n", 'store: {redis_url: "redis://:pw@h:x/0"}\nissuers:\n'), "store.redis_url: Port could not be cast"),
    (("issuers:\n", 'store: {redis_url: "redis+sentinel://h:26379"}\nissuers:\n'), "must name the service"),
    # Redis Cluster: MULTIs and scripts span keys, which a cluster allows only within one slot
    (
        ("issuers:\n", 'store: {redis_url: "redis+cluster://h:7000"}\nissuers:\n'),
        "store.key_prefix: with Redis Cluster",
    ),
    (("issuers:\n", 'store: {redis_url: "redis+cluster://h", key_prefix: "{}:"}\nissuers:\n'), "must hold a hash tag"),
    (
        ("issuers:\n", 'store: {redis_url: "redis+cluster://h:7000/2", key_prefix: "{gw}:"}\nissuers:\n'),
        "store.redis_url: a redis+cluster:// URL names only nodes",
    ),
    (
        ("issuers:\n", 'store: {redis_url: "redis+cluster://:pw@h:7000,h:x", key_prefix: "{gw}:"}\nissuers:\n'),
        "store.redis_url: a Redis URL lists a node as host or host:port",
    ),
    (("audiences: [api]", "audiences: [api]\n    leeway: 10m"), "issuers[0].leeway: Input should be less than"),
    (("audiences: [api]", "audiences: [api]\n    leeway: .nan"), "issuers[0].leeway: expected a duration"),
    (("audiences: [api]", "audiences: [api]\n    long_lived_after: .inf"), "a duration of more than 100 years"),
    (("audiences: [api]", "audiences: [api]\n    long_lived_after: 36501d"), "a duration of more than 100 years"),
    (("mode: jwt", "mode: jwtt"), "routes[0].auth.mode: Input should be"),
    (("match: {path_prefix: /}", "match: {path_prefix: /, verb: GET}"), "routes[0].match.verb: unknown field"),
    (("match: {path_prefix: /}", "match: {methods: [GET]}"), "routes[0].match: exactly one of path"),
    (
        ("jwks_uri: https://idp.test/jwks", "discovery: true\n    jwks_uri: https://idp.test/jwks"),
        "issuers[0]: exactly one",
    ),
    (('url: "http://127.0.0.1:9"', 'url: "ftp://x"'), "routes[0].upstream: url must be http"),
    (("audiences: [api]", "audiences: [api]\n    algorithms: [none]"), "issuers[0].algorithms[0]: Input should be"),
    (("audiences: [api]", "audiences: [api]\n    algorithms: [HS256]"), "HS256 needs hmac_secret_env"),
    (("auth: {mode: jwt, issuers: [corp]}", "auth: {mode: jwt}"), "routes[0].auth.issuers: mode jwt needs"),
    (("auth: {mode: jwt, issuers: [corp]}", "auth: {mode: introspect}"), "needs an introspection endpoint"),
    (("jwks_uri: https://idp.test/jwks", "jwks_uri: ${MISSING_VAR}"), "issuers[0].jwks_uri: environment variable"),
    (("audiences: [api]", "audiences: []"), "issuers[0].audiences: needs at least 1 entry"),
    (("issuers:\n", "listen: {idle_timeout: 0s}\nissuers:\n"), "listen.idle_timeout: Input should be greater than 0"),
    (("issuers:\n", "listen: {send_timeout: 0s}\nissuers:\n"), "listen.send_timeout: Input should be greater than 0"),
    # A zero interval or timeout is a busy loop (resync_interval, max_staleness) or a route that always fails
    (("issuers:\n", "store: {resync_interval: 0s}\nissuers:\n"), "store.resync_interval: Input should be greater"),
    (("issuers:\n", "store: {max_staleness: 0ms}\nissuers:\n"), "store.max_staleness: Input should be greater"),
    (
        ('url: "http://127.0.0.1:9"', 'url: "http://127.0.0.1:9", timeout: 0s'),
        "upstream.timeout: Input should be greater",
    ),
    (("audiences: [api]", "audiences: [api]\n    jwks_refresh_interval: 0s"), "jwks_refresh_interval: Input should"),
    # YAML that says two things, or could never be what was meant
    (
        ("    auth: {mode: jwt, issuers: [corp]}", "    auth: {mode: jwt, issuers: [corp]}\n    auth: {mode: none}"),
        "line 12, column 5: not valid YAML (the key 'auth' is given twice in one mapping)",
    ),
    (
        ("issuer: https://idp.test/", "issuer: ${A:-${B:-https://idp.test/}}"),
        "issuers[0].issuer: a default may not hold",
    ),
    (('url: "http://127.0.0.1:9"', 'url: "http://127.0.0.1:99999"'), "routes[0].upstream: url: the port must be"),
    (("name: r\n", "name: unmatched\n"), "routes[0].name: 'unmatched' is the metric and log label"),
    (("issuers: [corp]}", "issuers: [corp], required_scopes: ['a b']}"), "routes[0].auth.required_scopes[0]: String"),
    (("issuers: [corp]}", "issuers: [corp], required_scopes: ['x\"y']}"), "routes[0].auth.required_scopes[0]: String"),
    (("match: {path_prefix: /}", "match: {path_prefix: /, host: 'api.example.com:8443'}"), "routes[0].match.host"),
    (("match: {path_prefix: /}", "match: {path_prefix: /, host: 'api.*.com'}"), "routes[0].match.host"),
    (("match: {path_prefix: /}", "match: {path_prefix: /, host: '::1'}"), "routes[0].match.host"),
    (("issuers: [corp]}", "issuers: [corp], token: {source: header, name: Bad Header}}"), "name must be a token"),
    (("issuers: [corp]}", "issuers: [corp], token: {source: cookie, name: 'a;b'}}"), "name must be a token"),
    (("issuers:\n", "introspection:\nissuers:\n"), "introspection: empty: give its entries, or remove it"),
    (("match: {path_prefix: /}", "match: {path_prefix: /, methods: [CONNECT]}"), "routes[0].match.methods[0]: Input"),
    (
        ("issuers: [corp]}", "issuers: [corp], token: {source: header, name: Authorization}}"),
        "use source: authorization",
    ),
    # A WebSocket message is held whole: "no limit" would let one frame claim all of the gateway's memory.
    (
        ('url: "http://127.0.0.1:9"', 'url: "http://127.0.0.1:9", websocket_max_message_bytes: 0'),
        "routes[0].upstream.websocket_max_message_bytes: Input should be greater than or equal to 1",
    ),
    (
        ('url: "http://127.0.0.1:9"', 'url: "http://127.0.0.1:9", websocket_max_message_bytes: 268435457'),
        "routes[0].upstream.websocket_max_message_bytes: Input should be less than or equal to 268435456",
    ),
    # An identity header cannot frame the request, be hop-by-hop or stand in for what the gateway sets itself, and
    # two spellings of one name would both be sent (forwarded headers are not de-duplicated).
    *[
        (
            (
                "    auth: {mode: jwt, issuers: [corp]}",
                f"    auth: {{mode: jwt, issuers: [corp]}}\n    forward: {forward}",
            ),
            f"routes[0].forward.identity_headers: {message}",
        )
        for forward, message in [
            ("{identity_headers: {Host: sub}}", "Host is framing, hop-by-hop or set by the gateway itself"),
            ("{identity_headers: {content-length: sub}}", "content-length is framing"),
            ("{identity_headers: {Transfer-Encoding: sub}}", "Transfer-Encoding is framing"),
            ("{identity_headers: {X-Forwarded-For: sub}}", "X-Forwarded-For is framing"),
            ("{identity_headers: {Connection: sub}}", "Connection is framing"),
            ("{identity_headers: {HOST: sub}}", "HOST is framing"),
            ("{identity_headers: {Expect: sub}}", "Expect is framing"),
            ("{identity_headers: {X-Forwarded-Proto: sub}}", "X-Forwarded-Proto is framing"),
            ("{identity_headers: {x-forwarded-host: sub}}", "x-forwarded-host is framing"),
            ("{identity_headers: {Keep-Alive: sub}}", "Keep-Alive is framing"),
            ("{identity_headers: {Upgrade: sub}}", "Upgrade is framing"),
            (
                "{identity_headers: {X-Sub: sub, x-sub: email}}",
                "x-sub appears twice (header names are case-insensitive)",
            ),
        ]
    ],
    (
        ("    auth: {mode: jwt, issuers: [corp]}", "    auth: {mode: none, required_scopes: [x]}"),
        "mode none checks no token",
    ),
]


def test_a_config_that_expands_or_nests_without_end_is_a_clean_error(tmp_path: Path) -> None:
    """A 500-byte file of nested YAML aliases took 17 s and 500 MB before it was refused; deep nesting and bytes that
    are not UTF-8 gave tracebacks."""
    laughs = "a: &a [x,x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(7)
    )
    for text, expected in [
        (laughs, "(top level): more than 100,000 values once YAML aliases are expanded"),
        ("a: " + "{b: " * 500 + "1" + "}" * 500 + "\n", "(top level): nested too deeply"),
        ("a: " + "[" * 5000 + "]" * 5000 + "\n", "(top level): nested too deeply"),
    ]:
        with pytest.raises(configfile.ConfigError) as caught:
            configfile.loads(text, env={})
        assert caught.value.problems == [expected]
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(MINIMAL.replace("corp", "corp\xe9").encode("latin-1"))
    with pytest.raises(configfile.ConfigError) as caught:
        configfile.load(latin1)
    assert caught.value.problems == [f"not UTF-8 text (byte {MINIMAL.index('corp') + 4})"]


def test_a_literal_dollar_brace_is_written_doubled() -> None:
    text = MINIMAL.replace('url: "http://127.0.0.1:9"', 'url: "http://127.0.0.1:9/$${X}/${Y:-y}"')
    assert configfile.loads(text, env={}).routes[0].upstream.url == "http://127.0.0.1:9/${X}/y"


def test_a_host_written_with_a_trailing_dot_still_matches() -> None:
    from gateway.routing import Matcher

    settings = configfile.loads(MINIMAL.replace("match: {path_prefix: /}", "match: {path_prefix: /, host: API.x.com.}"))
    assert Matcher.compile(settings.routes[0].match).matches("GET", "api.x.com", "/")


def test_a_cluster_url_names_its_seed_nodes_and_credentials() -> None:
    """Parsed, not contacted: the client learns the slots from the first node that answers."""
    from redis.asyncio.cluster import RedisCluster

    from gateway.config import StoreSettings
    from gateway.store import connect_redis, display_url

    url = "rediss+cluster://ops:p%40ss@10.0.0.1:7000,[fd00::2]:7001,redis-2"
    client = connect_redis(StoreSettings(redis_url=url, key_prefix="{gw}:"))
    assert isinstance(client, RedisCluster)
    seeds = [(node.host, node.port) for node in client.nodes_manager.startup_nodes.values()]
    assert seeds == [("10.0.0.1", 7000), ("fd00::2", 7001), ("redis-2", 6379)]
    kwargs = client.nodes_manager.connection_kwargs
    assert (kwargs["username"], kwargs["password"]) == ("ops", "p@ss")
    assert kwargs["connection_class"].__name__ == "SSLConnection", "rediss+cluster:// is TLS"
    assert display_url(url) == "rediss+cluster://10.0.0.1:7000,[fd00::2]:7001,redis-2"
    with pytest.raises(configfile.ConfigError) as caught:
        configfile.loads(MINIMAL + 'store: {redis_url: "redis+cluster://:s3cret@h:70000", key_prefix: "{gw}:"}\n')
    assert "s3cret" not in str(caught.value) and "host or host:port" in str(caught.value)
    for bad in ("redis+cluster://::1", "redis+cluster://h:7\u00b2"):  # IPv6 without brackets; a superscript digit
        with pytest.raises(configfile.ConfigError, match="host or host:port"):
            configfile.loads(MINIMAL + f'store: {{redis_url: "{bad}", key_prefix: "{{gw}}:"}}\n')


@pytest.mark.parametrize(("change", "expected"), ERROR_CASES)
def test_errors_name_the_path_and_what_was_expected(change: tuple[str, str], expected: str) -> None:
    text = MINIMAL.replace(*change)
    with pytest.raises(configfile.ConfigError) as caught:
        configfile.loads(text, source="gw.yaml", env={})
    assert any(expected in problem for problem in caught.value.problems), caught.value.problems
    assert str(caught.value).startswith("gw.yaml: ")


def test_a_broken_route_is_reported_once_and_no_routes_still_is() -> None:
    """The only route failing is one problem, not also "routes: ... at least 1 item" (pydantic counts only the items
    that validated); a config with no route at all is still told it needs one."""
    with pytest.raises(configfile.ConfigError) as caught:
        configfile.loads(MINIMAL.replace("auth: {mode: jwt", "auth: {mode: jwt, scopes: 5"), env={})
    assert caught.value.problems == ["routes[0].auth.scopes: unknown field (check the spelling)"]
    with pytest.raises(configfile.ConfigError) as caught:
        configfile.loads(MINIMAL.split("routes:")[0] + "routes: []\n", env={})
    assert caught.value.problems == ["routes: needs at least 1 entry"]


def test_duplicate_names_and_reserved_issuer_name(tmp_path: Path) -> None:
    key = tmp_path / "k.pem"
    signing.write_private_key(signing.generate(), str(key))
    text = MINIMAL.replace("- name: corp", "- name: gateway").replace("issuers: [corp]", "issuers: [gateway]")
    text += "  - name: r\n    match: {path: /x}\n    upstream: {url: 'http://127.0.0.1:9'}\n    auth: {mode: none}\n"
    text += f"tokens: {{issuer: https://gw/, signing_key_file: {key}}}\n"
    with pytest.raises(configfile.ConfigError) as caught:
        configfile.loads(text)
    problems = "\n".join(caught.value.problems)
    assert "the name 'gateway' is reserved" in problems
    assert "routes[1].name: 'r' is used twice" in problems


def test_yaml_syntax_error_names_line() -> None:
    with pytest.raises(configfile.ConfigError, match=r"line \d+, column \d+: not valid YAML"):
        configfile.loads("routes: [\n  {name: x\n", source="bad.yaml")


def test_relative_key_paths_are_read_from_the_config_directory(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    signing.write_private_key(signing.generate(), str(tmp_path / "keys" / "signing.pem"))
    (tmp_path / "gw.yaml").write_text(
        "tokens: {issuer: https://gw/, signing_key_file: keys/signing.pem}\n"
        "routes: [{name: r, match: {path: /}, upstream: {url: 'http://127.0.0.1:9'}, auth: {issuers: [gateway]}}]\n"
    )
    settings = configfile.load(tmp_path / "gw.yaml")
    assert settings.tokens is not None
    assert settings.tokens.key_files == (str(tmp_path / "keys" / "signing.pem"),)


def _example_copy(tmp_path: Path) -> Path:
    """The example config next to generated key files it names, so it can load as written."""
    shutil.copy(EXAMPLE, tmp_path / "gateway.yaml")
    (tmp_path / "keys").mkdir()
    signing.write_private_key(signing.generate(), str(tmp_path / "keys" / "signing.pem"))
    public = signing.load_private_key(str(tmp_path / "keys" / "signing.pem")).private.public_key()
    from cryptography.hazmat.primitives import serialization

    (tmp_path / "keys" / "partners.pub.pem").write_bytes(
        public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return tmp_path / "gateway.yaml"


def test_example_config_is_valid_and_documents_every_field(tmp_path: Path) -> None:
    settings = configfile.load(_example_copy(tmp_path), env={})
    assert [r.name for r in settings.routes] == ["orders", "public"]
    text = EXAMPLE.read_text()
    missing = [name for name in _field_names(Settings) if f"{name}:" not in text]
    assert missing == [], f"fields not shown in {EXAMPLE.name}: {missing}"


def _field_names(model: type[BaseModel]) -> set[str]:
    names: set[str] = set()
    for name, info in model.model_fields.items():
        names.add(name)
        for arg in _model_types(info.annotation):
            names |= _field_names(arg)
    return names


def _model_types(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [t for arg in getattr(annotation, "__args__", ()) for t in _model_types(arg)]


def test_committed_json_schema_is_generated_from_the_models() -> None:
    committed = json.loads((ROOT / "config" / "gateway.schema.json").read_text())
    assert committed == Settings.model_json_schema(), "config/gateway.schema.json is stale: run `make schema`"


def test_check_config_cli(tmp_path: Path) -> None:
    good = _example_copy(tmp_path)
    env = {**os.environ, "LEGACY_HMAC_SECRET": "x" * 32, "INTROSPECTION_SECRET": "s3cret"}
    ok = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", str(good)], capture_output=True, text=True, env=env
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count("\n") == 1 and "OK — 2 routes, 3 issuers" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(MINIMAL.replace("issuers: [corp]", "issuers: [corp, ghost]"))
    failed = subprocess.run([sys.executable, "-m", "gateway", "check-config", str(bad)], capture_output=True, text=True)
    assert failed.returncode == 1
    assert f"{bad}: routes[0].auth.issuers[1]: unknown issuer 'ghost'" in failed.stderr
    short = tmp_path / "short-secret.yaml"
    short.write_text(good.read_text())
    weak = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", str(short)],
        capture_output=True, text=True, env={**env, "LEGACY_HMAC_SECRET": "short"},
    )  # fmt: skip
    assert weak.returncode == 1 and "LEGACY_HMAC_SECRET must hold a secret of 32+ bytes" in weak.stderr


def test_hmac_secret_must_be_as_long_as_the_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    """RFC 7518 §3.2: "A key of the same size as the hash output ... or larger MUST be used"."""
    from gateway.checks import compile_check

    text = MINIMAL.replace("jwks_uri: https://idp.test/jwks", "hmac_secret_env: GW_TEST_HMAC").replace(
        "audiences: [api]", "audiences: [api]\n    algorithms: [HS256, HS512]"
    )
    settings = configfile.loads(text)
    monkeypatch.setenv("GW_TEST_HMAC", "k" * 48)
    assert compile_check(settings) == "issuer corp: GW_TEST_HMAC must hold a secret of 64+ bytes"
    monkeypatch.setenv("GW_TEST_HMAC", "k" * 64)
    assert compile_check(settings) is None


def test_a_static_key_no_configured_algorithm_fits_is_refused(tmp_path: Path) -> None:
    """An RSA key under algorithms [ES256] passed check-config, and then every token was refused."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from gateway.checks import compile_check

    pem = tmp_path / "rsa.pub.pem"
    public = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    pem.write_bytes(public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    keyed = MINIMAL.replace("jwks_uri: https://idp.test/jwks", f"keys: [{{pem_file: {pem}}}]")
    settings = configfile.loads(keyed.replace("audiences: [api]", "audiences: [api]\n    algorithms: [ES256]"))
    assert (
        compile_check(settings)
        == f"issuer corp: {pem} fits PS256, PS384, PS512, RS256, RS384, RS512, none of its algorithms (ES256)"
    )
    assert (
        compile_check(
            configfile.loads(keyed.replace("audiences: [api]", "audiences: [api]\n    algorithms: [RS256, ES256]"))
        )
        is None
    )


def test_check_config_refuses_a_route_accepting_two_issuers_of_one_url(tmp_path: Path) -> None:
    """Two issuers may share a URL (an audience per API), but one route cannot accept both: iss cannot tell them
    apart. The gateway's own issuer counts too."""
    billing = "  - {name: billing, issuer: https://idp.test/, jwks_uri: https://idp.test/jwks, audiences: [bill]}\n"
    two = MINIMAL.replace("routes:", billing + "routes:")
    ok, bad = tmp_path / "ok.yaml", tmp_path / "bad.yaml"
    ok.write_text(two.replace("issuers: [corp]", "issuers: [billing]"))
    bad.write_text(two.replace("issuers: [corp]", "issuers: [corp, billing]"))
    passed = subprocess.run([sys.executable, "-m", "gateway", "check-config", str(ok)], capture_output=True, text=True)
    assert passed.returncode == 0, passed.stderr
    failed = subprocess.run([sys.executable, "-m", "gateway", "check-config", str(bad)], capture_output=True, text=True)
    assert failed.returncode == 1
    assert (
        f"{bad}: routes[0].auth.issuers[1]: 'billing' has the same issuer URL as 'corp' (https://idp.test/); "
        "a route accepts one issuer per URL (give one issuer both audiences)"
    ) in failed.stderr
    key = tmp_path / "k.pem"
    signing.write_private_key(signing.generate(), str(key))
    own = MINIMAL.replace("issuers: [corp]", "issuers: [corp, gateway]")
    with pytest.raises(configfile.ConfigError) as caught:
        configfile.loads(own + f"tokens: {{issuer: https://idp.test/, signing_key_file: {key}}}\n")
    assert caught.value.problems == [
        "routes[0].auth.issuers[1]: 'gateway' has the same issuer URL as 'corp' (https://idp.test/); "
        "a route accepts one issuer per URL (give one issuer both audiences)"
    ]
