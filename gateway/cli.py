"""Command line: `gateway run | check-config | demo | schema | keys generate`. Thin: the work is elsewhere."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from gateway import configfile, logs, signing
from gateway.config import Settings

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

    keys = commands.add_parser("keys", help="signing keys").add_subparsers(metavar="ACTION")
    generate = keys.add_parser("generate", help="write a new private signing key (mode 0600)")
    generate.add_argument("--out", required=True)
    generate.add_argument("--alg", choices=["ES256", "RS256", "EdDSA"], default="ES256")
    generate.set_defaults(command=_keys_generate)
    return parser


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
    return _run_loop(serve(settings, Path(args.config)))


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


def _run_loop(main: Coroutine[Any, Any, Any]) -> int:
    try:
        import uvloop

        uvloop.run(main)
    except ImportError:
        asyncio.run(main)
    return 0
