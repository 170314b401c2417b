"""``mic-card``: the card OS process (spawned by the host daemon at boot).

Takes the host's per-card control link (``--link-fd``: the card end of the
socket pair the daemon created and handed to this process, the only way a
daemon's card is reached; ``--socket``: a path a host listens on), boots the card OS
(:class:`mic_card.card.CardOS`) and exits with its shutdown status reported.
``--no-console-multiport`` (or ``MIC_CARD_CONSOLE_MULTIPORT=0`` in the
environment, e.g. through the card's ``card_command = ["env", ...]``) makes
the console driver leave VIRTIO_CONSOLE_F_MULTIPORT unacked: port 0 only,
no agent.

Exit codes: 0 orderly shutdown, 1 the card OS crashed, 2 boot refused (bad
link, handshake or boot parameters), 3 the link to the host was lost.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import sys

from mic_card.card import CardOS, DmesgHandler
from transport import NotifyMode, NotifyPolicy, PcieCard, eventloop
from transport.errors import HandshakeError, LinkLost
from transport.messages import Crashed, ShutdownStatusReport, encode
from transport.tracing import install_from_env as install_trace
from virtio.errors import BrokenResourceError, MicError, MicTimeoutError

__all__ = ["main"]

#: The interrupt pump's vector sleeps on its eventfd at once: a spin inside the
#: task would hold the loop while the requests it just completed are ready to
#: resume; the loop polls before it sleeps instead (``transport.spinloop``).
PUMP_NOTIFY = NotifyPolicy(NotifyMode.EVENTFD)

log = logging.getLogger("mic_card")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mic-card", description="The MIC-VOP card OS process.")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--link-fd",
        type=int,
        metavar="FD",
        help="the control link: an inherited, connected socket (what the daemon passes)",
    )
    where.add_argument("--socket", help="the control link: a socket path a host listens on")
    p.add_argument("--card", default=None, help="expected card name (refuse another)")
    p.add_argument(
        "--app",
        action="append",
        default=[],
        metavar="MODULE:FUNCTION",
        help="run async def FUNCTION(card) at boot (repeatable)",
    )
    p.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    p.add_argument(
        "--no-console-multiport",
        dest="console_multiport",
        action="store_false",
        default=os.environ.get("MIC_CARD_CONSOLE_MULTIPORT", "1").strip().lower()
        not in ("0", "no", "false", "off"),
        help="do not ack VIRTIO_CONSOLE_F_MULTIPORT (port 0 only, no agent); "
        "default from $MIC_CARD_CONSOLE_MULTIPORT",
    )
    return p


async def _amain(args: argparse.Namespace, dmesg: DmesgHandler) -> int:
    try:
        link: str | socket.socket = args.socket
        if args.link_fd is not None:
            try:
                link = socket.socket(fileno=args.link_fd)
            except OSError as e:
                raise LinkLost(f"fd {args.link_fd} is not the host's link: {e}") from e
        async with PcieCard.connect(link, expect_card=args.card, notify=PUMP_NOTIFY) as pc:
            os_ = CardOS(
                pc, apps=tuple(args.app), dmesg=dmesg, console_multiport=args.console_multiport
            )
            try:
                status = await os_.run()
                await pc.link.send(encode(ShutdownStatusReport(status)))
            except BrokenResourceError as e:
                log.error("%s: link to the host lost: %s", os_.name, e)
                return 3
            except MicError as e:
                log.error("%s: card OS crashed: %s", os_.name, e)
                with contextlib.suppress(MicError):
                    await pc.link.send(encode(Crashed(str(e))))
                return 1
            log.info("%s: %s", os_.name, status)
            return 0
    except (HandshakeError, MicTimeoutError) as e:
        log.error("boot refused: %s", e)
        return 2
    except LinkLost as e:
        log.error("no host: %s", e)
        return 3


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    dmesg = DmesgHandler()
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s {args.card or 'card'} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger().addHandler(dmesg)
    install_trace("card")
    try:
        return eventloop.run(_amain(args, dmesg))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
