"""VOP with the packed ring (VIRTIO_F_RING_PACKED), host VOP + card bus in one process.

A device added with ``packed=True`` (the ``ring = "packed"`` option) offers
RING_PACKED; the card's core acks it and both sides run
:mod:`virtio.packed` queues in the vring blocks the host allocated
(:func:`virtio.devpage.packed_vring`). The card's used-ring-in-card option
does not apply (a packed ring has no used ring), a card that moves one
anyway, or that writes a bad descriptor, gets DEVICE_NEEDS_RESET on that
device only, and a vdev reset brings the device back on a packed ring.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from pathlib import Path

import pytest

from mic_card.drivers import BlockDevice, ConsoleDevice
from mic_host.backends.block import BlockBackend
from mic_host.backends.console import ConsoleBackend
from tests.vop.rig import Rig
from virtio import packed, split
from virtio.constants import DeviceStatus, Feature
from virtio.devpage import Ctrl
from virtio.errors import BrokenResourceError
from virtio.status import DevState

#: packed descriptor flags (virtio 1.2 §2.8.1): AVAIL, USED
_AVAIL, _USED = 1 << 7, 1 << 15


def contents(path: Path) -> bytes:
    return path.read_bytes()


def blk(rig: Rig, name: str = "vda") -> BlockDevice:
    assert rig.bus is not None
    d = rig.bus.driver(name)
    assert isinstance(d, BlockDevice)
    return d


def con(rig: Rig, name: str = "hvc0") -> ConsoleDevice:
    assert rig.bus is not None
    d = rig.bus.driver(name)
    assert isinstance(d, ConsoleDevice)
    return d


@pytest.mark.asyncio
@pytest.mark.parametrize("used_in_card", [False, True], ids=["used-in-host", "used-in-card"])
async def test_packed_block_round_trip(
    rig: Rig, image: Path, tmp_path: Path, used_in_card: bool
) -> None:
    second = tmp_path / "second.img"
    second.write_bytes(bytes(1 << 16))
    rig.add(BlockBackend(image, name="d0"), packed=True)
    rig.add(BlockBackend(second, name="d1"))  # the default: split
    bus = await rig.boot(used_in_card=used_in_card)
    dev, other = rig.vop.device("d0"), rig.vop.device("d1")
    assert dev.offered & Feature.RING_PACKED
    assert dev.features & Feature.RING_PACKED
    assert not other.offered & Feature.RING_PACKED
    assert isinstance(dev.endpoints[0].queue, packed.DeviceQueue)
    assert isinstance(other.endpoints[0].queue, split.DeviceQueue)
    info = {d["name"]: d for d in bus.devices()}
    assert info["vda"]["ring"] == "packed"
    assert info["vdb"]["ring"] == "split"
    # a packed ring has no used ring: nothing moved, whatever the card's option
    assert info["vda"]["used_in_card"] is False
    assert info["vdb"]["used_in_card"] is used_in_card
    assert dev.view.vq_used_address(0) == dev.vrings[0].default_used
    assert rig.vop.stats()["devices"]["d0"]["ring"] == "packed"

    d = blk(rig)
    assert (await d.read(3, 1)).startswith(b"sector 3")
    payload = bytes(range(256)) * 4
    await d.write(10, payload)
    await d.flush()
    assert contents(image)[10 * 512 : 12 * 512] == payload
    assert await d.read(10, 2) == payload
    big = bytes([7]) * (128 * 512)  # more segments than fit one indirect table
    await d.write(100, big)
    assert contents(image)[100 * 512 : 228 * 512] == big
    # queue depth: more requests than the ring has slots, so the ring wraps
    got = await d.read_many([(n % 64, 1) for n in range(600)])
    assert all(g.startswith(f"sector {n % 64}".encode()) for n, g in enumerate(got) if n % 64 > 11)
    q = rig.vop.stats()["devices"]["d0"]["queues"][0]
    assert q["errors"] == 0
    assert q["buffers"] >= 600
    assert d.queue.outstanding == 0


@pytest.mark.asyncio
async def test_packed_console_both_ways(rig: Rig, tmp_path: Path) -> None:
    backend = ConsoleBackend(log_path=tmp_path / "console.log")
    rig.add(backend, packed=True)
    await rig.boot()
    assert rig.vop.device("console").features & Feature.RING_PACKED
    c = con(rig)
    await c.write(b"card booted\n")
    async with asyncio.timeout(5):
        await backend.wait_output(b"card booted\n")
    blob = bytes(range(97, 123)) * 400
    await backend.write(blob)
    got = bytearray()
    async with asyncio.timeout(5):
        while len(got) < len(blob):
            got += await c.read()
    assert bytes(got) == blob
    await c.write(blob)
    async with asyncio.timeout(5):
        await backend.wait_output(blob[-100:])


@pytest.mark.asyncio
async def test_packed_vdev_reset(rig: Rig, image: Path) -> None:
    rig.add(BlockBackend(image, name="d0"), packed=True)
    bus = await rig.boot()
    d = blk(rig)
    await d.write(1, b"a" * 512)
    heap = rig.cp.heap.free_bytes
    assert await bus.reset_device("vda") is not None
    dev = rig.vop.device("d0")
    assert dev.machine.state is DevState.LIVE
    assert isinstance(dev.endpoints[0].queue, packed.DeviceQueue)
    with pytest.raises(BrokenResourceError):
        await d.read(0, 1)
    d2 = blk(rig)
    assert await d2.read(1, 1) == b"a" * 512
    await d2.write(2, b"b" * 512)
    assert contents(image)[1024:1536] == b"b" * 512
    assert rig.cp.heap.free_bytes == heap


@pytest.mark.asyncio
async def test_packed_bad_descriptor_needs_reset_only_that_device(
    rig: Rig, image: Path, caplog: pytest.LogCaptureFixture
) -> None:
    con_be = ConsoleBackend()
    rig.add(BlockBackend(image, name="d0"), con_be, packed=True)
    bus = await rig.boot()
    d = blk(rig)
    await d.read(0, 1)
    dq = d.queue.queue
    assert isinstance(dq, packed.DriverQueue)
    vr = rig.vop.device("d0").vrings[0]
    # the next slot the driver would fill, made available with a buffer id
    # the ring cannot have (ids are < the ring size)
    slot, wrap = dq._next_avail, dq._avail_wrap
    flags = _AVAIL if wrap else _USED
    struct.pack_into("<QIHH", rig.hp.host_ram, vr.offset + 16 * slot, 0x1000, 512, 999, flags)
    with caplog.at_level(logging.ERROR):
        rig.vop.on_doorbell(rig.vop.device("d0").c2h_db)
        await rig.settle()
    dev = rig.vop.device("d0")
    assert dev.view.status & DeviceStatus.DEVICE_NEEDS_RESET
    assert dev.machine.state is DevState.NEEDS_RESET
    assert "buffer id" in dev.last_error
    with pytest.raises(BrokenResourceError):
        await d.read(1, 1)
    assert bus.device("vda").state == "needs_reset"
    # the other device carries on
    await con(rig).write(b"still alive\n")
    async with asyncio.timeout(5):
        await con_be.wait_output(b"still alive\n")
    # the card recovers the device with a vdev reset, on a packed ring again
    await bus.reset_device("vda")
    d2 = blk(rig)
    assert (await d2.read(4, 1)).startswith(b"sector 4")
    assert dev.machine.state is DevState.LIVE
    assert isinstance(dev.endpoints[0].queue, packed.DeviceQueue)


@pytest.mark.asyncio
async def test_packed_used_ring_move_refused(rig: Rig, image: Path) -> None:
    """A card that acks RING_PACKED and then asks the host to follow a moved used ring."""
    rig.add(BlockBackend(image, name="d0"), packed=True)
    dev = rig.vop.device("d0")
    v = dev.view
    S = DeviceStatus
    for st in (S.ACKNOWLEDGE, S.ACKNOWLEDGE | S.DRIVER):
        v.status = st
        rig.vop.on_doorbell(dev.c2h_db)
    v.guest_acks = dev.offered
    v.status = S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK
    rig.vop.on_doorbell(dev.c2h_db)
    assert v.status & S.FEATURES_OK
    v.set_vq_used_address(0, 0x2000)  # card RAM: fine for a split ring
    v.set_ctrl(Ctrl.USED_ADDRESS_UPDATED, 1)
    rig.vop.on_doorbell(dev.c2h_db)
    assert v.ctrl(Ctrl.USED_ADDRESS_UPDATED) == 0  # the card is not left waiting
    assert v.status & S.DEVICE_NEEDS_RESET
    assert "packed" in dev.last_error
