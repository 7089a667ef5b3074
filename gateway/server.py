"""Run the gateway: the proxy and admin listeners, SIGTERM (drain, then exit) and SIGHUP (reload)."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web

from gateway import configfile, errors
from gateway.admin import admin_app
from gateway.app import Handler, Runtime, build_gateway
from gateway.config import Settings
from gateway.listener import Listener
from gateway.metrics import Metrics, multiprocess

log = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass
class Listening:
    """Where the listeners ended up (port 0 picks a free one: tests and the demo need the real numbers)."""

    proxy_port: int
    admin_port: int


def new_session() -> aiohttp.ClientSession:
    # auto_decompress off: bodies pass through byte for byte; cookies are the client's business, not ours.
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=60, keepalive_timeout=30)
    return aiohttp.ClientSession(
        connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(), trust_env=False
    )


class Server:
    """One gateway process: start, reload on demand, drain and stop."""

    def __init__(
        self,
        settings: Settings,
        config_path: Path | None = None,
        metrics: Metrics | None = None,
        reuse_port: bool = False,
    ) -> None:
        self.settings = settings
        self.config_path = config_path
        self.metrics = metrics or Metrics()
        self.reuse_port = reuse_port
        self.runtime: Runtime | None = None
        self._runners: list[web.BaseRunner] = []
        self._listener: Listener | None = None
        self._stopping = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._mirror_task: asyncio.Task[None] | None = None
        self._flusher: asyncio.Task[None] | None = None

    async def start(self) -> Listening:
        if not self.settings.store.redis_url:
            log.warning("no store.redis_url: using the in-process memory store, which serves this one instance only")
        for network in self.settings.listen.trusted_proxies:
            if network.prefixlen == 0:  # legal, but every client can then name the address logged for it
                log.warning(
                    "listen.trusted_proxies trusts every address: any client's X-Forwarded-For is believed",
                    extra={"range": str(network)},
                )
        runtime = Runtime.create(self.settings, self.metrics, new_session())
        self.runtime = runtime
        self._mirror_task = asyncio.create_task(runtime.mirror.run(), name="revocation-mirror")
        if multiprocess():  # another worker may answer the scrape: counts go to the shared files regularly
            self._flusher = asyncio.create_task(self.metrics.run_flusher(), name="metrics-flush")
        runtime.usage.start()
        await runtime.install(build_gateway(self.settings, runtime))
        listen = self.settings.listen
        handler = Handler(runtime)
        # WebSocket handshakes are handed from the listener to aiohttp's server (see listener.py).
        upgrades = _ProxyServer(
            handler.upgrade, handler_cancellation=True, max_field_size=listen.max_header_bytes, access_log=None
        )
        self._listener = Listener(
            handler.serve, upgrades, listen.max_header_bytes, listen.idle_timeout, listen.send_timeout, handler.refused
        )
        admin_runner = web.AppRunner(admin_app(runtime, self.settings.admin.token_env), access_log=None)
        await admin_runner.setup()
        self._runners.append(admin_runner)
        # SO_REUSEPORT only for --workers: otherwise a second gateway on the same port would start silently.
        shared = self.reuse_port
        proxy_port = await self._listener.start(listen.host, listen.port, reuse_port=shared)
        admin_site = web.TCPSite(admin_runner, self.settings.admin.host, self.settings.admin.port, reuse_port=shared)
        await admin_site.start()
        ports = Listening(proxy_port, _port(admin_runner))
        log.info(  # the pid tells the --workers processes apart
            "gateway listening",
            extra={"proxy_port": ports.proxy_port, "admin_port": ports.admin_port, "pid": os.getpid()},
        )
        return ports

    async def reload(self) -> bool:
        """Re-read the config file; a valid one is swapped in whole, an invalid one changes nothing."""
        assert self.runtime is not None and self.config_path is not None  # noqa: S101 - only after start()
        async with self._reload_lock:
            try:
                settings = configfile.load(self.config_path)
                gateway = build_gateway(settings, self.runtime, previous=self.runtime.gateway)
            except Exception as exc:  # noqa: BLE001 - a key file cryptography cannot load raises TypeError, ...
                self.metrics.config_reloads.labels("failure").inc()
                log.error(
                    "config reload refused; the previous config keeps serving",
                    extra={"error": str(exc), "error_type": type(exc).__name__},
                )
                return False
            if (settings.listen, settings.admin, settings.store) != (
                self.settings.listen,
                self.settings.admin,
                self.settings.store,
            ):
                log.warning("listen, admin and store changes take effect only after a restart")
            await self.runtime.install(gateway)
            self.metrics.config_reloads.labels("success").inc()
            log.info("config reloaded", extra={"routes": len(settings.routes), "pid": os.getpid()})
            return True

    def request_stop(self) -> None:
        self._stopping.set()

    async def wait(self) -> None:
        await self._stopping.wait()

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (up to drain_timeout), then close everything."""
        if self.runtime is not None:
            self.runtime.draining = True
        # The proxy first, the admin listener last: while in-flight requests drain, /readyz still answers 503
        # "draining" and /metrics can be scraped. (In reverse order the admin listener was gone before the drain
        # began, and "draining" was never seen.)
        if self._listener is not None:
            await self._listener.stop(self.settings.listen.drain_timeout)
            self._listener = None
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
        for task in (self._mirror_task, self._flusher):  # the flusher writes its last counts as it ends
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self.runtime is not None:
            await self.runtime.usage.stop()  # writes the last uses still pending
            await self.runtime.close()


class _JsonErrors(web.RequestHandler):
    """For the connections the listener hands to aiohttp (WebSocket handshakes and what follows them on the same
    connection). aiohttp answers a request it cannot parse with a text/plain 400 that quotes the offending bytes
    back: a header line with its bearer token, a request line with its query string. Answer in the gateway's JSON
    error format instead, quoting nothing (the log line is kept, minus the bytes: see logs.MalformedRequests)."""

    def handle_error(
        self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs; raises if the answer had already begun
        error = errors.InvalidRequest("malformed HTTP request") if status == 400 else errors.GatewayError()
        response = web.json_response(error.body(), status=status)
        response.force_close()
        return response


class _ProxyServer(web.Server):
    def __call__(self) -> web.RequestHandler:
        return _JsonErrors(self, loop=self._loop, **self._kwargs)


def _stop_with_parent(server: Server) -> None:
    """A worker whose supervisor dies (even by SIGKILL) gets SIGTERM from the kernel and drains, never lingers."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        log.warning("cannot ask the kernel to stop this worker with its supervisor (not Linux?)")
    if os.getppid() == 1:  # the supervisor died before prctl took effect
        server.request_stop()


def _port(runner: web.BaseRunner) -> int:
    for address in runner.addresses:
        return int(address[1])
    raise RuntimeError("the listener has no address")


async def start_or_explain(server: Server) -> Listening | None:
    """Start; or, when that fails on the host (a port in use, an address not on it, an unreadable file), log why in
    one line, undo what was started, and return None: an operator needs the reason, not a traceback."""
    try:
        return await server.start()
    except OSError as exc:
        log.error("cannot start", extra={"error": str(exc)})
        await server.stop()
        return None


async def serve(settings: Settings, config_path: Path | None, reuse_port: bool = False) -> int:
    """Run until SIGTERM or SIGINT; SIGHUP reloads. The exit code: 1 if it could not start."""
    server = Server(settings, config_path, reuse_port=reuse_port)
    if await start_or_explain(server) is None:
        return 1
    # Everything built at start lives as long as the process: move it out of the collector's way, and collect
    # the young generation less often, so full collections (which stall every request in flight) are rarer.
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    loop = asyncio.get_running_loop()
    reloads: set[asyncio.Task[bool]] = set()

    def on_hup() -> None:
        if config_path is None:
            log.warning("SIGHUP ignored: no config file to reload")
            return
        task = loop.create_task(server.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGTERM, server.request_stop)
    loop.add_signal_handler(signal.SIGINT, server.request_stop)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    if reuse_port:
        _stop_with_parent(server)
    await server.wait()
    log.info("stopping: draining in-flight requests", extra={"drain_timeout_s": settings.listen.drain_timeout})
    await server.stop()
    log.info("stopped", extra={"pid": os.getpid()})
    return 0
