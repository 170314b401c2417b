"""Card apps of the driver plug-in tests (run on the card OS by ``card.run``)."""

from __future__ import annotations

from mic_card.services import CardServices


async def bound_drivers(card: CardServices) -> dict[str, str | None]:
    """Each device's name -> the class of the driver bound to it."""
    return {d["name"]: d["driver"] for d in card.devices()}
