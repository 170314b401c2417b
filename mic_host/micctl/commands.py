"""``micctl``'s built-in subcommands: one handler per control op, registered at import.

Each handler gets a connected :class:`~mic_host.client.connection.Client` and
the parsed arguments, makes its request(s) and prints the result
(:mod:`mic_host.micctl.output`). Imports the client library, the registry,
the output and the block-image helpers; never the daemon side.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
from typing import Any

from mic_host.client.connection import Client
from mic_host.lifecycle import CardState
from mic_host.micctl.images import prepare_block_image
from mic_host.micctl.output import format_net, format_stats, format_status, print_json, print_state
from mic_host.micctl.registry import (
    EXIT_OK,
    Subcommand,
    UsageError,
    card_name,
    positive_int,
    register_subcommand,
    size,
    with_card,
    with_timeout,
)

__all__ = ["attach_options"]


def _opt_value(text: str) -> object:
    if text in ("true", "false"):
        return text == "true"
    try:
        return int(text, 0)
    except ValueError:
        return text


def _opt(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key.strip(), _opt_value(value)


def attach_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``options`` of an ``attach`` request from its command line.

    Raises:
        UsageError: the same option given twice (a flag and ``--opt``).
    """
    opts: dict[str, Any] = {}
    for key, value in args.opt or []:
        if key in opts:
            raise UsageError(f"option {key!r} given twice")
        opts[key] = value
    flags = {
        "image": args.image,
        "size": args.size,
        "create": True if args.create else None,
        "read_only": True if args.read_only else None,
        "serial": args.serial,
        "num_queues": getattr(args, "queues", None),
    }
    for key, value in flags.items():
        if value is None:
            continue
        if key in opts:
            raise UsageError(f"option {key!r} given both as --{key.replace('_', '-')} and --opt")
        opts[key] = value
    return opts


# -------------------------------------------------------------- subcommands


async def _ping(client: Client, args: argparse.Namespace) -> int:
    r = await client.ping()
    if args.json:
        print_json(r)
    else:
        print(f"mic-host pid {r.get('pid', '?')}, protocol {r.get('version', '?')}")
    return EXIT_OK


def _conf_ping(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the raw result")


async def _status(client: Client, args: argparse.Namespace) -> int:
    r = await client.status(args.card)
    if args.json:
        print_json(r)
    else:
        print(format_status(r))
    return EXIT_OK


def _conf_status(p: argparse.ArgumentParser) -> None:
    p.add_argument("card", nargs="?", type=card_name, metavar="CARD", help="only this card")
    p.add_argument("--json", action="store_true", help="print the raw result (for scripts)")


async def _boot(client: Client, args: argparse.Namespace) -> int:
    print_state(args.card, await client.card(args.card).boot(args.wait, args.timeout))
    return EXIT_OK


def _conf_boot(p: argparse.ArgumentParser) -> None:
    with_card(p)
    p.add_argument("--wait", action="store_true", help="until the card is online")
    with_timeout(p)


async def _shutdown(client: Client, args: argparse.Namespace) -> int:
    print_state(args.card, await client.card(args.card).shutdown(args.wait, args.timeout))
    return EXIT_OK


def _conf_shutdown(p: argparse.ArgumentParser) -> None:
    with_card(p)
    p.add_argument("--wait", action="store_true", help="until the card is ready")
    with_timeout(p)


async def _reset(client: Client, args: argparse.Namespace) -> int:
    print_state(args.card, await client.card(args.card).reset())
    return EXIT_OK


async def _wait(client: Client, args: argparse.Namespace) -> int:
    print_state(args.card, await client.card(args.card).wait(args.state, args.timeout))
    return EXIT_OK


def _conf_wait(p: argparse.ArgumentParser) -> None:
    with_card(p)
    p.add_argument(
        "state", choices=[s.value for s in CardState], metavar="STATE", help="ready, online, ..."
    )
    with_timeout(p)


async def _attach(client: Client, args: argparse.Namespace) -> int:
    opts = attach_options(args)
    created = None
    if args.type == "block":
        created = await asyncio.to_thread(prepare_block_image, client.state_dir, args, opts)
    try:
        r = await client.card(args.card).attach(args.type, **opts)
    except BaseException:
        if created is not None:
            with contextlib.suppress(OSError):
                created.unlink()
        raise
    print(r.get("device", json.dumps(r, sort_keys=True)))
    return EXIT_OK


def _conf_attach(p: argparse.ArgumentParser) -> None:
    with_card(p)
    p.add_argument("type", metavar="TYPE", help="block, console, net or a plug-in backend")
    p.add_argument("--image", metavar="PATH", help="block: backing file")
    p.add_argument("--size", type=size, metavar="SIZE", help="block: size to create, e.g. 64M")
    p.add_argument("--create", action="store_true", help="block: create the image if missing")
    p.add_argument("--read-only", action="store_true", help="block: read-only device")
    p.add_argument("--serial", metavar="S", help="block: serial (GET_ID), <= 20 bytes")
    p.add_argument(
        "--copy-from",
        metavar="SRC",
        help="block: create the image as a copy of SRC (with a progress bar); --size may grow it",
    )
    p.add_argument(
        "--preallocate",
        action="store_true",
        help="block: with --create, allocate every block now (with a progress bar)",
    )
    p.add_argument("--queues", type=positive_int, metavar="N", help="block: request queues (MQ)")
    p.add_argument(
        "--opt",
        type=_opt,
        action="append",
        metavar="KEY=VALUE",
        help="any backend option (true/false/ints are converted); repeatable",
    )


async def _detach(client: Client, args: argparse.Namespace) -> int:
    await client.card(args.card).detach(args.device)
    return EXIT_OK


def _conf_detach(p: argparse.ArgumentParser) -> None:
    with_card(p)
    p.add_argument("device", metavar="DEVICE", help="card device name (vdb) or label")


async def _stats(client: Client, args: argparse.Namespace) -> int:
    r = await client.card(args.card).stats()
    if args.json:
        print_json(r)
    else:
        print(format_stats(r))
    return EXIT_OK


def _conf_stats(p: argparse.ArgumentParser) -> None:
    with_card(p)
    p.add_argument("--json", action="store_true", help="print the raw result (for scripts)")


async def _net(client: Client, args: argparse.Namespace) -> int:
    link = None if args.link is None else args.link == "up"
    r = await client.card(args.card).net(args.device, link=link)
    if args.json:
        print_json(r)
    else:
        print(format_net(r))
    return EXIT_OK


def _conf_net(p: argparse.ArgumentParser) -> None:
    with_card(p)
    p.add_argument("device", nargs="?", metavar="DEVICE", help="one net device (default: all)")
    p.add_argument("--link", choices=("up", "down"), help="set the link status first")
    p.add_argument("--json", action="store_true", help="print the raw result (for scripts)")


async def _suspend(client: Client, args: argparse.Namespace) -> int:
    await client.suspend()
    return EXIT_OK


async def _resume(client: Client, args: argparse.Namespace) -> int:
    await client.resume()
    return EXIT_OK


def _no_args(p: argparse.ArgumentParser) -> None:
    pass


for _sub in (
    Subcommand("status", "show cards (table, or --json)", _conf_status, _status),
    Subcommand("boot", "boot a card", _conf_boot, _boot),
    Subcommand("shutdown", "shut a card down", _conf_shutdown, _shutdown),
    Subcommand("reset", "reset a card", with_card, _reset),
    Subcommand("wait", "wait until a card is in a state", _conf_wait, _wait),
    Subcommand(
        "attach",
        "hot-add a device; prints its card name",
        _conf_attach,
        _attach,
        validate=attach_options,
    ),
    Subcommand("detach", "hot-remove a device", _conf_detach, _detach),
    Subcommand("stats", "per-queue counters", _conf_stats, _stats),
    Subcommand("net", "net devices: backend, addresses, namespace, counters", _conf_net, _net),
    Subcommand("suspend", "host suspend: stop every card", _no_args, _suspend),
    Subcommand("resume", "host resume: boot cards suspend stopped", _no_args, _resume),
    Subcommand("ping", "check that the daemon answers", _conf_ping, _ping),
):
    register_subcommand(_sub)
del _sub
