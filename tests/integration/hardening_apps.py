"""Card apps for :mod:`tests.integration.test_daemon_hardening` (run inside ``mic-card``)."""

from __future__ import annotations

import asyncio

from mic_card.card import Card

#: tasks started by :func:`hold_shutdown` (kept so they are not collected)
_HELD: set[asyncio.Task[None]] = set()


async def hold_shutdown(card: Card, seconds: float) -> float:
    """Make the card's next orderly shutdown take about ``seconds``.

    A task the shutdown does not cancel (it is not an app) holds the card OS's
    accelerator lock, which the shutdown takes before it closes the bus.
    """
    os_ = card._os
    taken = asyncio.Event()

    async def hold() -> None:
        async with os_._accel_lock:
            taken.set()
            await asyncio.sleep(seconds)

    task = asyncio.get_running_loop().create_task(hold())
    _HELD.add(task)
    task.add_done_callback(_HELD.discard)
    await taken.wait()
    return seconds
