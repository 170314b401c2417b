"""``micctl reboot CARD... | --all``: bring cards down and boot them again.

As ``micctrl --reboot``: an online card is shut down (a booting, crashed or
reset_failed one reset), then booted; ``--wait`` waits until it is online
(:meth:`mic_host.client.CardClient.reboot`). Registered at import; imports
the client library, the registry and :mod:`mic_host.micctl.multi` only.
"""

from __future__ import annotations

import argparse

from mic_host.client.connection import Client
from mic_host.micctl.multi import for_each_card, require_cards, with_cards
from mic_host.micctl.registry import Subcommand, register_subcommand, with_timeout

__all__: list[str] = []


def _conf_reboot(p: argparse.ArgumentParser) -> None:
    with_cards(p)
    p.add_argument("--wait", action="store_true", help="until the card is online again")
    with_timeout(p)
    p.epilog = "--timeout bounds each step (shutdown or reset, then boot)."


async def _reboot(client: Client, args: argparse.Namespace) -> int:
    return await for_each_card(client, args, lambda c: c.reboot(args.wait, args.timeout))


register_subcommand(
    Subcommand(
        "reboot",
        "shut cards down (or reset them) and boot them again",
        _conf_reboot,
        _reboot,
        validate=require_cards,
    )
)
