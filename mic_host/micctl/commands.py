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
import sys
from typing import Any

from mic_host.client.connection import Client
from mic_host.lifecycle import CardState
from mic_host.micctl.images import prepare_block_image
from mic_host.micctl.multi import for_each_card, one_line, require_cards, with_cards
from mic_host.micctl.output import format_net, format_stats, format_status, print_json
from mic_host.micctl.registry import (
    EXIT_FAILED,
    EXIT_OK,
    Subcommand,
    UsageError,
    positive_int,
    register_subcommand,
    size,
    with_card,
    with_timeout,
)
from virtio.errors import LocalProtocolError, MicError

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
        "force_share": True if getattr(args, "force_share", False) else None,
        "ring": getattr(args, "ring", None),
        "backend": getattr(args, "backend", None),
        "socket": getattr(args, "socket", None),
        "data_path": getattr(args, "data_path", None),
        "dma_threshold": getattr(args, "dma_threshold", None),
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
    names = list(dict.fromkeys(args.cards))
    rc = EXIT_OK
    if args.all or len(names) <= 1:
        r = await client.status(names[0] if names else None)
    else:
        found = await asyncio.gather(*(client.status(n) for n in names), return_exceptions=True)
        cards: list[Any] = []
        for name, one in zip(names, found, strict=True):
            if isinstance(one, MicError):
                text = one_line(one)
                print(f"micctl: {text if name in text else f'{name}: {text}'}", file=sys.stderr)
                rc = EXIT_FAILED
            elif isinstance(one, BaseException):
                raise one
            else:
                cards.extend(one.get("cards") or [])
        r = {"cards": cards}
    if args.json:
        print_json(r)
    else:
        print(format_status(r))
    return rc


def _conf_status(p: argparse.ArgumentParser) -> None:
    with_cards(p, optional=True)
    p.add_argument("--json", action="store_true", help="print the raw result (for scripts)")


def _no_cards_with_all(args: argparse.Namespace) -> None:
    if args.all and args.cards:
        raise UsageError("status: give card names or --all, not both")


async def _boot(client: Client, args: argparse.Namespace) -> int:
    return await for_each_card(client, args, lambda c: c.boot(args.wait, args.timeout))


def _conf_boot(p: argparse.ArgumentParser) -> None:
    with_cards(p)
    p.add_argument("--wait", action="store_true", help="until the card is online")
    with_timeout(p)


async def _shutdown(client: Client, args: argparse.Namespace) -> int:
    return await for_each_card(client, args, lambda c: c.shutdown(args.wait, args.timeout))


def _conf_shutdown(p: argparse.ArgumentParser) -> None:
    with_cards(p)
    p.add_argument("--wait", action="store_true", help="until the card is ready")
    with_timeout(p)


async def _reset(client: Client, args: argparse.Namespace) -> int:
    return await for_each_card(client, args, lambda c: c.reset())


async def _wait(client: Client, args: argparse.Namespace) -> int:
    return await for_each_card(client, args, lambda c: c.wait(args.state, args.timeout))


def _conf_wait(p: argparse.ArgumentParser) -> None:
    with_cards(p)
    p.add_argument(
        "state", choices=[s.value for s in CardState], metavar="STATE", help="ready, online, ..."
    )
    with_timeout(p)


async def _attach(client: Client, args: argparse.Namespace) -> int:
    opts = attach_options(args)
    card = client.card(args.card)
    state = await card.state()
    if state not in (CardState.ONLINE, CardState.BOOTING) and not args.next_boot:
        # nothing would appear on the card: say so rather than print "None"
        raise LocalProtocolError(
            f"{args.card} is {state}, not running: nothing attached "
            "(boot it first, or add --next-boot to keep the device for its next boot)"
        )
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
    if r.get("device"):
        print(r["device"])
    elif state is CardState.BOOTING:
        print(f"{r.get('name')}: added; {args.card} is booting and names it when it binds")
    else:
        print(f"{r.get('name')}: added for {args.card}'s next boot")
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
        "--next-boot",
        action="store_true",
        help="the card is down: keep the device for its next boot (else refused)",
    )
    p.add_argument(
        "--force-share",
        action="store_true",
        help="block: attach even if another card, daemon or QEMU holds the image "
        "(image locks are skipped: only when the writers cannot collide)",
    )
    p.add_argument(
        "--ring",
        choices=("split", "packed"),
        help="any type: virtqueue layout offered to the card (default split; "
        "packed offers VIRTIO_F_RING_PACKED)",
    )
    p.add_argument(
        "--backend",
        choices=("file", "vhost-user"),
        help="block: who serves the disk: MIC-VOP from --image (file, the default) or an "
        "external vhost-user back-end on --socket (qemu-storage-daemon; docs/vhost-user.md)",
    )
    p.add_argument("--socket", metavar="PATH", help="block: the vhost-user back-end's socket")
    p.add_argument(
        "--data-path",
        choices=("cpu", "dma", "auto"),
        help="block: how request data moves: cpu (default), dma (the card's DMA engine "
        "through a host bounce buffer) or auto (DMA at or above --dma-threshold)",
    )
    p.add_argument(
        "--dma-threshold", type=size, metavar="SIZE", help="block: --data-path auto's threshold"
    )
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
    p.epilog = (
        "DOORBELLS: the card rings one doorbell per device. Per queue: WAKEUPS "
        "(doorbells that gave a waiting queue work), CHAINS (requests popped), "
        "BUFFERS (completions), INTERRUPTS (to the card), BYTES, ERRORS (ring "
        "faults). Then each backend's counters: block io_errors/unsupported/"
        "malformed and its data path (data_path, dma_requests, dma_bytes, dma_fallbacks: "
        "not 64 B-aligned, served by CPU; cpu_requests), "
        "console drops, net packets and drops by reason."
    )
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
    Subcommand(
        "status",
        "show cards (table, or --json)",
        _conf_status,
        _status,
        validate=_no_cards_with_all,
    ),
    Subcommand("boot", "boot cards", _conf_boot, _boot, validate=require_cards),
    Subcommand("shutdown", "shut cards down", _conf_shutdown, _shutdown, validate=require_cards),
    Subcommand("reset", "reset cards", with_cards, _reset, validate=require_cards),
    Subcommand(
        "wait", "wait until cards are in a state", _conf_wait, _wait, validate=require_cards
    ),
    Subcommand(
        "attach",
        "hot-add a device; prints its card name",
        _conf_attach,
        _attach,
        validate=attach_options,
    ),
    Subcommand("detach", "hot-remove a device", _conf_detach, _detach),
    Subcommand(
        "stats",
        "counters: doorbells per device, work per queue, the backends' errors and drops",
        _conf_stats,
        _stats,
    ),
    Subcommand("net", "net devices: backend, addresses, namespace, counters", _conf_net, _net),
    Subcommand("suspend", "host suspend: stop every card", _no_args, _suspend),
    Subcommand("resume", "host resume: boot cards suspend stopped", _no_args, _resume),
    Subcommand("ping", "check that the daemon answers", _conf_ping, _ping),
):
    register_subcommand(_sub)
del _sub
