"""Command line: `gateway run | check-config | demo | schema | revoke | revocations | tokens | keys`. Thin: the work is
elsewhere."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from gateway import configfile, jsontext, logs, signing
from gateway.config import Settings
from gateway.revoke import FINAL, RevokeRequest, describe, is_final, unknown_issuer
from gateway.store import STORE_ERRORS, Kind, RedisStore, connect_redis, display_url
from gateway.token_records import MintError, MintRequest, TokenQuery, valid_jti
from gateway.tokens import TokenService
from gateway.workers import Supervisor, address_in_use, usable_cpus

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
    check.add_argument("file", nargs="?", help="the config file (or --config, as for run; not both)")
    check.add_argument("--config", "-c", default=None)
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

    _tokens_parser(commands)

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

    # Until this process can reload, a reload asked for (SIGHUP, say by a config manager just after a start) is
    # ignored, not fatal; serve() and the supervisor install their own handler once they can act on it.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    settings = _load(args.config)
    if settings is None:
        return 1
    logs.setup(settings.log.level)
    workers = args.workers or (usable_cpus() if settings.store.redis_url else 1)
    if workers > 1 and not args.worker:
        if not settings.store.redis_url:
            print(
                f"{args.config}: --workers {workers} needs store.redis_url: with the in-process store each worker "
                "would hold its own revocations",
                file=sys.stderr,
            )
            return 1
        if settings.listen.port == 0:
            print(
                f"{args.config}: --workers {workers} needs a fixed listen.port (0 would give each its own)",
                file=sys.stderr,
            )
            return 1
        listen, admin = settings.listen, settings.admin
        taken = address_in_use([(listen.host, listen.port), (admin.host, admin.port)])
        if taken is not None:
            print(
                f"{args.config}: {taken} is in use (another gateway?); workers share ports only among themselves",
                file=sys.stderr,
            )
            return 1
        return Supervisor(args.config, workers, settings.listen.drain_timeout).run()
    return _run_loop(serve(settings, Path(args.config), reuse_port=args.worker))


def _check_config(args: argparse.Namespace) -> int:
    from gateway.checks import compile_check

    if args.file and args.config:
        print(f"check-config: two files named ({args.file}, {args.config}): name one", file=sys.stderr)
        return 2
    # The file `gateway run` would read, unless one is named.
    path = args.file or args.config or os.environ.get("GATEWAY_CONFIG", DEFAULT_CONFIG)
    settings = _load(path)
    if settings is None:
        return 1
    problem = compile_check(settings)
    if problem:
        print(f"{path}: {problem}", file=sys.stderr)
        return 1
    print(
        f"{path}: OK — {len(settings.routes)} routes, {len(settings.issuers)} issuers, "
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


def _with_store(
    args: argparse.Namespace,
    work: Callable[[RedisStore], Awaitable[int]],
    what: str = "revocations",
    api: str = "POST /admin/revocations",
) -> int:
    """Run `work` against the Redis store of the config file (the same one the running gateways use)."""
    settings = _load(args.config)
    if settings is None:
        return 1
    if not settings.store.redis_url:
        print(
            f"{args.config}: store.redis_url is empty: {what} live inside the running gateway's memory; "
            f"use its admin API ({api})",
            file=sys.stderr,
        )
        return 1

    async def run() -> int:
        store = RedisStore(connect_redis(settings.store), settings.store.key_prefix)
        try:
            return await work(store)
        except STORE_ERRORS as exc:
            # redis-py retries a command that timed out or lost its connection: a change may have been made.
            where = display_url(settings.store.redis_url)
            print(f"Redis at {where} failed: {exc}; a change may have been made: look before retrying", file=sys.stderr)
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
    settings = _load(args.config)
    if settings is None:
        return 1
    unknown = unknown_issuer(ask.issuer, settings)
    if unknown:
        print(f"revoke: {unknown}", file=sys.stderr)
        return 2
    try:
        revocation = ask.revocation()
    except ValueError as exc:
        print(f"revoke: {exc}", file=sys.stderr)
        return 2

    async def work(store: RedisStore) -> int:
        await store.add(revocation)
        print(json.dumps({"revoked": revocation.as_json()}))
        return 0

    return _with_store(args, work)


def _revocations_list(args: argparse.Namespace) -> int:
    from gateway.admin import MAX_PAGE

    # As tokens list does: passed on, a negative offset or a limit below 1 is a range counted from the end.
    offset, limit = max(0, args.offset), min(MAX_PAGE, max(1, args.limit))
    if args.limit > MAX_PAGE:
        print(f"revocations list: --limit capped at {MAX_PAGE}; use --offset for more", file=sys.stderr)

    async def work(store: RedisStore) -> int:
        for item in await store.page(args.kind, offset, limit):
            print(json.dumps(item.as_json()))
        return 0

    return _with_store(args, work)


def _revocations_delete(args: argparse.Namespace) -> int:
    kind: Kind = "jti" if args.jti else "subject"

    if is_final(kind, args.issuer):
        print(f"revocations delete: {FINAL}", file=sys.stderr)
        return 2

    async def work(store: RedisStore) -> int:
        removed = await store.remove(kind, args.jti or args.subject, args.issuer)
        print(json.dumps({"removed": removed}))
        return 0 if removed else 1

    return _with_store(args, work)


def _tokens_parser(commands: Any) -> None:
    tokens = commands.add_parser("tokens", help="the gateway's own tokens: mint, list, show, revoke")
    actions = tokens.add_subparsers(metavar="ACTION")
    mint = actions.add_parser("mint", help="mint an access token or a refresh key (printed once, never stored)")
    _config_arg(mint)
    mint.add_argument("--subject", required=True)
    mint.add_argument("--audience", action="append", default=[], help="repeatable; default: tokens.audiences")
    mint.add_argument("--scope", action="append", default=[], help="repeatable, or space-separated")
    mint.add_argument("--lifetime", help="365d, 90d, 12h...; default: tokens.default_lifetime")
    mint.add_argument("--note")
    mint.add_argument("--claim", action="append", default=[], metavar="NAME=VALUE", help="extra claim (JSON or text)")
    mint.add_argument("--refresh", action="store_true", help="a refresh key for POST /oauth/token")
    mint.add_argument("--rotate", action="store_true", help="refresh key: replaced at each exchange")
    mint.set_defaults(command=_tokens_mint)
    listing = actions.add_parser("list", help="list minted tokens, newest first (JSON lines)")
    _config_arg(listing)
    listing.add_argument("--subject")
    listing.add_argument("--audience")
    listing.add_argument("--status", choices=["active", "revoked", "expired", "retired"])
    listing.add_argument("--kind", choices=["access", "refresh"])
    listing.add_argument("--offset", type=int, default=0)
    listing.add_argument("--limit", type=int, default=100)
    listing.set_defaults(command=_tokens_list)
    show = actions.add_parser("show", help="show one minted token's metadata")
    _config_arg(show)
    show.add_argument("jti")
    show.set_defaults(command=_tokens_show)
    revoke = actions.add_parser("revoke", help="revoke a minted token (a refresh key: with its family)")
    _config_arg(revoke)
    revoke.add_argument("jti")
    revoke.add_argument("--reason", default="")
    revoke.add_argument("--by", default=f"cli:{getpass.getuser()}")
    revoke.set_defaults(command=_tokens_revoke)


def _with_tokens(args: argparse.Namespace, work: Callable[[TokenService, Settings], Awaitable[int]]) -> int:
    settings = _load(args.config)
    if settings is None:
        return 1

    async def run(store: RedisStore) -> int:
        return await work(TokenService(store), settings)

    return _with_store(args, run, "minted tokens", "/admin/tokens")


def _tokens_mint(args: argparse.Namespace) -> int:
    fields: dict[str, Any] = {"subject": args.subject, "audience": args.audience, "kind": "access"}
    fields["scopes"] = [s for scope in args.scope for s in scope.split()]
    if args.refresh:
        fields["kind"] = "refresh"
        fields["rotate"] = args.rotate
    elif args.rotate:
        print("tokens mint: --rotate applies to refresh keys (--refresh)", file=sys.stderr)
        return 2
    for name, value in (("lifetime", args.lifetime), ("note", args.note)):
        if value is not None:
            fields[name] = value
    claims: dict[str, Any] = {}
    for item in args.claim:
        name, sep, value = item.partition("=")
        if not sep:
            print(f"tokens mint: --claim {name}: expected NAME=VALUE", file=sys.stderr)
            return 2
        try:
            claims[name] = jsontext.loads(value)
        except json.JSONDecodeError:  # not JSON: the text itself
            claims[name] = value
        except ValueError as exc:  # JSON to Python, not to RFC 8259 (NaN, Infinity, a repeated key) or too deep
            print(f"tokens mint: --claim {name}: {exc}", file=sys.stderr)
            return 2
    fields["claims"] = claims
    try:
        ask = MintRequest.model_validate(fields)
    except ValidationError as exc:
        print(f"tokens mint: {describe(exc)}", file=sys.stderr)
        return 2

    async def work(service: TokenService, settings: Settings) -> int:
        if settings.tokens is None:
            print(f"{args.config}: no tokens: section; the gateway mints no tokens", file=sys.stderr)
            return 1
        try:
            issuer = service.issuer(settings.tokens, signing.Signer.from_files(settings.tokens.key_files))
            minted = await service.mint(issuer, ask)
        except MintError as exc:
            print(f"tokens mint: {exc}", file=sys.stderr)
            return 2
        except (OSError, ValueError) as exc:
            print(f"tokens mint: cannot load the signing key: {exc}", file=sys.stderr)
            return 1
        print(json.dumps({"token": minted.token, "metadata": minted.record.as_json(time.time())}))
        return 0

    return _with_tokens(args, work)


def _tokens_list(args: argparse.Namespace) -> int:
    query = TokenQuery(subject=args.subject, audience=args.audience, status=args.status, kind=args.kind)

    async def work(service: TokenService, settings: Settings) -> int:
        records, _ = await service.listing(query, max(0, args.offset), max(1, args.limit))
        now = time.time()
        for record in records:
            print(json.dumps(record.as_json(now)))
        return 0

    return _with_tokens(args, work)


def _tokens_show(args: argparse.Namespace) -> int:
    async def work(service: TokenService, settings: Settings) -> int:
        record = await service.describe(args.jti) if valid_jti(args.jti) else None
        if record is None:
            print(f"no such token: {args.jti}", file=sys.stderr)
            return 1
        print(json.dumps(record.as_json(time.time())))
        return 0

    return _with_tokens(args, work)


def _tokens_revoke(args: argparse.Namespace) -> int:
    async def work(service: TokenService, settings: Settings) -> int:
        record = await service.revoke(args.jti, args.by, args.reason) if valid_jti(args.jti) else None
        if record is None:
            print(f"no such token: {args.jti}", file=sys.stderr)
            return 1
        print(json.dumps({"revoked": record.as_json(time.time())}))
        return 0

    return _with_tokens(args, work)


def _run_loop(main: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
