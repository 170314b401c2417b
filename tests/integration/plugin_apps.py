"""Card apps of the driver plug-in tests (run on the card OS by ``card.run``)."""

from __future__ import annotations

from mic_card.services import CardServices


async def bound_drivers(card: CardServices) -> dict[str, list[str | None]]:
    """Each device's name -> [the bound driver's registered name, its class]."""
    return {d["name"]: [d["driver"], d["driver_class"]] for d in card.devices()}


async def bind(card: CardServices, device: str, driver: str) -> str:
    """``card.bind(device, driver)``; the bound driver's class."""
    return type(await card.bind(device, driver)).__name__
