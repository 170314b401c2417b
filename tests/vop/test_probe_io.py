"""Host VOP + card bus in one process: probe, block and console I/O, used ring placement."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from mic_card.drivers import BlockDevice, BlockIOError, ConsoleDevice
from mic_host.backends.block import BlockBackend
from mic_host.backends.console import ConsoleBackend
from tests.vop.rig import SMPT_BASE, Rig, names
from virtio.constants import BlkFeature, BlkReqType, BlkStatus, DeviceStatus, Feature
from virtio.devpage import Ctrl
from virtio.layouts import iter_device_page
from virtio.status import DevState

LIVE = DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK
LIVE |= DeviceStatus.DRIVER_OK


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
async def test_probe_reaches_driver_ok(rig: Rig, image: Path, tmp_path: Path) -> None:
    rig.add(BlockBackend(image, name="disk0"), ConsoleBackend(log_path=tmp_path / "c.log"))
    bus = await rig.boot()
    assert names(bus) == ["vda", "hvc0"]
    for dev in rig.vop.devices.values():
        assert dev.machine.state is DevState.LIVE
        assert dev.view.status == LIVE
        assert dev.features & Feature.VERSION_1
        assert dev.features & Feature.EVENT_IDX
        assert dev.features & Feature.INDIRECT_DESC
        assert dev.view.ctrl(Ctrl.H2C_VDEV_DB) >= 0
    info = {d["name"]: d for d in bus.devices()}
    assert info["vda"]["queue_sizes"] == [128]
    assert info["hvc0"]["queue_sizes"] == [64] * 6  # port 0, control, the agent's port
    assert info["vda"]["status"] == LIVE
    # the page the card parses is the page the host wrote
    types = [e.type for _, e in iter_device_page(rig.hp.host_ram[:4096])]
    assert types == [2, 3]
    assert bus.config_db == rig.vop.page.h2c_config_db


@pytest.mark.asyncio
async def test_unoffered_ack_refused(
    rig: Rig, image: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rig.add(BlockBackend(image))
    with caplog.at_level(logging.ERROR):
        bus = await rig.boot(extra_acks=1 << 40)  # RING_RESET, never offered
    await rig.settle()  # the card's FAILED write reaches the host
    assert names(bus) == []
    dev = rig.vop.device("block")
    assert not dev.view.status & DeviceStatus.FEATURES_OK
    assert dev.view.status & DeviceStatus.FAILED
    assert dev.machine.state is DevState.FAILED
    assert "not offered" in dev.machine.reason
    assert any("refused features" in r.getMessage() for r in caplog.records)
    assert all(ep.queue is None for ep in dev.endpoints)


@pytest.mark.asyncio
@pytest.mark.parametrize("used_in_card", [False, True], ids=["used-in-host", "used-in-card"])
async def test_block_round_trip(rig: Rig, image: Path, used_in_card: bool) -> None:
    rig.add(BlockBackend(image, serial="SER-123"))
    bus = await rig.boot(used_in_card=used_in_card)
    d = blk(rig)
    assert d.capacity == (1 << 20) // 512
    assert not d.read_only
    first = await d.read(3, 2)
    assert first[:8] == b"sector 3"
    assert first[512 : 512 + 8] == b"sector 4"
    payload = bytes(range(256)) * 4  # 2 sectors
    await d.write(10, payload)
    await d.flush()
    assert contents(image)[10 * 512 : 12 * 512] == payload
    assert await d.read(10, 2) == payload
    assert await d.get_id() == b"SER-123"
    # big request (worker thread path) and queue depth
    big = bytes([7]) * (128 * 512)
    await d.write(100, big)
    assert contents(image)[100 * 512 : 228 * 512] == big
    got = await d.read_many([(n, 1) for n in range(40)])
    assert [g[: len(f"sector {n}")] for n, g in enumerate(got)][:3] == [
        b"sector 0",
        b"sector 1",
        b"sector 2",
    ]
    assert all(g.startswith(f"sector {n}".encode()) for n, g in enumerate(got) if n not in (10, 11))
    dev = rig.vop.device("block")
    used_addr = dev.view.vq_used_address(0)
    assert (used_addr < SMPT_BASE) is used_in_card
    assert bus.devices()[0]["used_in_card"] is used_in_card
    # the card's heap holds nothing but the rings' parts once requests are done
    assert d.queue.outstanding == 0


@pytest.mark.asyncio
async def test_block_errors(rig: Rig, image: Path) -> None:
    rig.add(BlockBackend(image))
    await rig.boot()
    d = blk(rig)
    with pytest.raises(BlockIOError) as ei:
        await d.read(d.capacity - 1, 2)
    assert ei.value.status == BlkStatus.IOERR
    with pytest.raises(BlockIOError):
        await d.write(d.capacity, b"\0" * 512)
    with pytest.raises(BlockIOError):
        await d.read(1 << 60, 1)
    status, _ = await d.request(99)
    assert status == BlkStatus.UNSUPP
    status, _ = await d.request(BlkReqType.IN, 0, read_len=100)  # not whole sectors
    assert status == BlkStatus.IOERR
    status, _ = await d.request(BlkReqType.GET_ID, read_len=8)  # short id buffer
    assert status == BlkStatus.IOERR
    # still serving afterwards
    assert (await d.read(0, 1)).startswith(b"sector 0")
    be = rig.vop.device("block").backend
    assert isinstance(be, BlockBackend)
    assert be.io_errors >= 4
    assert be.unsupported == 1


@pytest.mark.asyncio
async def test_block_read_only(rig: Rig, image: Path) -> None:
    before = contents(image)
    rig.add(BlockBackend(image, read_only=True))
    await rig.boot()
    d = blk(rig)
    assert d.read_only
    assert rig.vop.device("block").features & BlkFeature.RO
    with pytest.raises(BlockIOError) as ei:
        await d.write(0, b"x" * 512)
    assert ei.value.status == BlkStatus.IOERR
    await d.flush()
    assert contents(image) == before


@pytest.mark.asyncio
@pytest.mark.parametrize("used_in_card", [False, True], ids=["used-in-host", "used-in-card"])
async def test_console_both_ways(rig: Rig, tmp_path: Path, used_in_card: bool) -> None:
    log_path = tmp_path / "console.log"
    backend = ConsoleBackend(log_path=log_path)
    rig.add(backend)
    await rig.boot(used_in_card=used_in_card)
    c = con(rig)
    await c.write(b"card booted\n")
    async with asyncio.timeout(5):
        await backend.wait_output(b"card booted\n")
        await backend.flush_log()  # the log is written off the loop
    assert contents(log_path) == b"card booted\n"
    await backend.write(b"ls /\n")
    async with asyncio.timeout(5):
        assert await c.readuntil(b"\n") == b"ls /\n"
    # more than one rx buffer's worth, and more than a tx chunk
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
        await backend.flush_log()
    assert contents(log_path).endswith(blob)


@pytest.mark.asyncio
async def test_stats_counters_move(rig: Rig, image: Path) -> None:
    rig.add(BlockBackend(image), ConsoleBackend())
    await rig.boot()
    before = rig.vop.stats()["devices"]["block"]["queues"][0]
    d = blk(rig)
    for n in range(5):
        await d.read(n, 1)
    await d.write(0, b"z" * 512)
    st = rig.vop.stats()
    q = st["devices"]["block"]["queues"][0]
    assert q["buffers"] - before["buffers"] == 6
    assert q["bytes_out"] >= 5 * 513
    assert q["bytes_in"] >= 512 + 16
    assert q["wakeups"] >= 1
    assert q["chains"] - before["chains"] == 6
    assert q["interrupts"] >= 1
    assert q["errors"] == 0
    assert st["devices"]["block"]["doorbells"] > 0
    # the backend's own counters ride along (block: requests, I/O errors, refusals)
    assert st["devices"]["block"]["backend"]["reads"] >= 5
    assert st["devices"]["block"]["backend"]["io_errors"] == 0
    card = rig.bus.devices()[0]["queues"][0] if rig.bus else {}
    assert card["completed"] == card["submitted"] >= 6
    import json

    json.dumps(st)  # plain data
