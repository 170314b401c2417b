"""``micctl run``, ``micctl apps``, ``micctl kill``: card apps from the caller's project.

``run`` finds the app from the current folder (``module:function`` as
``python -m`` would, or ``path/to/file.py:function``), sends its code and
prints its result; a failed app's card-side traceback goes to stderr before
the one-line error. Ctrl-C cancels the app on the card, as does ``--timeout``.
Imports the client library and the registry; never the daemon side.
"""

from __future__ import annotations

import argparse
import sys

from mic_host.client.apps import AppError
from mic_host.client.connection import Client
from mic_host.micctl.output import format_table, print_json
from mic_host.micctl.registry import (
    EXIT_OK,
    Subcommand,
    positive_int,
    register_subcommand,
    seconds,
    with_card,
)
from virtio.errors import RemoteProtocolError

__all__: list[str] = []


def _app(text: str) -> str:
    target, sep, fn = text.rpartition(":")
    if not sep or not target or not fn.isidentifier():
        raise argparse.ArgumentTypeError(
            f"bad app {text!r}: expected module:function or path/to/file.py:function"
        )
    return text


async def _run(client: Client, args: argparse.Namespace) -> int:
    try:
        r = await client.card(args.card).run(args.app, *args.args, timeout=args.timeout)
    except AppError as e:
        if e.traceback:
            print(e.traceback.rstrip(), file=sys.stderr)
        raise RemoteProtocolError(e.args[0] if e.args else str(e)) from None
    value = r.get("value", r)
    if isinstance(value, str):
        print(value)
    elif value is not None:
        print_json(value)
    return EXIT_OK


def _conf_run(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--timeout",
        type=seconds,
        metavar="S",
        help="cancel the app on the card after S seconds (default: no limit)",
    )
    with_card(p)
    p.add_argument(
        "app",
        type=_app,
        metavar="APP",
        help="module:function (found from the current folder, then sys.path, "
        "as python -m does) or path/to/file.py:function; its code is sent to the card",
    )
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS", help="its arguments")


async def _apps(client: Client, args: argparse.Namespace) -> int:
    apps = await client.card(args.card).apps()
    if args.json:
        print_json({"card": args.card, "apps": apps})
        return EXIT_OK
    rows = [
        [a.get("id"), a.get("app"), _secs(a.get("started")), _secs(a.get("elapsed"))] for a in apps
    ]
    print(format_table(["ID", "APP", "STARTED", "ELAPSED"], rows))
    return EXIT_OK


def _secs(v: object) -> str | None:
    return f"{v:.1f}s" if isinstance(v, int | float) else None


def _conf_apps(p: argparse.ArgumentParser) -> None:
    with_card(p)
    p.add_argument("--json", action="store_true", help="print the raw result (for scripts)")


async def _kill(client: Client, args: argparse.Namespace) -> int:
    for a in await client.card(args.card).kill(args.id):
        print(f"cancelled app {a.get('id')} {a.get('app')}")
    return EXIT_OK


def _conf_kill(p: argparse.ArgumentParser) -> None:
    with_card(p)
    p.add_argument("id", type=positive_int, metavar="ID", help="app id (see micctl apps)")


for _sub in (
    Subcommand("run", "run a card app from this project", _conf_run, _run),
    Subcommand("apps", "list the card apps running on a card", _conf_apps, _apps),
    Subcommand("kill", "cancel a running card app", _conf_kill, _kill),
):
    register_subcommand(_sub)
del _sub
