"""The composition root: compile Settings into runtime objects once, and handle requests with them.

`Gateway` is one compiled config (routes, verifiers, key caches); a SIGHUP builds a new one and swaps it in
whole, so a request sees either the old config or the new, never a mix. `Runtime` holds what outlives a reload:
the HTTP client session, metrics, background tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from gateway import bearer, errors, proxy, websocket
from gateway import upstream as upstream_client
from gateway.config import (
    GATEWAY_ISSUER_NAME,
    IssuerSettings,
    RouteSettings,
    Settings,
    StaticKey,
    TokenLocation,
)
from gateway.forwarded import Network, client_address, is_trusted
from gateway.identity import Identity
from gateway.listener import Request, RequestView
from gateway.metrics import Metrics, RouteMetrics
from gateway.oauth import serve_public
from gateway.revocation import Mirror, RevocationCheck
from gateway.routing import Matcher, RouteTable
from gateway.signing import Signer
from gateway.store import MemoryStore, RedisStore, RevocationStore, Store, connect_redis
from gateway.token_records import ACCESS_TYP, PUBLIC_PATHS
from gateway.tokens import TokenService
from gateway.usage import UsageTracker
from gateway.verify import Judge
from gateway.verify.cache import TokenCache
from gateway.verify.introspection import Introspector, build_introspectors
from gateway.verify.jwks import IssuerKeys
from gateway.verify.jwt_local import JwtVerifier, Verified
from gateway.verify.keys import KeySet, VerificationKey, from_pem_file
from gateway.verify.policy import RoutePolicy

log = logging.getLogger(__name__)
access_log = logging.getLogger("gateway.access")
REALM = "gateway"


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    judge: Judge | None  # None: auth mode none
    token: TokenLocation
    max_token_bytes: int
    upstream: proxy.Upstream
    metrics: RouteMetrics


@dataclass
class Gateway:
    """One compiled configuration."""

    settings: Settings
    routes: RouteTable[Route]
    issuers: dict[str, IssuerKeys]
    signer: Signer | None
    introspectors: dict[str, Introspector] = field(default_factory=dict)

    def not_ready(self) -> list[str]:
        return [f"issuer {name} has no keys" for name, keys in self.issuers.items() if not keys.ready]


@dataclass
class Runtime:
    """What outlives a reload; created once per process."""

    metrics: Metrics
    session: aiohttp.ClientSession
    store: RevocationStore
    mirror: Mirror
    revocation: RevocationCheck
    tokens: TokenService  # the gateway's own tokens: mint, list, revoke, refresh grant
    usage: UsageTracker  # last use of minted tokens, written off the request path
    trusted_proxies: tuple[Network, ...] = ()  # listen settings take effect at start only, as a reload says
    gateway: Gateway | None = None
    draining: bool = False
    refreshers: dict[int, asyncio.Task[None]] = field(default_factory=dict)
    pools: upstream_client.Pools = field(default_factory=upstream_client.Pools)

    async def install(self, gateway: Gateway) -> None:
        """Fetch keys the new config has not got yet, swap it in, and move the background refreshers over."""
        fresh = [keys for keys in gateway.issuers.values() if id(keys) not in self.refreshers]
        await asyncio.gather(*(keys.refresh() for keys in fresh if not keys.ready))
        previous, self.gateway = self.gateway, gateway
        if gateway.settings.tokens is not None:
            self.usage.interval = gateway.settings.tokens.last_use_interval
        wanted = {id(keys): keys for keys in gateway.issuers.values()}
        if previous is not None:
            for gone in previous.issuers.keys() - gateway.issuers.keys():
                with contextlib.suppress(KeyError):  # a removed issuer's gauge would read its last count for ever
                    self.metrics.jwks_keys.remove(gone)
        for key_id in list(self.refreshers):
            if key_id not in wanted:
                self.refreshers.pop(key_id).cancel()
        for key_id, keys in wanted.items():
            if key_id not in self.refreshers:
                self.refreshers[key_id] = asyncio.create_task(keys.run_refresher(), name=f"jwks:{keys.settings.name}")

    @classmethod
    def create(cls, settings: Settings, metrics: Metrics, session: aiohttp.ClientSession) -> Runtime:
        store: Store
        if settings.store.redis_url:
            store = RedisStore(connect_redis(settings.store), settings.store.key_prefix)
        else:
            store = MemoryStore()
        mirror = Mirror(store, metrics, settings.store.resync_interval, settings.store.max_staleness)
        check = RevocationCheck(mirror, metrics, settings.store.max_staleness)
        usage = UsageTracker(store, settings.tokens.last_use_interval if settings.tokens else 60.0)
        tokens = TokenService(store, check, usage)
        return cls(
            metrics=metrics,
            session=session,
            store=store,
            mirror=mirror,
            revocation=check,
            tokens=tokens,
            usage=usage,
            trusted_proxies=settings.listen.trusted_proxies,
        )

    async def close(self) -> None:
        for task in self.refreshers.values():
            task.cancel()
        await asyncio.gather(*self.refreshers.values(), return_exceptions=True)
        self.refreshers.clear()
        self.pools.close()
        await self.session.close()
        await self.store.close()


def build_gateway(settings: Settings, runtime: Runtime, previous: Gateway | None = None) -> Gateway:
    """Compile settings; key caches whose issuer settings did not change are carried over with their keys."""
    signer = Signer.from_files(settings.tokens.key_files) if settings.tokens else None
    issuer_settings = list(settings.issuers)
    if settings.tokens is not None:
        issuer_settings.append(own_issuer_settings(settings))
    issuers: dict[str, IssuerKeys] = {}
    for issuer in issuer_settings:
        old = previous.issuers.get(issuer.name) if previous else None
        fetched = not issuer.keys and not issuer.hmac_secret_env and issuer.name != GATEWAY_ISSUER_NAME
        if old is not None and fetched and old.settings == issuer:
            issuers[issuer.name] = old
        else:
            # Static keys are read again: a reload is how a PEM file replaced on disk (a withdrawn key) takes
            # effect. A fetched issuer whose key source is unchanged keeps its last good keys: a reload during
            # the IdP's outage must not leave the issuer with none.
            same_source = old is not None and fetched and _key_source(old.settings) == _key_source(issuer)
            last_good = old.keys if old is not None and same_source else None
            issuers[issuer.name] = _issuer_keys(issuer, runtime, signer, last_good)
    own = settings.tokens.issuer if settings.tokens else None
    verifier = JwtVerifier(issuers, TokenCache[Verified](settings.cache.verified_tokens, runtime.metrics), own)
    shared = runtime.store if isinstance(runtime.store, RedisStore) else None
    introspectors = build_introspectors(
        settings.introspection,
        runtime.session,
        runtime.metrics,
        redis=shared.client if shared else None,
        prefix=shared.prefix if shared else "",
        previous=previous.introspectors if previous else {},
    )
    identity_names = frozenset(name.lower() for r in settings.routes for name in r.forward.identity_headers)
    table = RouteTable(
        [
            (Matcher.compile(r.match), _route(r, verifier, introspectors, runtime, identity_names))
            for r in settings.routes
        ]
    )
    return Gateway(settings=settings, routes=table, issuers=issuers, signer=signer, introspectors=introspectors)


def own_issuer_settings(settings: Settings) -> IssuerSettings:
    """The gateway trusts the tokens it mints without further config."""
    assert settings.tokens is not None  # noqa: S101 - callers check
    return IssuerSettings(
        name=GATEWAY_ISSUER_NAME,
        issuer=settings.tokens.issuer,
        keys=tuple(StaticKey(pem_file=path) for path in settings.tokens.key_files),
        audiences=settings.tokens.audiences,
        algorithms=("ES256", "RS256", "EdDSA"),
        require_typ=ACCESS_TYP,  # refresh keys (typ rt+jwt) are not bearer tokens
        long_lived_after=0,
    )


def _key_source(issuer: IssuerSettings) -> tuple[object, ...]:
    return (issuer.issuer, issuer.jwks_uri, issuer.discovery)


def _issuer_keys(
    issuer: IssuerSettings, runtime: Runtime, signer: Signer | None, last_good: KeySet | None = None
) -> IssuerKeys:
    if issuer.name == GATEWAY_ISSUER_NAME and signer is not None:
        static: KeySet | None = signer.key_set()
    elif issuer.keys:
        static = KeySet(from_pem_file(k.pem_file, k.kid) for k in issuer.keys)
        for key, settings in zip(static.keys, issuer.keys, strict=True):
            if not key.algorithms & set(issuer.algorithms):
                # No token could ever verify with it: say so at load, not as every token refused.
                raise ValueError(
                    f"issuer {issuer.name}: {settings.pem_file} fits {', '.join(sorted(key.algorithms))}, none of "
                    f"its algorithms ({', '.join(issuer.algorithms)})"
                )
    elif issuer.hmac_secret_env:
        secret = os.environ.get(issuer.hmac_secret_env, "")
        # RFC 7518 §3.2: a key at least as long as the hash (HS256: 32 bytes, HS384: 48, HS512: 64).
        needed = max(int(alg[2:]) // 8 for alg in issuer.algorithms)
        if len(secret.encode()) < needed:
            raise ValueError(f"issuer {issuer.name}: {issuer.hmac_secret_env} must hold a secret of {needed}+ bytes")
        static = KeySet([VerificationKey(kid=None, key=secret.encode(), algorithms=frozenset(issuer.algorithms))])
    else:
        static = None
    return IssuerKeys(issuer, None if static else runtime.session, runtime.metrics, static=static, last_good=last_good)


def _route(
    settings: RouteSettings,
    verifier: JwtVerifier,
    introspectors: Mapping[str, Introspector],
    runtime: Runtime,
    identity_names: frozenset[str],
) -> Route:
    auth = settings.auth
    judge = None
    if auth.mode != "none":
        judge = Judge(
            verifier=verifier,
            issuers=frozenset(auth.issuers),
            policy=RoutePolicy.build(auth.required_scopes, auth.required_claims),
            revocation=runtime.revocation,
            revocation_policy=auth.revocation,
            fail_open=auth.on_unavailable == "fail_open",
            mode=auth.mode,
            introspector=introspectors[auth.introspection] if auth.introspection else None,
        )
    return Route(
        name=settings.name,
        judge=judge,
        token=auth.token,
        max_token_bytes=auth.max_token_bytes,
        upstream=proxy.Upstream.compile(settings, identity_names),
        metrics=RouteMetrics(runtime.metrics, settings.name),
    )


class Handler:
    """The proxy listener's request handler: match, extract, judge, forward — and account for it.

    `serve` answers what the listener parses itself; `upgrade` the WebSocket handshakes it hands to aiohttp."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.unmatched = RouteMetrics(runtime.metrics, "unmatched")

    async def serve(self, request: Request) -> None:
        gateway = self.runtime.gateway
        assert gateway is not None  # noqa: S101 - installed before the listener starts
        if gateway.signer is not None and gateway.settings.tokens is not None and request.path in PUBLIC_PATHS:
            # JWKS, discovery and the refresh grant of the gateway's own issuer, before route matching.
            issuer = self.runtime.tokens.issuer(gateway.settings.tokens, gateway.signer)
            request.send(await serve_public(request, self.runtime.tokens, issuer, self._client(request)))
            return

        async def forward(route: Route, identity: Identity | None) -> int:
            await proxy.forward(
                request,
                self.runtime.pools,
                route.upstream,
                identity,
                route.metrics.upstream_answered,
                self._via_proxy(request),
            )
            return request.status

        def refuse(exc: errors.GatewayError) -> int:
            if request.started:  # cut short (the upstream broke off): counted as the failure it was
                request.abort()
            else:
                request.send(error_response(exc))
            return exc.status

        await self._handle(gateway, request, forward, refuse, lambda: request.client_gone)

    def refused(self, status: int) -> None:
        """A request the listener refused before it could be read whole (400, 414, 431, 501, 505): counted as
        unmatched, with no method to name (the listener logs it)."""
        self.unmatched.answered("other", status, 0.0)

    async def upgrade(self, request: web.BaseRequest) -> web.StreamResponse:
        gateway = self.runtime.gateway
        assert gateway is not None  # noqa: S101 - installed before the listener starts
        answers: list[web.StreamResponse] = []

        async def relay(route: Route, identity: Identity | None) -> int:
            if not websocket.is_websocket(request.headers):  # the listener hands over WebSocket handshakes only
                raise errors.InvalidRequest("not a WebSocket handshake")
            upstream = route.upstream
            target = upstream.target(request.rel_url.raw_path, request.rel_url.raw_query_string)
            headers = upstream.headers(request, identity, self._via_proxy(request))
            answers.append(await websocket.relay(request, self.runtime.session, upstream, target, headers))
            return answers[-1].status

        def refuse(exc: errors.GatewayError) -> int:
            answers.append(error_response(exc))
            return exc.status

        def client_gone() -> bool:
            return isinstance(request.transport, asyncio.Transport) and request.transport.is_closing()

        await self._handle(gateway, request, relay, refuse, client_gone)
        answers[-1].force_close()  # whatever follows on this connection is not a WebSocket handshake
        return answers[-1]

    async def _handle(
        self,
        gateway: Gateway,
        request: RequestView,
        forward: Callable[[Route, Identity | None], Awaitable[int]],
        refuse: Callable[[errors.GatewayError], int],
        client_gone: Callable[[], bool],
    ) -> None:
        started = time.perf_counter()
        metrics = self.unmatched
        identity: Identity | None = None
        reason = ""
        status = CLIENT_GONE  # unless an answer is decided below
        try:
            route = gateway.routes.match(request.method, request.host, request.path)
            metrics = route.metrics
            if route.judge is not None:
                judged = self._judge(request, route)
                identity = judged if isinstance(judged, Identity) else await judged
            status = await forward(route, identity)
        except errors.GatewayError as exc:
            reason = exc.reason
            status = refuse(exc)
        except asyncio.CancelledError:
            reason = "client_gone"  # the listener cancels a request whose client left (or the drain ran out)
            raise
        except Exception:
            if client_gone():
                reason = "client_gone"
                raise  # the client went away mid-answer; nothing left to tell it
            log.exception("unexpected error", extra={"route": metrics.route})
            reason = "internal"
            status = refuse(errors.GatewayError())
        finally:
            # Counted and logged however it ended: a hung upstream whose clients give up must still show.
            elapsed = time.perf_counter() - started
            metrics.answered(request.method, status, elapsed)
            if gateway.settings.log.access:
                _log_access(request, self._client(request), metrics.route, status, elapsed, identity, reason)

    def _judge(self, request: RequestView, route: Route) -> Identity | Awaitable[Identity]:
        """As Judge.judge: a token judged before is admitted at once, without a coroutine; the rest is awaited."""
        assert route.judge is not None  # noqa: S101 - callers check
        try:
            judged = route.judge.judge(bearer.extract(request, route.token, route.max_token_bytes))
        except errors.GatewayError as exc:
            _count_denial(route, exc)
            raise
        if isinstance(judged, Identity):
            return self._allowed(request, route, judged)
        return self._judged_later(request, route, judged)

    async def _judged_later(self, request: RequestView, route: Route, judging: Awaitable[Identity]) -> Identity:
        try:
            identity = await judging
        except errors.GatewayError as exc:
            _count_denial(route, exc)
            raise
        return self._allowed(request, route, identity)

    def _allowed(self, request: RequestView, route: Route, identity: Identity) -> Identity:
        route.metrics.allowed()
        if identity.issuer == GATEWAY_ISSUER_NAME and identity.token_id is not None:
            self.runtime.usage.record(identity.token_id, self._client(request), request.headers.get("User-Agent"))
        return identity

    def _via_proxy(self, request: RequestView) -> bool:
        """The request came through a trusted proxy: its forwarding headers are believed and passed on."""
        trusted = self.runtime.trusted_proxies
        return bool(trusted) and is_trusted(request.remote, trusted)

    def _client(self, request: RequestView) -> str | None:
        """The client's address, through the trusted proxies in front of the gateway (forwarded.py)."""
        return client_address(
            request.remote, request.headers.getall("X-Forwarded-For", ()), self.runtime.trusted_proxies
        )


CLIENT_GONE = 499  # nginx's code for a request whose client closed the connection before the answer


def _count_denial(route: Route, exc: errors.GatewayError) -> None:
    route.metrics.denied("error" if exc.status >= 500 else "deny", exc.reason)


def error_response(exc: errors.GatewayError) -> web.Response:
    return web.json_response(exc.body(), status=exc.status, headers=exc.headers(REALM))


def _log_access(
    request: RequestView,
    client: str | None,
    route: str,
    status: int,
    elapsed: float,
    identity: Identity | None,
    reason: str,
) -> None:
    fields: dict[str, Any] = {
        "route": route,
        "method": request.method,
        "path": request.path,  # never the query string: a route may carry its token there
        "status": status,
        "duration_ms": round(elapsed * 1000, 3),
        "client": client,
    }
    if identity is not None:
        fields.update(subject=identity.subject, jti=identity.token_id, issuer=identity.issuer)
    if reason:
        fields["reason"] = reason
    access_log.info("request", extra=fields)


def readiness(runtime: Runtime) -> tuple[bool, Mapping[str, Any]]:
    problems = ["draining"] if runtime.draining else []
    if not runtime.mirror.synced.is_set():
        problems.append("revocation list not loaded yet (store unreachable since start)")
    if runtime.gateway is None:
        problems.append("no configuration loaded")
    else:
        problems += runtime.gateway.not_ready()
    return not problems, {"ready": not problems, "problems": problems}
