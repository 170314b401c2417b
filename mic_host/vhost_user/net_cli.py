"""``mic-vhost-user net``: MIC-VOP's net backend on a vhost-user socket, for QEMU's
``-netdev vhost-user``::

    mic-vhost-user net --socket /tmp/vu-net.sock --tap vu0 [--host-ip 10.0.2.1/24]
    mic-vhost-user net --socket /tmp/vu-net.sock --switch lan [--uplink vu0 --host-ip ...]
    mic-vhost-user net --socket /tmp/a.sock --socket /tmp/b.sock --switch lan

then, in QEMU::

    -object memory-backend-memfd,id=mem,size=512M,share=on -machine memory-backend=mem
    -chardev socket,id=vn,path=/tmp/vu-net.sock
    -netdev vhost-user,id=net0,chardev=vn -device virtio-net-pci,netdev=net0

``--switch NAME`` is a learning switch inside this process: each ``--socket``
(one guest each) is a port, ``--uplink TAP`` adds a host TAP as another (the
daemon's switches, shared with cards, are exported with ``micctl vhost-user
export``). Registered by :mod:`mic_host.vhost_user.cli`, which runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from typing import Any

from mic_host.backends.net import SwitchRegistry
from mic_host.vhost_user.net import NetVhostUserServer, build_net_backend
from virtio.errors import ConfigError

__all__ = ["add_net_parser", "run_net"]

log = logging.getLogger("mic_host.vhost_user")


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
    n.add_argument(
        "--socket",
        required=True,
        action="append",
        metavar="PATH",
        help="Unix socket to listen on; with --switch, repeat it for several guests on the switch",
    )
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


def _build(args: argparse.Namespace) -> list[NetVhostUserServer]:
    """One server per ``--socket``, each with its own port (or the one TAP).

    Raises:
        ConfigError: a backend cannot be set up (those built are closed again).
    """
    registry = SwitchRegistry()  # the --switch of this process
    servers: list[NetVhostUserServer] = []
    try:
        for i, sock in enumerate(args.socket):
            backend = build_net_backend(
                tap=args.tap,
                switch=args.switch,
                registry=registry,
                uplink=args.uplink if i == 0 else None,  # one uplink per switch
                host_ip=args.host_ip,
                mtu=args.mtu,
                name=sock,
            )
            servers.append(NetVhostUserServer(backend, sock))
    except ConfigError:
        for srv in servers:
            asyncio.run(srv.backend.aclose())
        raise
    return servers


async def _serve(servers: list[NetVhostUserServer], ready: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with contextlib.AsyncExitStack() as stack:
        for i, srv in enumerate(servers):
            try:
                await stack.enter_async_context(srv)
            except OSError as e:
                for later in servers[i:]:
                    await later.backend.aclose()
                raise OSError(f"cannot listen on {srv.path}: {e}") from e
        log.info("%s", ready)
        await stop.wait()
        log.info("signal received, stopping")


def run_net(args: argparse.Namespace) -> int:
    """``mic-vhost-user net``: serve until SIGTERM/SIGINT; the exit status."""
    if args.uplink is not None and args.switch is None:
        print("mic-vhost-user: --uplink needs --switch", file=sys.stderr)
        return 1
    if args.tap is not None and len(args.socket) > 1:
        print(
            "mic-vhost-user: --tap serves one --socket (one guest per TAP); "
            "several guests share a --switch",
            file=sys.stderr,
        )
        return 2
    os.umask(0o077)  # the sockets are the user's alone
    try:
        servers = _build(args)
    except ConfigError as e:
        print(f"mic-vhost-user: {e}", file=sys.stderr)
        return 1
    where = f"TAP {args.tap}" if args.tap else f"switch {args.switch}"
    if args.uplink:
        where += f" (uplink TAP {args.uplink})"
    try:
        asyncio.run(_serve(servers, f"ready: serving {where} on {', '.join(args.socket)}"))
    except OSError as e:
        print(f"mic-vhost-user: {e}", file=sys.stderr)
        return 1
    return 0
