"""``micctl devices CARD``: each virtio device, its bound driver, state and error.

A table for people (``DEVICE NAME TYPE DRIVER STATE ERROR``; a claimed
device shows its holder in the ERROR column as ``claimed by ...``), the raw
list with ``--json``. Registers itself with
:func:`~mic_host.micctl.registry.register_subcommand`; imports the client
library and the output helpers only.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

from mic_host.client.connection import Client
from mic_host.micctl.output import format_table, print_json
from mic_host.micctl.registry import EXIT_OK, Subcommand, register_subcommand, with_card

__all__ = ["format_devices"]

_HELP = "the card's virtio devices: bound driver, state, probe error"


def format_devices(card: str, rows: Sequence[Mapping[str, Any]]) -> str:
    """The ``devices`` table, one row per device (``-`` where nothing is known)."""
    if not rows:
        return f"{card}: no devices"
    table = []
    for r in rows:
        note = r.get("error")
        if r.get("holder"):
            note = f"claimed by {r['holder']}" + (f"; {note}" if note else "")
        table.append(
            (r.get("device"), r.get("name"), r.get("type"), r.get("driver"), r.get("state"), note)
        )
    return format_table(("DEVICE", "NAME", "TYPE", "DRIVER", "STATE", "ERROR"), table)


def _configure(p: argparse.ArgumentParser) -> None:
    with_card(p)
    p.add_argument("--json", action="store_true", help="print the raw list (for scripts)")


async def _devices(client: Client, args: argparse.Namespace) -> int:
    rows = await client.card(args.card).devices()
    if args.json:
        print_json(rows)
    else:
        print(format_devices(args.card, rows))
    return EXIT_OK


register_subcommand(Subcommand("devices", _HELP, _configure, _devices))
