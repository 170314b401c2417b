"""``micctl console``: a card's console from the command line.

``console`` relays this terminal to the card console's pty
(:func:`mic_host.client.terminal.attach`); ``exec`` lives in
:mod:`mic_host.micctl.execute`. Registered at import; imports the client
library and the registry only.
"""

from __future__ import annotations

import argparse

from mic_host.client.connection import Client
from mic_host.client.terminal import attach
from mic_host.micctl.registry import Subcommand, register_subcommand, with_card

__all__: list[str] = []


def _conf_console(p: argparse.ArgumentParser) -> None:
    with_card(p)
    p.add_argument("--device", metavar="NAME", help="console device (default: the first)")
    p.add_argument(
        "--print-path", action="store_true", help="print the console's pty path and exit"
    )


async def _console(client: Client, args: argparse.Namespace) -> int:
    card = client.card(args.card)
    path = await card.console_path(args.device)
    if args.print_path:
        print(path)
        return 0

    async def resize(cols: int, rows: int) -> None:
        await card.console_resize(cols, rows, args.device)

    return await attach(card.name, path, resize)


register_subcommand(
    Subcommand(
        "console",
        "attach this terminal to a card console (Ctrl-] detaches)",
        _conf_console,
        _console,
    )
)
