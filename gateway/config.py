"""Configuration models: the YAML format of DESIGN.md as typed, immutable objects.

Each field documents its meaning and default here; `gateway schema` turns these models into the JSON Schema in
config/, and config/gateway.example.yaml shows every field. Loading (YAML, ${ENV} interpolation, error paths,
cross-references) lives in `configfile.py`.
"""

from __future__ import annotations

import ipaddress
import math
import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
MAX_DURATION = 100 * 365 * 86400.0  # longer is a typo; and NaN or Infinity would slip through every comparison


def parse_duration(value: Any) -> float:
    """'500ms', '30s', '15m', '1h', '365d' (or a bare number of seconds) -> seconds as float."""
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool) and value == value:  # NaN != NaN
        if value < 0:
            raise ValueError("a duration cannot be negative")
        seconds = float(value) if value <= MAX_DURATION else math.inf  # a huge int would overflow float()
    elif isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            # A bare number is seconds, as a YAML number is: "30" from ${TIMEOUT:-30} must not be refused.
            seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2) or "s"]
    if seconds is None:
        raise ValueError(f"expected a duration such as 500ms, 30s, 15m, 1h or 365d, got {value!r}")
    if seconds > MAX_DURATION:
        raise ValueError("a duration of more than 100 years")
    return seconds


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": _DURATION.pattern},
                {"type": "number", "minimum": 0},
            ],
            "description": "A duration: 500ms, 30s, 15m, 1h, 365d (or seconds as a number).",
        }
    ),
]


_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def _unmapped(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """An IPv4 range written IPv6-mapped (::ffff:10.0.0.0/104) as the IPv4 range it is: peers are compared as IPv4."""
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_IPV4_MAPPED):
        address = network.network_address.ipv4_mapped
        assert address is not None  # noqa: S101 - inside ::ffff:0:0/96
        return ipaddress.IPv4Network((address, network.prefixlen - 96))
    return network


Network = Annotated[IPvAnyNetwork, AfterValidator(_unmapped)]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
HeaderName = Annotated[str, Field(pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")]
Algorithm = Literal["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"]
HmacAlgorithm = Literal["HS256", "HS384", "HS512"]
Method = Literal[
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"
]  # CONNECT: the listener opens no tunnel


class Model(BaseModel):
    """Base: immutable, unknown keys are errors (a typo never silently falls back to a default)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class ListenSettings(Model):
    host: str = Field("0.0.0.0", description="Address of the proxy listener.")  # noqa: S104 - a proxy listens wide
    port: int = Field(8080, ge=0, le=65535, description="Port of the proxy listener (0: any free port).")
    drain_timeout: Duration = Field(20.0, description="On SIGTERM, how long in-flight requests may finish.")
    idle_timeout: Duration = Field(
        75.0,
        gt=0,
        description="Close a client connection with no request under way after this long (this also bounds the "
        "time a request head may take to arrive).",
    )
    send_timeout: Duration = Field(
        60.0,
        gt=0,
        description="Abort a client connection that has stopped reading: its answer could not be sent on for this "
        "long, and the client took none of what was waiting meanwhile.",
    )
    max_header_bytes: int = Field(
        16384,
        ge=1024,
        description="Largest request line or header line accepted (larger: 431); a whole head may be 8× this.",
    )
    trusted_proxies: tuple[Network, ...] = Field(
        (),
        description="Load balancers in front of the gateway (addresses or CIDR ranges): from them, the client's "
        "address for logs and last-use records is read from X-Forwarded-For.",
    )


class AdminSettings(Model):
    host: str = Field("127.0.0.1", description="Address of the admin listener (/metrics, /healthz, /admin).")
    port: int = Field(9090, ge=0, le=65535, description="Port of the admin listener (0: any free port).")
    token_env: str = Field(
        "GATEWAY_ADMIN_TOKEN", description="Environment variable holding the admin API bearer token."
    )


class LogSettings(Model):
    level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    access: bool = Field(True, description="One JSON access-log line per request.")


class StoreSettings(Model):
    redis_url: str = Field(
        "",
        description="Redis URL (redis://, rediss://, unix://, redis+sentinel://, redis+cluster://). Empty: in-process "
        "memory store.",
    )
    key_prefix: str = Field(
        "gw:",
        description="Prefix of every Redis key; isolates deployments sharing a Redis. With Redis Cluster it must hold "
        'a hash tag, e.g. "{gw}:", so that every key lands in one slot.',
        validate_default=True,  # the default has none: refused with a cluster URL
    )
    max_staleness: Duration = Field(
        5.0, gt=0, description="How old the revocation mirror may get before on_unavailable applies."
    )
    resync_interval: Duration = Field(30.0, gt=0, description="Full re-sync of the revocation mirror, this often.")

    @field_validator("redis_url")
    @classmethod
    def _usable(cls, url: str) -> str:
        """Parsed as the store will parse it (nothing is contacted): a bad URL is a config error, not a worker that
        dies at start and is restarted over and over."""
        if url:
            from gateway.store import connect_redis  # store imports this module

            # ValueError, with no part of the URL in it; the prefix is checked on its own field, below
            connect_redis(cls.model_construct(redis_url=url, key_prefix="{gw}:"))
        return url

    @field_validator("key_prefix")
    @classmethod
    def _one_slot(cls, prefix: str, info: ValidationInfo) -> str:
        from gateway.store import check_cluster_prefix

        check_cluster_prefix(info.data.get("redis_url", ""), prefix)
        return prefix


class StaticKey(Model):
    pem_file: str = Field(description="Path of a PEM public key (or certificate) that verifies this issuer.")
    kid: str | None = Field(None, description="Key ID to match the token's `kid` header; none: any token.")


class IssuerSettings(Model):
    name: Name = Field(description="Name routes use to refer to this issuer; also the metric label.")
    issuer: str = Field(description="Exact `iss` value of its tokens.")
    jwks_uri: str | None = Field(None, description="URL of the issuer's JWKS.")
    discovery: bool = Field(False, description="Find jwks_uri via {issuer}/.well-known/openid-configuration.")
    keys: tuple[StaticKey, ...] = Field((), description="Static public keys instead of a JWKS.")
    hmac_secret_env: str | None = Field(
        None,
        description="Environment variable with a shared HMAC secret (HS* algorithms only, explicit opt-in).",
    )
    audiences: tuple[str, ...] = Field(description="The token's `aud` must contain one of these.", min_length=1)
    algorithms: tuple[Algorithm | HmacAlgorithm, ...] = Field(
        ("RS256", "ES256"), description="Allowed `alg` values; `none` is never accepted.", min_length=1
    )
    leeway: Duration = Field(
        30.0,
        le=300,  # a revocation outlives its token's exp by 300 s (token_records.REVOCATION_MARGIN)
        description="Clock skew allowed on exp, nbf and iat (at most 5m).",
    )
    require_typ: str | None = Field(None, description="Required `typ` header, e.g. at+jwt (RFC 9068).")
    max_lifetime: Duration | None = Field(None, description="Refuse tokens whose exp - iat exceeds this.")
    long_lived_after: Duration = Field(
        3600.0, description="Tokens whose exp - iat exceeds this are long-lived (revocation-checked)."
    )
    jwks_refresh_interval: Duration = Field(
        300.0, gt=0, description="Refetch the JWKS this often (Cache-Control may shorten)."
    )
    jwks_min_refresh_interval: Duration = Field(
        15.0, description="Cool-down: at most one fetch per this interval (also for unknown kid refetches)."
    )
    jwks_timeout: Duration = Field(5.0, gt=0, description="Timeout of one JWKS or discovery fetch.")

    @model_validator(mode="after")
    def _one_key_source(self) -> IssuerSettings:
        sources = [bool(self.jwks_uri), self.discovery, bool(self.keys), bool(self.hmac_secret_env)]
        if sum(sources) != 1:
            raise ValueError("exactly one of jwks_uri, discovery, keys or hmac_secret_env is required")
        hmac_algs = [a for a in self.algorithms if a.startswith("HS")]
        if self.hmac_secret_env and len(hmac_algs) != len(self.algorithms):
            raise ValueError("an issuer with hmac_secret_env may only allow HS256, HS384 or HS512")
        if not self.hmac_secret_env and hmac_algs:
            raise ValueError(f"{hmac_algs[0]} needs hmac_secret_env; public keys never verify HMAC tokens")
        return self


class IntrospectionSettings(Model):
    name: Name = Field(description="Name routes use to refer to this endpoint; also the metric label.")
    endpoint: str = Field(description="URL of the RFC 7662 introspection endpoint.")
    client_id: str | None = Field(None, description="Client ID for client_secret_basic / client_secret_post.")
    client_secret_env: str | None = Field(None, description="Environment variable holding the client secret.")
    client_secret_file: str | None = Field(None, description="File holding the client secret.")
    auth_method: Literal["client_secret_basic", "client_secret_post", "bearer"] = Field(
        "client_secret_basic", description="How the gateway authenticates to the endpoint."
    )
    issuer: str | None = Field(None, description="If set, an answer's `iss` must equal it.")
    audiences: tuple[str, ...] = Field((), description="If set, an answer's `aud` must contain one of these.")
    cache_ttl: Duration = Field(60.0, description="Cache positive answers this long (never past the token's exp).")
    negative_cache_ttl: Duration = Field(0.0, description="Cache negative answers this long (0: off).")
    timeout: Duration = Field(2.0, gt=0, description="Timeout of one introspection call.")
    max_concurrency: int = Field(64, ge=1, description="Concurrent calls to this endpoint at most.")
    breaker_failures: int = Field(5, ge=1, description="Consecutive failures that open the circuit breaker.")
    breaker_reset: Duration = Field(10.0, gt=0, description="How long the breaker stays open before one trial call.")
    shared_cache: bool = Field(False, description="Also cache answers in Redis, shared by every instance.")


class TokensSettings(Model):
    issuer: str = Field(description="`iss` of tokens minted by the gateway; the gateway trusts it itself.")
    signing_key_file: str | None = Field(None, description="PEM private key that signs minted tokens.")
    signing_key_files: tuple[str, ...] = Field(
        (), description="Several keys for rotation: the first signs, all verify."
    )
    audiences: tuple[str, ...] = Field(("gateway",), description="Audiences accepted on the gateway's own tokens.")
    default_lifetime: Duration = Field(90 * 86400.0, gt=0, description="Lifetime of a minted token when none is asked.")
    max_lifetime: Duration = Field(365 * 86400.0, gt=0, description="Longest lifetime that may be minted.")
    access_token_lifetime: Duration = Field(900.0, gt=0, description="Lifetime of access tokens from a refresh key.")
    last_use_interval: Duration = Field(60.0, gt=0, description="At most one last-use write per token per interval.")

    @model_validator(mode="after")
    def _one_key(self) -> TokensSettings:
        if bool(self.signing_key_file) == bool(self.signing_key_files):
            raise ValueError("exactly one of signing_key_file or signing_key_files is required")
        return self

    @property
    def key_files(self) -> tuple[str, ...]:
        return (self.signing_key_file,) if self.signing_key_file else self.signing_key_files


class MatchSettings(Model):
    host: str | None = Field(
        None,
        pattern=r"^(\*\.)?[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?$|^\[[0-9A-Fa-f:.]+\]$",
        description="Host to match (exact, or *.example.com; an IPv6 address in brackets; no port); none: any host.",
    )
    path: str | None = Field(None, description="Exact path.")
    path_prefix: str | None = Field(None, description="Path prefix, on segment boundaries: /a matches /a/b, not /ab.")
    path_glob: str | None = Field(None, description="Glob: * within one segment, ** across segments.")
    methods: tuple[Method, ...] = Field((), description="Methods to match; none: any method.")

    @model_validator(mode="after")
    def _one_path(self) -> MatchSettings:
        given = [p for p in (self.path, self.path_prefix, self.path_glob) if p is not None]
        if len(given) != 1:
            raise ValueError("exactly one of path, path_prefix or path_glob is required")
        if not given[0].startswith("/"):
            raise ValueError("a path pattern must start with /")
        return self


class UpstreamSettings(Model):
    url: str = Field(description="Base URL of the upstream, e.g. http://127.0.0.1:8000 or http://svc/base.")
    timeout: Duration = Field(30.0, gt=0, description="Total time for the upstream to answer (headers); 504 after.")
    connect_timeout: Duration = Field(5.0, gt=0, description="Time to connect to the upstream; 502 after.")
    idle_timeout: Duration = Field(
        60.0,
        gt=0,
        description="Longest silence while a body streams: between two pieces of the answer's body (then 504, or the "
        "answer cut short once begun), and while sending a request body, for the client's next chunk (408) or the "
        "upstream taking it (504). An SSE stream must send something (a comment) this often.",
    )
    strip_prefix: str | None = Field(None, description="Remove this prefix from the path before forwarding.")
    preserve_host: bool = Field(False, description="Send the client's Host header instead of the upstream's.")
    websocket_max_message_bytes: int = Field(
        4 * 1024 * 1024,
        ge=1,
        le=256 * 1024 * 1024,
        description="Largest WebSocket message relayed, either way (a message is held whole in memory, so there is "
        "always a limit). A larger one is refused by its frame header, unread (a compressed one once inflated past "
        "the limit): its sender gets 1009 (or a reset, if still sending), the other side 1001 (upstream) or 1014 "
        "(client).",
    )

    @model_validator(mode="after")
    def _http_url(self) -> UpstreamSettings:
        if not re.match(r"^https?://[^/?#]+(/[^?#]*)?$", self.url):
            raise ValueError("url must be http:// or https:// with a host, and no query or fragment")
        try:
            urlsplit(self.url).port  # noqa: B018 - raises on a port that is not a number in range
        except ValueError:
            raise ValueError("url: the port must be a number from 0 to 65535") from None
        return self


class TokenLocation(Model):
    source: Literal["authorization", "header", "cookie", "query"] = Field(
        "authorization",
        description="Where the token is: Authorization: Bearer, a named header, cookie or query.",
    )
    name: str | None = Field(None, description="Header, cookie or query parameter name (not for authorization).")

    @model_validator(mode="after")
    def _named(self) -> TokenLocation:
        if (self.source == "authorization") == (self.name is not None):
            raise ValueError("name is required for header, cookie and query, and not allowed for authorization")
        if self.name is not None and not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", self.name):
            raise ValueError("name must be a token (RFC 9110 §5.6.2): no spaces, separators or control characters")
        if self.source == "header" and self.name is not None and self.name.lower() in ("authorization", "host"):
            raise ValueError(f"a {self.name} header is not a named-header source (use source: authorization)")
        return self


class AuthSettings(Model):
    mode: Literal["none", "jwt", "introspect", "jwt_or_introspect"] = Field(
        "jwt", description="How the token is judged."
    )
    issuers: tuple[Name, ...] = Field((), description="Issuers (by name) whose JWTs this route accepts.")
    introspection: Name | None = Field(None, description="Introspection endpoint (by name) for this route.")
    token: TokenLocation = Field(default_factory=TokenLocation, description="Where the token is found.")
    required_scopes: tuple[Annotated[str, Field(pattern=r"^[\x21\x23-\x5B\x5D-\x7E]+$")], ...] = Field(
        (), description="Scopes the token must all carry; else 403 (each an RFC 6749 scope-token: no spaces)."
    )
    required_claims: dict[str, str | int | bool] = Field(
        default_factory=dict, description="Claims that must equal these values; else 403."
    )
    revocation: Literal["long_lived", "always", "never"] = Field(
        "long_lived", description="Which tokens are checked against the revocation set."
    )
    on_unavailable: Literal["fail_closed", "fail_open"] = Field(
        "fail_closed", description="When a dependency to consult is down: 503 (closed) or let through (open)."
    )
    max_token_bytes: int = Field(8192, ge=64, description="Longer tokens are refused before parsing.")


HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
     "trailer", "transfer-encoding", "upgrade"}
)  # fmt: skip
# Headers the gateway frames or sets itself on the way upstream: an identity header may not take their name.
GATEWAY_SET_HEADERS = HOP_BY_HOP | {
    "host", "content-length", "expect", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"
}  # fmt: skip


def _not_unmatched(name: str) -> str:
    if name == "unmatched":
        raise ValueError("'unmatched' is the metric and log label of requests no route matched; pick another name")
    return name


def _identity_header_names(headers: dict[str, str]) -> dict[str, str]:
    seen: set[str] = set()
    for name in headers:
        lower = name.lower()
        if lower in GATEWAY_SET_HEADERS:
            raise ValueError(f"{name} is framing, hop-by-hop or set by the gateway itself; pick another header name")
        if lower in seen:
            raise ValueError(f"{name} appears twice (header names are case-insensitive)")
        seen.add(lower)
    return headers


class ForwardSettings(Model):
    identity_headers: Annotated[dict[HeaderName, str], AfterValidator(_identity_header_names)] = Field(
        default_factory=dict,
        description="Header -> claim; list claims are joined with spaces. Not a framing, hop-by-hop or X-Forwarded-* "
        "header, nor Host, and each name once (case-insensitively).",
    )
    remove_credential: bool = Field(True, description="Do not pass the token itself to the upstream.")


class RouteSettings(Model):
    name: Annotated[Name, AfterValidator(_not_unmatched)] = Field(description="Route name; also the metric label.")
    match: MatchSettings
    upstream: UpstreamSettings
    auth: AuthSettings = Field(default_factory=AuthSettings)
    forward: ForwardSettings = Field(default_factory=ForwardSettings)


class CacheSettings(Model):
    verified_tokens: int = Field(10000, ge=0, description="Entries in the verified-token cache (0: off).")


class Settings(Model):
    listen: ListenSettings = Field(default_factory=ListenSettings)
    admin: AdminSettings = Field(default_factory=AdminSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    issuers: tuple[IssuerSettings, ...] = ()
    introspection: tuple[IntrospectionSettings, ...] = ()
    tokens: TokensSettings | None = None
    routes: tuple[RouteSettings, ...] = Field(min_length=1)


GATEWAY_ISSUER_NAME = "gateway"
"""Name under which the gateway's own token issuer (`tokens:`) is available to routes."""
