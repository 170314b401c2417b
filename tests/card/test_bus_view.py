"""``card.bus`` (:class:`mic_card.services.CardBus`) from a real card app: the
devices, the driver table, and waiting for the bus to change while the host
hot-adds a disk. A real daemon and card OS; the apps are below."""

from __future__ import annotations

import asyncio
import inspect
from pathlib import Path
from typing import Any

import pytest

from mic_card.services import CardServices
from mic_host.client import CardClient
from tests.integration.helpers import config
from virtio.errors import RemoteProtocolError


def app(fn: str) -> str:
    return f"{__name__}:{fn}"


# -- card apps ------------------------------------------------------------------------


async def bus_snapshot(card: CardServices) -> dict[str, Any]:
    bus = card.bus
    vda = bus.device("vda")
    return {
        "generation": bus.generation,
        "devices": [(d["name"], d["driver"], d["state"]) for d in bus.devices()],
        "defaults": {d["type"]: d["name"] for d in bus.drivers.info() if d["default"]},
        "blk": bus.drivers.default(2).name,
        "vda": [vda.info()["name"], vda.driver is card.device("vda")],
    }


async def bus_wait_changed(card: CardServices, seen: int) -> dict[str, Any]:
    async with asyncio.timeout(30):
        new = await card.bus.wait_changed(seen)
    return {"generation": new, "names": [d["name"] for d in card.bus.devices()]}


async def bus_unknown(card: CardServices) -> None:
    card.bus.device("nope")


# -- tests ----------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.mic_config(config())  # mic0: a console and a 1 MiB disk
async def test_an_app_lists_the_bus_and_waits_for_a_hot_added_disk(
    mic_card: CardClient, mic_state_dir: Path
) -> None:
    card = mic_card
    snap = (await card.run(app("bus_snapshot")))["value"]
    assert ["hvc0", "virtio-console", "live"] in snap["devices"]
    assert ["vda", "virtio-blk", "live"] in snap["devices"]
    assert snap["defaults"] == {"1": "virtio-net", "2": "virtio-blk", "3": "virtio-console"}
    assert snap["blk"] == "virtio-blk"
    assert snap["vda"] == ["vda", True]  # the bus device's driver is card.device()

    # the host hot-adds a disk after the app read the generation: waiting
    # from that generation returns (a change in between is not missed)
    await card.attach_block(mic_state_dir / "hot.img", size="1M", create=True)
    changed = (await card.run(app("bus_wait_changed"), snap["generation"]))["value"]
    assert changed["generation"] > snap["generation"]
    assert "vdb" in changed["names"]

    with pytest.raises(RemoteProtocolError, match="no device 'nope'"):
        await card.run(app("bus_unknown"))


def test_the_protocols_name_only_what_the_bus_has() -> None:
    """CardBus / DriverTable stay a view of VirtioBus / DriverRegistry (mypy checks the
    signatures where the card OS hands its Card to code typed CardServices)."""
    from mic_card.bus import DriverRegistry, VirtioBus
    from mic_card.card import Card
    from mic_card.services import CardBus, DriverTable

    for proto, impl in ((CardBus, VirtioBus), (DriverTable, DriverRegistry)):
        names = {n for n in vars(proto) if not n.startswith("_")}
        assert names, proto
        source = inspect.getsource(impl)  # attributes set in __init__ count too
        missing = {n for n in names if not hasattr(impl, n) and f"self.{n} = " not in source}
        assert missing == set(), impl
    assert isinstance(vars(Card)["bus"], property)
    assert "bus" in vars(CardServices)
