"""Hot add/remove, config change, vdev reset, card reset, and a hostile card."""

from __future__ import annotations

import asyncio
import logging
import struct
from pathlib import Path

import pytest

from mic_card.bus import VirtioBus
from mic_card.drivers import BlockDevice, ConsoleDevice
from mic_host.backends.block import BlockBackend
from mic_host.backends.console import ConsoleBackend
from mic_host.endpoint import EndpointState
from mic_host.vop import VopDeviceState, vring_info_offset
from tests.vop.rig import Rig, names
from virtio.constants import DeviceStatus, DeviceType
from virtio.devpage import Ctrl
from virtio.errors import (
    BrokenResourceError,
    ClosedResourceError,
    LocalProtocolError,
    MicTimeoutError,
    RemoteProtocolError,
)
from virtio.handshake import CardState
from virtio.layouts import iter_device_page
from virtio.status import DevState


def contents(path: Path) -> bytes:
    return path.read_bytes()


def drv(rig: Rig, name: str) -> object:
    assert rig.bus is not None
    return rig.bus.driver(name)


async def block_of(rig: Rig, name: str = "vda") -> BlockDevice:
    d = drv(rig, name)
    assert isinstance(d, BlockDevice)
    return d


# -- hot add / remove ------------------------------------------------------------


@pytest.mark.asyncio
async def test_hot_add(rig: Rig, image: Path, tmp_path: Path) -> None:
    rig.add(ConsoleBackend())
    bus = await rig.boot()
    assert names(bus) == ["hvc0"]
    other = tmp_path / "b.img"
    rig.add(BlockBackend(image, name="d0"))
    rig.vop.add_device(BlockBackend(other, name="d1", create=True, size=64 * 1024))
    async with asyncio.timeout(5):
        await bus.wait_device("vdb")
    assert names(bus) == ["hvc0", "vda", "vdb"]
    d1 = await block_of(rig, "vdb")
    assert d1.capacity == 128
    await d1.write(5, b"q" * 512)
    assert other.read_bytes()[5 * 512 : 6 * 512] == b"q" * 512


@pytest.mark.asyncio
async def test_hot_remove(rig: Rig, image: Path) -> None:
    # single-port console: no MULTIPORT handshake still allocating after boot
    rig.add(BlockBackend(image, name="d0"), ConsoleBackend(multiport=False))
    bus = await rig.boot()
    free_before = rig.vop.alloc.free_bytes
    d = await block_of(rig)
    c = drv(rig, "hvc0")
    assert isinstance(c, ConsoleDevice)
    reader = asyncio.create_task(c.read())  # waits on posted rx buffers
    heap_before = rig.cp.heap.free_bytes
    dev = rig.vop.device("d0")
    await rig.vop.remove_device("d0")
    assert dev.state is VopDeviceState.REMOVED
    assert dev.view.device_type == DeviceType.REMOVED
    assert names(bus) == ["hvc0"]
    with pytest.raises(BrokenResourceError):
        await d.read(0, 1)
    with pytest.raises(LocalProtocolError):
        bus.device("vda")
    assert rig.vop.alloc.free_bytes > free_before
    assert rig.cp.heap.free_bytes >= heap_before
    assert all(ep.state is EndpointState.CLOSED for ep in dev.endpoints)
    # the console is untouched; then remove it too: its pending read fails cleanly
    await rig.vop.remove_device("console")
    with pytest.raises(BrokenResourceError):
        await asyncio.wait_for(reader, 5)
    assert names(bus) == []
    # the slots are reusable
    rig.add(BlockBackend(image, name="again"))
    async with asyncio.timeout(5):
        await bus.wait_device("vda")
    again = await block_of(rig, "vda")
    assert (await again.read(2, 1)).startswith(b"sector 2")


@pytest.mark.asyncio
async def test_hot_remove_card_never_acks(rig: Rig, image: Path) -> None:
    rig.add(BlockBackend(image, name="d0"))
    await rig.boot()
    rig.hp.connected = False  # the card stops hearing doorbells
    with pytest.raises(MicTimeoutError):
        await rig.vop.remove_device("d0", ack_timeout=0.3)
    st = rig.vop.stats()
    assert st["zombies"] == ["d0"]
    assert "d0" not in st["devices"]
    zombie_ram = rig.vop.alloc.free_bytes
    # the card "reboots": a host-side reset reclaims the zombie
    await rig.vop.reset_all()
    assert rig.vop.stats()["zombies"] == []
    assert rig.vop.alloc.free_bytes > zombie_ram


@pytest.mark.asyncio
async def test_remove_before_card_listens(rig: Rig, image: Path) -> None:
    rig.add(BlockBackend(image, name="d0"))
    await rig.vop.remove_device("d0")  # nobody listening: no handshake
    assert rig.vop.devices == {}
    assert [e.removed for _, e in iter_device_page(rig.hp.host_ram[:4096])] == [True]


# -- config change ---------------------------------------------------------------


@pytest.mark.asyncio
async def test_config_change(rig: Rig, image: Path) -> None:
    rig.add(BlockBackend(image, name="d0"))
    await rig.boot()
    d = await block_of(rig)
    dev = rig.vop.device("d0")
    cfg = bytearray(dev.view.config)
    struct.pack_into("<Q", cfg, 0, 1000)
    await dev.update_config(bytes(cfg))
    assert d.config_changes == 1
    assert d.capacity == 1000
    assert dev.view.ctrl(Ctrl.CONFIG_CHANGE) == 0
    assert dev.view.ctrl(Ctrl.GUEST_ACK) == 0
    with pytest.raises(LocalProtocolError):
        await dev.update_config(b"short")
    rig.hp.connected = False
    rig.vop.config_timeout = 0.3
    with pytest.raises(MicTimeoutError):
        await dev.update_config(bytes(cfg))
    assert dev.view.ctrl(Ctrl.CONFIG_CHANGE) == 0


# -- resets ----------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("used_in_card", [False, True], ids=["used-in-host", "used-in-card"])
async def test_vdev_reset_handshake(rig: Rig, image: Path, used_in_card: bool) -> None:
    rig.add(BlockBackend(image, name="d0"))
    bus = await rig.boot(used_in_card=used_in_card)
    d = await block_of(rig)
    await d.write(1, b"a" * 512)
    heap = rig.cp.heap.free_bytes
    new = await bus.reset_device("vda")
    assert new is not None
    assert new.name == "vda"
    dev = rig.vop.device("d0")
    assert dev.resets == 1
    assert dev.machine.state is DevState.LIVE
    assert dev.view.ctrl(Ctrl.VDEV_RESET) == 0
    assert dev.view.ctrl(Ctrl.HOST_ACK) == 1
    with pytest.raises(BrokenResourceError):
        await d.read(0, 1)  # the old driver object is dead
    d2 = await block_of(rig)
    assert d2 is not d
    assert await d2.read(1, 1) == b"a" * 512
    await d2.write(2, b"b" * 512)
    assert contents(image)[1024:1536] == b"b" * 512
    assert rig.cp.heap.free_bytes == heap  # the old rings' card memory was returned


@pytest.mark.asyncio
async def test_card_refuses_a_bad_host_ack(rig: Rig, image: Path) -> None:
    """The card half's peer check reaches the bus: RemoteProtocolError, not a 2 s timeout."""
    rig.add(BlockBackend(image, name="d0"))
    bus = await rig.boot()
    cdev = bus.device("vda")
    rig.cp.connected = False  # the host never hears the reset request
    task = asyncio.create_task(bus.reset_device("vda"))
    await rig.settle()
    cdev.view.set_ctrl(Ctrl.HOST_ACK, 2)
    bus.on_doorbell(cdev.h2c_db)
    async with asyncio.timeout(1):
        with pytest.raises(RemoteProtocolError, match="host_ack 2"):
            await task
    assert cdev.hs.state is CardState.IDLE  # the adapter stopped waiting cleanly


@pytest.mark.asyncio
async def test_config_change_cancelled_clears_the_fields(rig: Rig, image: Path) -> None:
    rig.add(BlockBackend(image, name="d0"))
    await rig.boot()
    dev = rig.vop.device("d0")
    rig.hp.connected = False  # the card never hears of it
    task = asyncio.create_task(dev.update_config(dev.view.config))
    await rig.settle()
    assert dev.view.ctrl(Ctrl.CONFIG_CHANGE) == 2
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert dev.view.ctrl(Ctrl.CONFIG_CHANGE) == 0
    assert not dev.hs.config_pending


def test_bus_takes_its_driver_table_from_the_caller(rig: Rig) -> None:
    with pytest.raises(TypeError):
        VirtioBus(rig.cp)  # type: ignore[call-arg]


@pytest.mark.asyncio
async def test_card_reset_then_reboot(rig: Rig, image: Path, tmp_path: Path) -> None:
    con_be = ConsoleBackend()
    rig.add(BlockBackend(image, name="d0"), con_be)
    old = await rig.boot(used_in_card=True)
    d = await block_of(rig)
    await d.write(3, b"1" * 512)
    # the card dies
    rig.hp.connected = rig.cp.connected = False
    await old.aclose()
    await rig.vop.reset_all()
    for dev in rig.vop.devices.values():
        assert dev.machine.status == 0
        assert dev.view.status == 0
        assert dev.view.ctrl(Ctrl.H2C_VDEV_DB) == -1
        assert all(ep.state is EndpointState.IDLE for ep in dev.endpoints)
    assert rig.vop.page.h2c_config_db == -1
    # and boots again
    bus = await rig.boot()
    assert names(bus) == ["vda", "hvc0"]
    d2 = await block_of(rig)
    assert await d2.read(3, 1) == b"1" * 512
    c = drv(rig, "hvc0")
    assert isinstance(c, ConsoleDevice)
    await c.write(b"second boot\n")
    async with asyncio.timeout(5):
        await con_be.wait_output(b"second boot\n")


# -- a hostile or broken card ----------------------------------------------------------


def _avail(rig: Rig, name: str) -> tuple[int, int]:
    """(host RAM offset of the avail ring, queue size) of queue 0."""
    vr = rig.vop.device(name).vrings[0]
    return vr.offset + 16 * vr.num, vr.num


@pytest.mark.asyncio
@pytest.mark.parametrize("fault", ["avail-jump", "head-out-of-range"])
async def test_garbage_ring_needs_reset_only_that_device(
    rig: Rig, image: Path, fault: str, caplog: pytest.LogCaptureFixture
) -> None:
    con_be = ConsoleBackend()
    rig.add(BlockBackend(image, name="d0"), con_be)
    bus = await rig.boot()
    d = await block_of(rig)
    await d.read(0, 1)
    ram = rig.hp.host_ram
    off, num = _avail(rig, "d0")
    idx = struct.unpack_from("<H", ram, off + 2)[0]
    with caplog.at_level(logging.ERROR):
        if fault == "avail-jump":
            # a card that moves avail.idx 1000 ahead and kicks
            struct.pack_into("<H", ram, off + 2, (idx + 1000) & 0xFFFF)
            rig.vop.on_doorbell(rig.vop.device("d0").c2h_db)
            await rig.settle()
            with pytest.raises(BrokenResourceError):
                await d.read(1, 1)
        else:
            # a request is outstanding when its avail slot is overwritten with
            # a head out of range: the host refuses, the card's request fails
            pending = asyncio.create_task(d.read(1, 1))
            await asyncio.sleep(0)
            assert d.queue.outstanding == 1  # added, not yet published
            struct.pack_into("<H", ram, off + 4 + 2 * (idx % num), 999)
            with pytest.raises(BrokenResourceError):
                await asyncio.wait_for(pending, 5)
    dev = rig.vop.device("d0")
    assert dev.view.status & DeviceStatus.DEVICE_NEEDS_RESET
    assert dev.machine.state is DevState.NEEDS_RESET
    assert rig.vop.stats()["devices"]["d0"]["errors"] >= 1
    assert bus.device("vda").state == "needs_reset"
    assert any("needs reset" in r.getMessage() for r in caplog.records)
    # the console carries on
    c = drv(rig, "hvc0")
    assert isinstance(c, ConsoleDevice)
    await c.write(b"still alive\n")
    async with asyncio.timeout(5):
        await con_be.wait_output(b"still alive\n")
    # and the card recovers the broken device with a vdev reset
    await bus.reset_device("vda")
    d2 = await block_of(rig)
    assert (await d2.read(4, 1)).startswith(b"sector 4")
    assert dev.machine.state is DevState.LIVE


@pytest.mark.asyncio
async def test_illegal_status_write(rig: Rig, image: Path) -> None:
    rig.add(BlockBackend(image, name="d0"))
    await rig.boot()  # not used by the card after this: we poke by hand
    dev = rig.vop.device("d0")
    dev.view.status = DeviceStatus.ACKNOWLEDGE  # clears bits without a reset
    rig.vop.on_doorbell(dev.c2h_db)
    assert dev.view.status & DeviceStatus.DEVICE_NEEDS_RESET
    assert dev.machine.state is DevState.NEEDS_RESET
    assert all(ep.state is EndpointState.BROKEN for ep in dev.endpoints)
    with pytest.raises(BrokenResourceError):
        dev.endpoints[0].get_nowait()


@pytest.mark.asyncio
async def test_bad_used_address(rig: Rig, image: Path) -> None:
    rig.add(BlockBackend(image, name="d0"))
    dev = rig.vop.device("d0")
    v = dev.view
    S = DeviceStatus
    for st in (S.ACKNOWLEDGE, S.ACKNOWLEDGE | S.DRIVER):
        v.status = st
        rig.vop.on_doorbell(dev.c2h_db)
    v.set_vq_used_address(0, 0xDEAD_0000_0000)  # nowhere
    v.set_ctrl(Ctrl.USED_ADDRESS_UPDATED, 1)
    rig.vop.on_doorbell(dev.c2h_db)
    assert v.ctrl(Ctrl.USED_ADDRESS_UPDATED) == 0  # the card is not left waiting
    assert v.status & S.DEVICE_NEEDS_RESET
    assert "unreachable" in dev.last_error


@pytest.mark.asyncio
async def test_garbage_entries_are_skipped(
    rig: Rig, image: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rig.add(BlockBackend(image, name="d0"), ConsoleBackend())
    # corrupt the block device's vring magic, and append an entry with bad dims
    vr = rig.vop.device("d0").vrings[0]
    magic_at = vr.offset + vring_info_offset(vr.num) + 4
    rig.hp.host_ram[magic_at : magic_at + 4] = b"\xde\xad\xbe\xef"
    end = max(d.view.offset + d.view.size for d in rig.vop.devices.values())
    rig.hp.host_ram[end : end + 8] = bytes([2, 99, 8, 0, 0, 0, 0, 0])  # num_vq 99
    with caplog.at_level(logging.ERROR):
        bus = await rig.boot()
    # the failed device stays listed, with its error; the console is bound
    states = [(d["name"], d["state"], d["driver"]) for d in bus.devices()]
    assert states == [("vda", "failed", None), ("hvc0", "live", "virtio-console")]
    assert "vring magic" in bus.devices()[0]["error"]
    msgs = " | ".join(r.getMessage() for r in caplog.records)
    assert "vring magic" in msgs
    assert "num_vq 99" in msgs
    dev = rig.vop.device("d0")
    assert dev.machine.state is DevState.FAILED or dev.view.status & DeviceStatus.FAILED
    # a rescan does not retry the same broken entry forever
    scans = bus.scans
    rig.vop.on_doorbell(0)
    caplog.clear()
    await bus.rescan()
    assert bus.scans == scans + 1
    assert [d["state"] for d in bus.devices()] == ["failed", "live"]
    assert "vring magic" not in " | ".join(r.getMessage() for r in caplog.records)


@pytest.mark.asyncio
async def test_bad_magic_boot_page(rig: Rig) -> None:
    rig.hp.host_ram[0:4] = b"\0\0\0\0"
    from virtio.errors import RemoteProtocolError

    with pytest.raises(RemoteProtocolError):
        await rig.boot()
    rig.bus = None


@pytest.mark.asyncio
async def test_endpoint_get_raises_on_reset_and_close(rig: Rig, image: Path) -> None:
    """A backend's pending get() sees BrokenResourceError on reset, Closed on removal."""
    rig.add(ConsoleBackend())
    await rig.boot()
    dev = rig.vop.device("console")
    ep = dev.endpoints[1]  # tx: nothing pending (rx has the card's posted buffers)
    waiter = asyncio.create_task(ep.get())
    await rig.settle()
    dev.stop_queues(EndpointState.IDLE, "test reset")
    with pytest.raises(BrokenResourceError):
        await asyncio.wait_for(waiter, 2)
    dev.stop_queues(EndpointState.CLOSED, "test close")
    with pytest.raises(ClosedResourceError):
        await ep.get()


@pytest.mark.asyncio
async def test_used_ring_in_host_ram_refused(rig: Rig, image: Path) -> None:
    rig.add(BlockBackend(image, name="d0"))
    dev = rig.vop.device("d0")
    v = dev.view
    S = DeviceStatus
    for st in (S.ACKNOWLEDGE, S.ACKNOWLEDGE | S.DRIVER):
        v.status = st
        rig.vop.on_doorbell(dev.c2h_db)
    v.set_vq_used_address(0, rig.hp.host_ram_bus)  # over the device page
    v.set_ctrl(Ctrl.USED_ADDRESS_UPDATED, 1)
    rig.vop.on_doorbell(dev.c2h_db)
    assert v.status & S.DEVICE_NEEDS_RESET
    assert "host RAM" in dev.last_error
    assert rig.hp.host_ram[:4] == (0xC0FFEE00).to_bytes(4, "little")
