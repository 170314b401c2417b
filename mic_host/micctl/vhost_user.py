"""``micctl vhost-user export|unexport|list``: the daemon's vhost-user net sockets.

``export --switch NAME --socket PATH`` makes the daemon serve a vhost-user
socket as one more port of its switch ``NAME`` (the one its cards'
``backend = "switch"`` NICs use), so a QEMU guest started with ``-netdev
vhost-user`` on that socket shares an Ethernet segment with the cards.
``unexport --socket PATH`` stops it; ``list`` shows each export, whether a
front-end is connected, and its port's counters. Registered with
:func:`~mic_host.micctl.registry.register_subcommand`; imports the client
library and the output helpers only.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from typing import Any

from mic_host.client.connection import Client
from mic_host.micctl.output import format_table, print_json
from mic_host.micctl.registry import EXIT_OK, Subcommand, register_subcommand

__all__ = ["format_exports"]

_HELP = "serve vhost-user net sockets on the daemon's switches (QEMU guests meet cards)"


def format_exports(rows: Sequence[Mapping[str, Any]]) -> str:
    """The ``list`` table, one row per exported socket."""
    if not rows:
        return "no vhost-user exports"
    table = []
    for r in rows:
        c = r.get("counters") or {}
        table.append(
            (
                r.get("socket"),
                r.get("switch"),
                "yes" if r.get("connected") else "no",
                c.get("tx_packets"),
                c.get("rx_packets"),
                (c.get("rx_dropped") or 0) + (c.get("tx_dropped") or 0),
                r.get("dropped"),
            )
        )
    headers = ("SOCKET", "SWITCH", "CONNECTED", "FROM-GUEST", "TO-GUEST", "DROPS", "REFUSED")
    return format_table(headers, table)


def _absolute(path: str) -> str:
    """The daemon runs elsewhere: a relative socket path means one here."""
    return os.path.abspath(path)


def _configure(p: argparse.ArgumentParser) -> None:
    p.epilog = (
        "QEMU: -chardev socket,id=vn,path=PATH -netdev vhost-user,id=n0,chardev=vn "
        "-device virtio-net-pci,netdev=n0 (guest RAM shared: memory-backend-memfd,share=on). "
        "See docs/vhost-user.md."
    )
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    e = sub.add_parser("export", help="serve a socket on a switch", description=_HELP)
    e.add_argument("--switch", required=True, metavar="NAME", help="one of the daemon's switches")
    e.add_argument(
        "--socket",
        required=True,
        type=_absolute,
        metavar="PATH",
        help="Unix socket for QEMU's -chardev (made absolute here)",
    )
    e.add_argument("--mtu", type=int, default=1500, help="the port's MTU (default 1500)")
    e.add_argument("--json", action="store_true", help="print the export as JSON")
    u = sub.add_parser("unexport", help="stop serving a socket (its guest loses the link)")
    u.add_argument(
        "--socket", required=True, type=_absolute, metavar="PATH", help="the exported socket"
    )
    ls = sub.add_parser("list", help="the exported sockets, connection state, counters")
    ls.add_argument("--json", action="store_true", help="print the raw list (for scripts)")


async def _run(client: Client, args: argparse.Namespace) -> int:
    if args.action == "export":
        r = await client.vhost_user_export(args.socket, args.switch, args.mtu)
        if args.json:
            print_json(r)
        else:
            print(f"exporting switch {r['switch']} on {r['socket']}")
    elif args.action == "unexport":
        r = await client.vhost_user_unexport(args.socket)
        print(f"{r['socket']}: unexported")
    else:
        rows = (await client.vhost_user_exports())["exports"]
        if args.json:
            print_json(rows)
        else:
            print(format_exports(rows))
    return EXIT_OK


register_subcommand(Subcommand("vhost-user", _HELP, _configure, _run))
