"""Command line: `gateway run | check-config | demo | schema | revoke | revocations | keys`. Thin: the work is elsewhere."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from redis.exceptions import RedisError

from gateway import configfile, logs, signing
from gateway.config import Settings
from gateway.revoke import RevokeRequest, describe
from gateway.store import Kind, RedisStore, connect_redis

DEFAULT_CONFIG = "/etc/gateway/gateway.yaml"


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "command"):
        parser.print_help()
        return 2
    result: int = args.command(args)
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    commands = parser.add_subparsers(metavar="COMMAND")

    run = commands.add_parser("run", help="run the gateway")
    run.add_argument("--config", "-c", default=os.environ.get("GATEWAY_CONFIG", DEFAULT_CONFIG))
    run.add_argument(
        "--workers", type=int, default=None,
        help="processes on one port (default: the number of cores with a Redis store, 1 with the memory store)",
    )  # fmt: skip
    run.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # set by the supervisor
    run.set_defaults(command=_run)

    check = commands.add_parser("check-config", help="validate a config file without starting")
    check.add_argument("file")
    check.set_defaults(command=_check_config)

    demo = commands.add_parser("demo", help="run a self-contained demo (own issuer, demo upstream, demo token)")
    demo.add_argument("--port", type=int, default=8080)
    demo.add_argument("--admin-port", type=int, default=9090)
    demo.set_defaults(command=_demo)

    schema = commands.add_parser("schema", help="print the JSON Schema of the config file")
    schema.set_defaults(command=_schema)

    revoke = commands.add_parser("revoke", help="revoke a token (by jti) or every token of a subject")
    _config_arg(revoke)
    target = revoke.add_mutually_exclusive_group(required=True)
    target.add_argument("--jti")
    target.add_argument("--subject")
    revoke.add_argument("--issuer", help="only this issuer's tokens (configured name); default: every issuer")
    revoke.add_argument("--expires-at", help="jti: the token's exp (unix seconds or ISO 8601); default: 400 days")
    revoke.add_argument("--before", help="subject: tokens issued before this time (default: now)")
    revoke.add_argument("--reason")
    revoke.set_defaults(command=_revoke)

    revocations = commands.add_parser("revocations", help="list or undo revocations").add_subparsers(metavar="ACTION")
    listing = revocations.add_parser("list", help="list revocations")
    _config_arg(listing)
    listing.add_argument("--kind", choices=["jti", "subject"], default="jti")
    listing.add_argument("--offset", type=int, default=0)
    listing.add_argument("--limit", type=int, default=100)
    listing.set_defaults(command=_revocations_list)
    undo = revocations.add_parser("delete", help="undo a mistaken revocation")
    _config_arg(undo)
    which = undo.add_mutually_exclusive_group(required=True)
    which.add_argument("--jti")
    which.add_argument("--subject")
    undo.add_argument("--issuer")
    undo.set_defaults(command=_revocations_delete)

    keys = commands.add_parser("keys", help="signing keys").add_subparsers(metavar="ACTION")
    generate = keys.add_parser("generate", help="write a new private signing key (mode 0600)")
    generate.add_argument("--out", required=True)
    generate.add_argument("--alg", choices=["ES256", "RS256", "EdDSA"], default="ES256")
    generate.set_defaults(command=_keys_generate)
    return parser


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default=os.environ.get("GATEWAY_CONFIG", DEFAULT_CONFIG))


def _load(path: str) -> Settings | None:
    try:
        return configfile.load(path)
    except configfile.ConfigError as exc:
        for problem in exc.problems:
            print(f"{exc.source}: {problem}", file=sys.stderr)
        return None


def _run(args: argparse.Namespace) -> int:
    from gateway.server import serve

    settings = _load(args.config)
    if settings is None:
        return 1
    logs.setup(settings.log.level)
    workers = args.workers or ((os.cpu_count() or 1) if settings.store.redis_url else 1)
    if workers > 1 and not args.worker:
        if not settings.store.redis_url:
            print(
                f"{args.config}: --workers {workers} needs store.redis_url: with the in-process store each worker "
                "would hold its own revocations",
                file=sys.stderr,
            )
            return 1
        from gateway.workers import Supervisor

        return Supervisor(args.config, workers, settings.listen.drain_timeout).run()
    return _run_loop(serve(settings, Path(args.config), reuse_port=args.worker))


def _check_config(args: argparse.Namespace) -> int:
    from gateway.checks import compile_check

    settings = _load(args.file)
    if settings is None:
        return 1
    problem = compile_check(settings)
    if problem:
        print(f"{args.file}: {problem}", file=sys.stderr)
        return 1
    print(
        f"{args.file}: OK — {len(settings.routes)} routes, {len(settings.issuers)} issuers, "
        f"{len(settings.introspection)} introspection endpoints, store: "
        f"{'redis' if settings.store.redis_url else 'in-process memory'}"
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    logs.setup("warning")
    return _run_loop(run_demo(args.port, args.admin_port))


def _schema(args: argparse.Namespace) -> int:
    print(json.dumps(Settings.model_json_schema(), indent=2))
    return 0


def _keys_generate(args: argparse.Namespace) -> int:
    try:
        signing.write_private_key(signing.generate(args.alg), args.out)
    except FileExistsError:
        print(f"{args.out} exists; refusing to overwrite a key", file=sys.stderr)
        return 1
    key = signing.load_private_key(args.out)
    print(f"wrote {args.alg} key {args.out} (mode 0600), kid {key.kid}")
    return 0


def _with_store(args: argparse.Namespace, work: Callable[[RedisStore], Awaitable[int]]) -> int:
    """Run `work` against the Redis store of the config file (the same one the running gateways use)."""
    settings = _load(args.config)
    if settings is None:
        return 1
    if not settings.store.redis_url:
        print(
            f"{args.config}: store.redis_url is empty: revocations live inside the running gateway's memory; "
            "use its admin API (POST /admin/revocations)",
            file=sys.stderr,
        )
        return 1

    async def run() -> int:
        store = RedisStore(connect_redis(settings.store), settings.store.key_prefix)
        try:
            return await work(store)
        except (RedisError, OSError) as exc:
            print(f"cannot reach Redis at {settings.store.redis_url}: {exc}", file=sys.stderr)
            return 1
        finally:
            await store.close()

    return asyncio.run(run())


def _revoke(args: argparse.Namespace) -> int:
    fields = {"jti": args.jti, "subject": args.subject, "issuer": args.issuer, "expires_at": args.expires_at,
              "before": args.before, "reason": args.reason}  # fmt: skip
    try:
        ask = RevokeRequest.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        print(f"revoke: {describe(exc)}", file=sys.stderr)
        return 2

    async def work(store: RedisStore) -> int:
        revocation = ask.revocation()
        await store.add(revocation)
        print(json.dumps({"revoked": revocation.as_json()}))
        return 0

    return _with_store(args, work)


def _revocations_list(args: argparse.Namespace) -> int:
    async def work(store: RedisStore) -> int:
        for item in await store.page(args.kind, args.offset, args.limit):
            print(json.dumps(item.as_json()))
        return 0

    return _with_store(args, work)


def _revocations_delete(args: argparse.Namespace) -> int:
    kind: Kind = "jti" if args.jti else "subject"

    async def work(store: RedisStore) -> int:
        removed = await store.remove(kind, args.jti or args.subject, args.issuer)
        print(json.dumps({"removed": removed}))
        return 0 if removed else 1

    return _with_store(args, work)


def _run_loop(main: Coroutine[Any, Any, Any]) -> int:
    try:
        import uvloop

        uvloop.run(main)
    except ImportError:
        asyncio.run(main)
    return 0
