"""``micctl events`` and ``micctl logs``: the daemon's event stream and a card's logs.

``events [CARD] [--kind K]... [--json]`` prints one line per event as it
happens (JSON lines with ``--json``, QMP-shaped) until interrupted (exit 130).
``logs CARD [--console|--host] [-n N] [--follow]`` prints the card's console
log and the daemon's log lines about the card; ``--follow`` goes on until the
card goes down or Ctrl-C. A closed stdout (``| head``) ends either with
status 141, as a shell pipeline expects. Registered at import; imports the
client library, the events vocabulary and the registry only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from mic_host.client.connection import Client
from mic_host.events import CATEGORIES, DEFAULT_FEED, KINDS, MAX_FEED
from mic_host.micctl.registry import (
    EXIT_PIPE,
    Subcommand,
    UsageError,
    card_name,
    positive_int,
    register_subcommand,
    with_card,
)

__all__: list[str] = []

_KINDS = sorted(CATEGORIES | KINDS.keys())


def _kind(text: str) -> str:
    if text not in KINDS and text not in CATEGORIES:
        raise argparse.ArgumentTypeError(
            f"unknown event kind {text!r} (kinds: {', '.join(_KINDS)})"
        )
    return text


def _buffer(text: str) -> int:
    n = positive_int(text)
    if n > MAX_FEED:
        raise argparse.ArgumentTypeError(f"at most {MAX_FEED}: {text!r}")
    return n


def _conf_events(p: argparse.ArgumentParser) -> None:
    p.epilog = (
        "Events: booting, online, shutting_down, ready, resetting, reset_failed, crashed "
        "(state); device_added (also, with boot=True, for each device a card finds at boot, "
        "just before its online), device_removed, device_needs_reset (device); link_up, "
        "link_down (net); app_started, app_ended (app); error; events_lost. Each has a "
        "card, data fields, a wall-clock timestamp, a monotonic time and a sequence number. "
        "Runs until Ctrl-C (exit 130); exit 1 when the daemon stops."
    )
    p.add_argument(
        "card", nargs="?", type=card_name, metavar="CARD", help="only this card (default: all)"
    )
    p.add_argument(
        "--kind",
        action="append",
        type=_kind,
        metavar="K",
        help="only events named K or of category K (state, device, net, app, error); repeatable",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line (QMP-shaped)")
    p.add_argument(
        "--buffer",
        type=_buffer,
        default=DEFAULT_FEED,
        metavar="N",
        help=f"events the daemon holds if this reader falls behind (default {DEFAULT_FEED}; "
        "then the oldest are dropped and an events_lost line says how many)",
    )


def _pipe_closed() -> int:
    # stdout's reader is gone: no more output, and no error at exit flushing it
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_PIPE


async def _events(client: Client, args: argparse.Namespace) -> int:
    try:
        async with client.events(args.card, args.kind, buffer=args.buffer) as evs:
            while (ev := await evs.next_event()) is not None:
                if args.json:
                    print(json.dumps(ev.to_wire(), sort_keys=True), flush=True)
                else:
                    print(ev.describe(), flush=True)
    except BrokenPipeError:
        return _pipe_closed()
    return 0


def _conf_logs(p: argparse.ArgumentParser) -> None:
    p.epilog = (
        "Host lines are the daemon's log lines about this card (the last 1000 are kept); "
        "with both sources they are prefixed [host]. --follow ends when the card goes "
        "down (exit 0), on Ctrl-C (exit 130), or when the daemon stops (exit 1)."
    )
    with_card(p)
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--console", dest="source", action="store_const", const="console",
        help="only the card's console log (STATE_DIR/CARD-console.log, rotated to .1)",
    )  # fmt: skip
    which.add_argument(
        "--host", dest="source", action="store_const", const="host",
        help="only the daemon's log lines about the card",
    )  # fmt: skip
    p.set_defaults(source="all")
    p.add_argument(
        "-n", "--lines", type=int, default=50, metavar="N",
        help="recent lines to show first, per source (default 50; 0: none)",
    )  # fmt: skip
    p.add_argument(
        "-f", "--follow", action="store_true",
        help="then print new lines as they come, until the card goes down (or Ctrl-C)",
    )  # fmt: skip
    p.add_argument("--device", metavar="NAME", help="console device (default: the first)")


async def _logs(client: Client, args: argparse.Namespace) -> int:
    out = sys.stdout
    both = args.source == "all"
    at_start = True
    try:
        async with client.card(args.card).logs(
            source=args.source, lines=args.lines, follow=args.follow, device=args.device
        ) as logs:
            while (item := await logs.next_item()) is not None:
                if item.get("source") == "console":
                    text = str(item.get("text", ""))
                    out.write(text)
                    at_start = text.endswith("\n") if text else at_start
                elif "lost" in item:
                    out.write(f"{'' if at_start else chr(10)}[host] ({item['lost']} lines lost)\n")
                    at_start = True
                else:
                    prefix = "[host] " if both else ""
                    out.write(f"{'' if at_start else chr(10)}{prefix}{item.get('line')}\n")
                    at_start = True
                out.flush()
    except BrokenPipeError:
        return _pipe_closed()
    return 0


def _check_logs(args: argparse.Namespace) -> None:
    if args.lines < 0:
        raise UsageError("logs: --lines must be 0 or more")


register_subcommand(
    Subcommand(
        "events",
        "print the daemon's events (state changes, devices, links, apps, errors) as they happen",
        _conf_events,
        _events,
    )
)
register_subcommand(
    Subcommand(
        "logs",
        "print a card's console log and the daemon's log lines about it (--follow: keep going)",
        _conf_logs,
        _logs,
        validate=_check_logs,
    )
)
