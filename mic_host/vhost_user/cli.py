"""``mic-vhost-user``: serve one MIC-VOP backend on a vhost-user socket, without any card.

The way ``qemu-storage-daemon --export type=vhost-user-blk`` does::

    mic-vhost-user blk --socket /tmp/vhost.sock --image disk.img [--read-only]
                       [--serial S] [--queues N] [--queue-size N]

then, in QEMU::

    -object memory-backend-memfd,id=mem,size=512M,share=on -machine memory-backend=mem
    -chardev socket,id=vu,path=/tmp/vhost.sock
    -device vhost-user-blk-pci,chardev=vu,num-queues=N

``mic-vhost-user net --socket PATH (--tap NAME | --switch NAME)`` serves the
net backend to ``-netdev vhost-user`` (:mod:`mic_host.vhost_user.net_cli`).

It serves until SIGTERM or SIGINT; the socket is listening before the
``ready`` line is logged (on stderr), so a script may wait for that line.
Exit status: 0 after a signal, 1 when the backend or the socket cannot be set
up (the message says why), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from mic_host.backends.block import MAX_QUEUES, BlockBackend
from mic_host.config.limits import BLOCK_QUEUE_SIZE
from mic_host.vhost_user.net_cli import add_net_parser, run_net
from mic_host.vhost_user.server import VRING_MAX, VhostUserServer
from virtio.errors import ConfigError

__all__ = ["main"]

log = logging.getLogger("mic_host.vhost_user")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mic-vhost-user",
        description="Serve a MIC-VOP backend to a vhost-user front-end (QEMU) on a Unix socket.",
    )
    p.add_argument(
        "--log-level",
        default="info",
        metavar="LEVEL",
        help="debug, info (default), warning or error",
    )
    sub = p.add_subparsers(dest="kind", required=True, metavar="KIND")
    b = sub.add_parser(
        "blk",
        help="a virtio-blk disk backed by a raw image (QEMU: -device vhost-user-blk-pci)",
        description="Serve a raw image as a virtio-blk device. It may be restarted (even "
        "after kill -9) under a running guest whose QEMU chardev has reconnect=N: the "
        "requests it had taken are resubmitted (INFLIGHT_SHMFD).",
    )
    b.add_argument(
        "--log-level",
        default=argparse.SUPPRESS,
        metavar="LEVEL",
        help="debug, info, warning or error",
    )
    b.add_argument("--socket", required=True, metavar="PATH", help="Unix socket to listen on")
    b.add_argument("--image", required=True, metavar="FILE", help="raw image file or block device")
    b.add_argument("--read-only", action="store_true", help="offer a read-only disk")
    b.add_argument("--serial", default=None, help="GET_ID answer (at most 20 bytes)")
    b.add_argument(
        "--queues",
        type=int,
        default=1,
        metavar="N",
        help=f"request queues, 1..{MAX_QUEUES} (QEMU: num-queues=N; default 1)",
    )
    b.add_argument(
        "--queue-size",
        type=int,
        default=BLOCK_QUEUE_SIZE,
        metavar="N",
        help=f"smallest ring the front-end may set up; seg_max is derived from it "
        f"(QEMU: queue-size, default {BLOCK_QUEUE_SIZE})",
    )
    add_net_parser(sub)
    return p


async def _serve(server: VhostUserServer, ready: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        log.info("%s", ready)
        await stop.wait()
        log.info("signal received, stopping")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = getattr(logging, str(args.log_level).upper(), None)
    if not isinstance(level, int):
        print(f"mic-vhost-user: --log-level {args.log_level!r} is not a level", file=sys.stderr)
        return 2
    logging.basicConfig(level=level, format="mic-vhost-user: %(levelname)s %(message)s")
    if args.kind == "net":
        return run_net(args)
    qs = args.queue_size
    if qs < 4 or qs > VRING_MAX or qs & (qs - 1):
        print(
            f"mic-vhost-user: --queue-size {qs}: a power of two in 4..{VRING_MAX}", file=sys.stderr
        )
        return 2
    os.umask(0o077)  # the socket (and a created file) are the user's alone
    try:
        backend = BlockBackend(
            args.image,
            name="vhost-user-blk",
            read_only=args.read_only,
            serial=args.serial,
            num_queues=args.queues,
            queue_size=qs,
            label="",
        )
    except ConfigError as e:
        print(f"mic-vhost-user: {e}", file=sys.stderr)
        return 1
    server = VhostUserServer(backend, args.socket, queue_size=qs)
    ready = f"ready: serving {args.image} on {args.socket} ({args.queues} queue(s) of >= {qs})"
    try:
        asyncio.run(_serve(server, ready))
    except OSError as e:
        print(f"mic-vhost-user: cannot listen on {args.socket}: {e}", file=sys.stderr)
        asyncio.run(backend.aclose())
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
