"""Checks that need more than the schema: build every runtime object once, without listening or fetching."""

from __future__ import annotations

import asyncio

from gateway.config import Settings


def compile_check(settings: Settings) -> str | None:
    """Build the gateway from `settings` as `run` would; return a problem, or None when it compiles."""

    async def build() -> None:
        from gateway.app import Runtime, build_gateway
        from gateway.metrics import Metrics
        from gateway.server import new_session

        runtime = Runtime.create(settings, Metrics(), new_session())  # connects lazily: nothing is contacted
        try:
            build_gateway(settings, runtime)
        finally:
            await runtime.close()

    try:
        asyncio.run(build())
    except Exception as exc:  # noqa: BLE001 - a passphrase-protected key file raises TypeError, ...
        return str(exc) or type(exc).__name__
    return None
