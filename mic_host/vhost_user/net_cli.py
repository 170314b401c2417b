"""``mic-vhost-user net``: MIC-VOP's net backend on a vhost-user socket, for QEMU's
``-netdev vhost-user``::

    mic-vhost-user net --socket /tmp/vu-net.sock --tap vu0 [--host-ip 10.0.2.1/24]
    mic-vhost-user net --socket /tmp/vu-net.sock --switch lan [--uplink vu0 --host-ip ...]

then, in QEMU::

    -object memory-backend-memfd,id=mem,size=512M,share=on -machine memory-backend=mem
    -chardev socket,id=vn,path=/tmp/vu-net.sock
    -netdev vhost-user,id=net0,chardev=vn -device virtio-net-pci,netdev=net0

``--switch NAME`` is a learning switch inside this process: the guest is one
port, ``--uplink TAP`` adds a host TAP as another (the daemon's switches,
shared with cards, are exported with ``micctl vhost-user export``). Registered
by :mod:`mic_host.vhost_user.cli`, which runs it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from mic_host.vhost_user.net import NetVhostUserServer, build_net_backend
from virtio.errors import ConfigError

__all__ = ["add_net_parser", "build_net_server"]


def add_net_parser(sub: Any) -> None:
    """Add the ``net`` subcommand to ``mic-vhost-user``'s subparsers."""
    n = sub.add_parser(
        "net",
        help="a virtio-net NIC on a host TAP or a switch (QEMU: -netdev vhost-user)",
        description="Serve MIC-VOP's virtio-net backend to QEMU's -netdev vhost-user. "
        "One queue pair; the guest's MAC is QEMU's (-device virtio-net-pci,mac=...).",
    )
    n.add_argument(
        "--log-level",
        default=argparse.SUPPRESS,
        metavar="LEVEL",
        help="debug, info, warning or error",
    )
    n.add_argument("--socket", required=True, metavar="PATH", help="Unix socket to listen on")
    where = n.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--tap",
        metavar="NAME",
        help="create host TAP NAME; the guest's frames go to the host's stack (needs root)",
    )
    where.add_argument(
        "--switch",
        metavar="NAME",
        help="a learning switch in this process, the guest one port of it (no privileges)",
    )
    n.add_argument(
        "--uplink",
        metavar="TAP",
        help="with --switch: a host TAP as one more port of the switch (needs root)",
    )
    n.add_argument(
        "--host-ip",
        metavar="ADDR/LEN",
        help="the address of the host's TAP (--tap or --uplink), e.g. 10.0.2.1/24",
    )
    n.add_argument("--mtu", type=int, default=1500, help="MTU, 68..65535 (default 1500)")


def build_net_server(args: argparse.Namespace) -> tuple[NetVhostUserServer, str] | None:
    """The server and its ready line for parsed ``net`` arguments; None (after
    printing why) when the backend cannot be set up."""
    if args.uplink is not None and args.switch is None:
        print("mic-vhost-user: --uplink needs --switch", file=sys.stderr)
        return None
    try:
        backend = build_net_backend(
            tap=args.tap,
            switch=args.switch,
            uplink=args.uplink,
            host_ip=args.host_ip,
            mtu=args.mtu,
        )
    except ConfigError as e:
        print(f"mic-vhost-user: {e}", file=sys.stderr)
        return None
    where = f"TAP {args.tap}" if args.tap else f"switch {args.switch}"
    if args.uplink:
        where += f" (uplink TAP {args.uplink})"
    return NetVhostUserServer(backend, args.socket), f"ready: serving {where} on {args.socket}"
