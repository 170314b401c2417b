"""Driver code is user code: what it raises stays at the bus. And claims keep the ring checks.

In-process host VOP + card bus (:class:`tests.vop.rig.Rig`): a driver that
raises choosing features, on a config change or on detach; a claimed
device driven through the ring core, in both used-ring placements, and a
hostile used ring under a claim. The same behaviour through real processes
is in :mod:`tests.card.test_binding`.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest

from mic_card.bus import claim_device
from mic_card.drivers import DRIVERS, BlockDevice
from mic_host.backends.block import BlockBackend
from mic_host.backends.console import ConsoleBackend
from tests.vop.rig import Rig
from virtio.blk import REQ_HEADER, REQ_HEADER_SIZE
from virtio.constants import BlkReqType, DeviceStatus, DeviceType, Feature
from virtio.errors import BrokenResourceError, ClosedResourceError
from virtio.split import QueueBroken, RingError

BLOCK = int(DeviceType.BLOCK)


class PicksBadly(BlockDevice):
    @classmethod
    def supported_features(cls, dev: Any) -> int:
        raise KeyError("no such mode")


class ConfigBug(BlockDevice):
    def config_changed(self) -> None:
        raise RuntimeError("config bug")


class DetachBug(BlockDevice):
    def detach(self, exc: BrokenResourceError) -> None:
        super().detach(exc)
        raise RuntimeError("detach bug")


def by_name(rig: Rig) -> dict[str, dict[str, Any]]:
    assert rig.bus is not None
    return {d["name"]: d for d in rig.bus.devices()}


@pytest.mark.asyncio
async def test_raising_supported_features_fails_only_that_device(rig: Rig, image: Path) -> None:
    rig.add(BlockBackend(image, name="d0"), ConsoleBackend())
    await rig.boot(drivers=DRIVERS | {BLOCK: PicksBadly})
    await rig.settle()
    devs = by_name(rig)
    assert (devs["vda"]["state"], devs["vda"]["driver"]) == ("failed", None)
    assert devs["vda"]["error"] == (
        "driver virtio-blk raised KeyError choosing features: 'no such mode'"
    )
    assert devs["hvc0"]["state"] == "live"
    assert rig.vop.device("d0").view.status & DeviceStatus.FAILED  # the host was told


@pytest.mark.asyncio
async def test_raising_config_changed_is_answered_and_logged(rig: Rig, image: Path) -> None:
    rig.add(BlockBackend(image, name="d0"))
    bus = await rig.boot(drivers={BLOCK: ConfigBug})
    dev = rig.vop.device("d0")
    cfg = bytearray(dev.view.config)
    struct.pack_into("<Q", cfg, 0, 1000)
    await dev.update_config(bytes(cfg))  # guest_ack came back: no timeout
    assert by_name(rig)["vda"]["state"] == "live"
    await bus.rescan()  # the bus still scans


@pytest.mark.asyncio
async def test_raising_detach_does_not_stop_an_unbind(rig: Rig, image: Path) -> None:
    rig.add(BlockBackend(image, name="d0"))
    bus = await rig.boot(drivers={BLOCK: DetachBug})
    await bus.unbind("vda")
    assert by_name(rig)["vda"]["state"] == "unbound"
    await bus.bind("vda", BlockDevice)
    blk = bus.driver("vda")
    assert (await blk.read(0, 1)).startswith(b"sector 0")


async def _read_sector(q: Any, mem: Any, alloc: Any, sector: int) -> bytes:
    hdr, data, st = alloc(REQ_HEADER_SIZE), alloc(512), alloc(1)
    mem.view(hdr, REQ_HEADER_SIZE, True)[:] = REQ_HEADER.pack(BlkReqType.IN, sector)
    q.ring.add([(hdr, REQ_HEADER_SIZE)], [(data, 512), (st, 1)], sector)
    q.publish()
    token, length = await q.get_used()
    assert (token, length, mem.view(st, 1)[0]) == (sector, 513, 0)
    return bytes(mem.view(data, 512))


@pytest.mark.asyncio
@pytest.mark.parametrize("used_in_card", [False, True], ids=["used-in-host", "used-in-card"])
async def test_claim_drives_the_ring_core(rig: Rig, image: Path, used_in_card: bool) -> None:
    rig.add(BlockBackend(image, name="d0"))
    bus = await rig.boot(used_in_card=used_in_card)
    async with claim_device(bus, "vda", "a test") as dev:
        assert by_name(rig)["vda"]["holder"] == "a test"
        acked = await dev.negotiate(Feature.VERSION_1 | Feature.INDIRECT_DESC)
        assert acked == dev.offered_features & (Feature.VERSION_1 | Feature.INDIRECT_DESC)
        (q,) = await dev.setup_queues(indirect_max=4)
        assert q.indirect_max == 4
        await dev.driver_ok()
        for n in (0, 7, 3):
            got = await _read_sector(q, dev.memory, dev.alloc, n)
            assert got.startswith(f"sector {n}".encode())
        # start over in place: queues fail, negotiate again
        await dev.reset()
        with pytest.raises(BrokenResourceError, match="reset by its holder"):
            q.kick()
        await dev.negotiate(Feature.VERSION_1)
        (q2,) = await dev.setup_queues()
        await dev.driver_ok()
        assert (await _read_sector(q2, dev.memory, dev.alloc, 2)).startswith(b"sector 2")
    with pytest.raises(ClosedResourceError, match="claim of vda by a test has ended"):
        dev.read_config()
    assert (by_name(rig)["vda"]["state"], by_name(rig)["vda"]["driver"]) == ("live", "virtio-blk")
    assert (await bus.driver("vda").read(5, 1)).startswith(b"sector 5")


@pytest.mark.asyncio
async def test_a_hostile_used_ring_under_a_claim_raises(rig: Rig, image: Path) -> None:
    rig.add(BlockBackend(image, name="d0"))
    bus = await rig.boot(used_in_card=False)
    async with claim_device(bus, "vda", "a test") as dev:
        await dev.negotiate(Feature.VERSION_1)
        (q,) = await dev.setup_queues()
        await dev.driver_ok()
        # the "host" moves used.idx with nothing outstanding
        used = q.ring.layout.used
        dev.memory.view(used + 2, 2, True)[:] = (3).to_bytes(2, "little")
        with pytest.raises(RingError):
            await q.get_used()
        with pytest.raises(QueueBroken):
            await q.get_used()
    assert by_name(rig)["vda"]["state"] == "live"  # the release reset it
