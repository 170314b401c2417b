"""Lifecycle subcommands over several cards: ``CARD...`` or ``--all``, one line per card.

``boot``, ``shutdown``, ``reset``, ``wait``, ``reboot`` and ``status`` take
any number of cards or ``--all`` (every card of the daemon). The operations
run concurrently; each card's result is printed in the order the cards were
given (``mic0: online``), each failure as one ``micctl: ...`` line on stderr,
and the exit status is 1 if any card failed. With a single card a failure
is raised as before (one line, exit 1). Imports the client library and the
registry only.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from mic_host.client.connection import CardClient, Client
from mic_host.micctl.output import print_state
from mic_host.micctl.registry import EXIT_FAILED, EXIT_OK, UsageError, card_name
from virtio.errors import MicError

__all__ = ["card_names", "for_each_card", "one_line", "require_cards", "with_cards"]


def with_cards(p: argparse.ArgumentParser, *, optional: bool = False) -> None:
    """``CARD...`` and ``--all`` (see :func:`require_cards`)."""
    p.add_argument(
        "cards", nargs="*", type=card_name, metavar="CARD", help="card names, e.g. mic0 mic1"
    )
    p.add_argument(
        "--all",
        action="store_true",
        help="every card of the daemon" + (" (the default)" if optional else ""),
    )


def require_cards(args: argparse.Namespace) -> None:
    """``validate`` hook: cards or ``--all``, not both, not neither.

    Raises:
        UsageError: neither or both were given.
    """
    if args.all and args.cards:
        raise UsageError(f"{args.command}: give card names or --all, not both")
    if not args.all and not args.cards:
        raise UsageError(f"{args.command} needs a card (e.g. mic0) or --all")


def one_line(e: BaseException) -> str:
    text = " | ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return text or type(e).__name__


async def card_names(client: Client, args: argparse.Namespace) -> list[str]:
    """The cards given (duplicates dropped, order kept), or every card for ``--all``."""
    if args.all or not args.cards:
        cards = (await client.status()).get("cards") or []
        return [str(c["name"]) for c in cards if isinstance(c, Mapping) and "name" in c]
    return list(dict.fromkeys(args.cards))


async def for_each_card(
    client: Client,
    args: argparse.Namespace,
    op: Callable[[CardClient], Awaitable[Mapping[str, Any]]],
    show: Callable[[str, Mapping[str, Any]], None] = print_state,
) -> int:
    """Run ``op`` on every selected card at once; ``show`` each result in order.

    Raises:
        MicError: the single selected card failed (several: reported per card).
    """
    names = await card_names(client, args)
    if len(names) == 1 and not args.all:
        show(names[0], await op(client.card(names[0])))
        return EXIT_OK
    results = await asyncio.gather(*(op(client.card(n)) for n in names), return_exceptions=True)
    status = EXIT_OK
    for name, r in zip(names, results, strict=True):
        if isinstance(r, MicError):
            text = one_line(r)
            print(f"micctl: {text if name in text else f'{name}: {text}'}", file=sys.stderr)
            status = EXIT_FAILED
        elif isinstance(r, BaseException):
            raise r
        else:
            show(name, r)
    sys.stdout.flush()
    return status
