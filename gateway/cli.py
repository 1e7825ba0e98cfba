"""The `gateway` command (SPEC §2)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="Admission-control gateway.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("-c", "--config", required=True, help="YAML config file")
    serve.add_argument("--listen", help="HOST:PORT of the public proxy port (overrides `listen`)")
    serve.add_argument("--admin-listen", help="HOST:PORT of the admin port (overrides `admin_listen`)")
    serve.add_argument("--workers", type=int, default=1, help="worker processes (needs a Redis store when > 1)")

    check = commands.add_parser("check-config", help="validate a config file and summarise it")
    check.add_argument("-c", "--config", required=True)

    commands.add_parser("hash-key", help="read an API key on stdin, print its keys[].sha256 value")

    commands.add_parser("demo", help="a self-contained demonstration: example upstream, gateway, scripted load")

    upstream = commands.add_parser("example-upstream", help="run the small example scraping API")
    upstream.add_argument("--listen", default="127.0.0.1:9000", help="HOST:PORT (default 127.0.0.1:9000)")
    upstream.add_argument("--delay", default="500ms",
                          help="how long each page-fetching call takes unless it says delay_ms (default 500ms)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _run(argv)
    except BrokenPipeError:
        # Whoever read the output stopped (`gateway check-config -c F | head -1`): no traceback.
        # The rest goes nowhere, so that the interpreter's own flush at exit fails no more
        # (the recipe of Python's signal module documentation, exit status 1 included).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def _run(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        from gateway.server import ServeOptions, main_serve

        overrides = {}
        if args.listen:
            overrides["listen"] = args.listen
        if args.admin_listen:
            overrides["admin_listen"] = args.admin_listen
        return main_serve(ServeOptions(args.config, overrides, args.workers))
    if args.command == "check-config":
        from gateway.config.loader import ConfigError, load_config
        from gateway.config.summary import summarize

        try:
            config = load_config(args.config)
        except ConfigError as exc:
            for problem in exc.problems:
                print(problem, file=sys.stderr)
            return 1
        print(summarize(config))
        return 0
    if args.command == "hash-key":
        from gateway.admission.identity import hash_key

        secret = sys.stdin.buffer.read().strip()
        if not secret:
            print("gateway: no key on stdin", file=sys.stderr)
            return 1
        print(hash_key(secret))
        return 0
    if args.command == "demo":
        from gateway.demo import main as demo_main

        return demo_main()
    if args.command == "example-upstream":
        from gateway.example_upstream import main as upstream_main

        return upstream_main(["--listen", args.listen, "--delay", args.delay])
    return 2
