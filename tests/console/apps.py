"""Card apps of the console tests (run inside ``mic-card`` with ``micctl run``)."""

from __future__ import annotations

import asyncio
from typing import Any

from mic_card.agent import AGENT_PORT
from mic_card.card import Card


async def control_garbage(card: Card) -> int:
    """Send malformed messages on the console's control transmitq (a buggy driver)."""
    con = card.device("hvc0")
    bad = [
        b"\x01\x02",  # short
        (99).to_bytes(4, "little") + (6).to_bytes(2, "little") + b"\x01\x00",  # port 99
        (0).to_bytes(4, "little") + (4).to_bytes(2, "little") + b"\x01\x00",  # a device event
        bytes(range(40)),  # long
    ]
    for msg in bad:
        con.send_control_raw(msg)
    await asyncio.sleep(0.1)
    return len(bad)


async def agent_garbage(card: Card) -> int:
    """Write lines on the agent port that are not agent answers."""
    port = card.device("hvc0").port(AGENT_PORT)
    await port.write(b'not json at all\n{"id": 424242, "ok": true, "result": {}}\n[1]\n')
    return 3


async def hang_agent(card: Card) -> str:
    """Make the card agent accept requests and never answer them."""
    agent = card.agent
    assert agent is not None

    async def never(req: dict[str, Any]) -> Any:
        await asyncio.Event().wait()

    agent._handle = never  # type: ignore[method-assign]
    return "hung"


async def console_info(card: Card) -> dict[str, Any]:
    """The console driver's ports and their counters (``irq_echoed``...)."""
    info = card.device("hvc0").info()
    assert isinstance(info, dict)
    return info
