"""Inflight I/O tracking (INFLIGHT_SHMFD): the region's bookkeeping and its refusals.

The first tests drive :class:`InflightRegion` and its tracked queue directly
on a real split ring (a :class:`DriverQueue` on flat memory) through two
"lives" of a back-end sharing one region: what the first took and did not
complete is handed out again by the second, oldest first, before anything
new, and a publication torn by the first's death is repaired (the head the
used ring shows completed is not resubmitted). The last ones go through the
real server on a socket: GET_INFLIGHT_FD hands out a region that the
requests then keep in step, and a region of the wrong size drops only that
connection with an error naming it.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from mic_host.backends.block import BlockBackend
from mic_host.vhost_user import VhostUserServer
from mic_host.vhost_user.inflight import InflightRegion, TrackedQueue, queue_region_size
from tests.vhost_user.frontend import FrontEnd
from tests.vhost_user.test_server import IMAGE, SERIAL, short_dir  # noqa: F401
from transport.vhost_user import ProtocolFeature, Request
from transport.vhost_user.protocol import INFLIGHT, INFLIGHT_DESC, INFLIGHT_HDR, U64
from virtio.constants import BlkReqType, BlkStatus
from virtio.errors import RemoteProtocolError
from virtio.memory import FlatMemory
from virtio.split import DeviceQueue, DriverQueue, QueueState, SplitLayout

SIZE = 8
LAYOUT = SplitLayout.contiguous(0, SIZE)
DATA = 0x4000


@pytest.fixture
def ring() -> Iterator[tuple[FlatMemory, DriverQueue[int], InflightRegion]]:
    mem = FlatMemory(0x10000)
    drv: DriverQueue[int] = DriverQueue(mem, LAYOUT, 0)
    mm = mmap.mmap(-1, queue_region_size(SIZE))
    region = InflightRegion(mm, 1, SIZE)
    yield mem, drv, region
    region.close()


def _state(base: int) -> QueueState:
    """What SET_VRING_BASE gives after a back-end died: QEMU's base is ``used.idx``."""
    return QueueState(LAYOUT, base, base, False, False, True, ())


def _add(drv: DriverQueue[int], token: int) -> int:
    head = drv.add([], [(DATA + 64 * token, 1)], token)
    drv.publish()
    return head


def _used_idx(mem: FlatMemory) -> int:
    return int.from_bytes(mem.view(LAYOUT.used + 2, 2), "little")


def test_first_start_initialises_the_region(
    ring: tuple[FlatMemory, DriverQueue[int], InflightRegion],
) -> None:
    mem, drv, region = ring
    q = region.start_queue(0, mem, _state(0))
    _, version, desc_num, _, used = INFLIGHT_HDR.unpack_from(region._mm, 0)
    assert (version, desc_num, used) == (1, SIZE, 0)
    head = _add(drv, 1)
    chain = q.pop()
    assert chain is not None
    assert chain.head == head
    assert INFLIGHT_DESC.unpack_from(region._mm, INFLIGHT_HDR.size + 16 * head)[0] == 1
    q.add_used(head, 1)
    q.publish_used()
    assert INFLIGHT_DESC.unpack_from(region._mm, INFLIGHT_HDR.size + 16 * head)[0] == 0
    _, _, _, last, used = INFLIGHT_HDR.unpack_from(region._mm, 0)
    assert (last, used) == (head, 1)


def test_restart_resubmits_in_counter_order_before_new_requests(
    ring: tuple[FlatMemory, DriverQueue[int], InflightRegion],
) -> None:
    mem, drv, region = ring
    first = region.start_queue(0, mem, _state(0))
    popped = []
    for token in range(4):
        _add(drv, token)
    for _ in range(4):
        chain = first.pop()
        assert chain is not None
        popped.append(chain.head)
    # the first two complete; the driver reuses their descriptors for two more
    for head in popped[:2]:
        first.add_used(head, 1)
    first.publish_used()
    assert [drv.get_used(), drv.get_used()] == [(0, 1), (1, 1)]
    _add(drv, 4)
    _add(drv, 5)
    for _ in range(2):
        chain = first.pop()
        assert chain is not None
        popped.append(chain.head)
    # the back-end dies here: popped[2:] were taken and never completed;
    # the reused heads have lower numbers but later counters
    assert sorted(popped[2:]) != popped[2:]
    newest = _add(drv, 6)  # made available while no back-end was there
    second = region.start_queue(0, mem, _state(_used_idx(mem)))
    assert second.resubmitting == 4
    assert second.next_avail == (2 + 4)  # used.idx plus the requests in flight
    again = [second.pop() for _ in range(4)]
    assert [c.head for c in again if c is not None] == popped[2:]
    nxt = second.pop()
    assert nxt is not None
    assert nxt.head == newest
    assert second.pop() is None
    for c in [*again, nxt]:
        assert c is not None
        second.add_used(c.head, 1)
    second.publish_used()
    assert sorted(t for t, _ in drv.get_used_many()) == [2, 3, 4, 5, 6]


def test_a_torn_publication_is_not_resubmitted(
    ring: tuple[FlatMemory, DriverQueue[int], InflightRegion],
) -> None:
    mem, drv, region = ring
    first = region.start_queue(0, mem, _state(0))
    a, b = _add(drv, 0), _add(drv, 1)
    assert [c.head for c in first.pop_many() if c is not None] == [a, b]
    first.add_used(a, 1)
    # died between storing used.idx and clearing the entry: the guest saw ``a`` done
    DeviceQueue.publish_used(first)
    assert INFLIGHT_DESC.unpack_from(region._mm, INFLIGHT_HDR.size + 16 * a)[0] == 1
    second = region.start_queue(0, mem, _state(_used_idx(mem)))
    assert second.resubmitting == 1
    assert second.repaired == 1
    chain = second.pop()
    assert chain is not None
    assert chain.head == b
    assert second.pop() is None
    _, _, _, _, used = INFLIGHT_HDR.unpack_from(region._mm, 0)
    assert used == 1


def test_a_corrupt_region_is_refused(
    ring: tuple[FlatMemory, DriverQueue[int], InflightRegion],
) -> None:
    mem, _, region = ring
    region.start_queue(0, mem, _state(0))
    region._mm[INFLIGHT_HDR.size + 16 * 3] = 7
    with pytest.raises(RemoteProtocolError, match="inflight entry 3 is corrupt"):
        region.start_queue(0, mem, _state(0))
    INFLIGHT_HDR.pack_into(region._mm, 0, 0, 1, 16, 0, 0)
    with pytest.raises(RemoteProtocolError, match="describes 16 descriptors, the ring has 8"):
        region.start_queue(0, mem, _state(0))


# -- through the server -----------------------------------------------------------------


@pytest_asyncio.fixture
async def server(short_dir: Path) -> AsyncIterator[VhostUserServer]:  # noqa: F811
    image = short_dir / "disk.img"
    image.write_bytes(os.urandom(IMAGE))
    backend = BlockBackend(image, name="vu", serial=SERIAL, label="")
    async with VhostUserServer(backend, short_dir / "vu.sock", queue_size=128) as srv:
        yield srv


@pytest.mark.asyncio
async def test_requests_keep_the_region_in_step(server: VhostUserServer) -> None:
    fe = await FrontEnd.connect(server.path)
    try:
        await fe.negotiate(protocol=int(ProtocolFeature.INFLIGHT_SHMFD))
        size, fd = await fe.get_inflight()
        assert size == queue_region_size(128) == os.fstat(fd).st_size
        await fe.call_(Request.SET_INFLIGHT_FD, INFLIGHT.pack(size, 0, 1, 128), (fd,))
        await fe.start()
        data = os.urandom(4096)
        status, _ = await fe.blk(BlkReqType.OUT, 8, data)
        assert status == BlkStatus.OK
        vring = server.vrings[0]
        assert isinstance(vring.queue, TrackedQueue)
        region = mmap.mmap(fd, size)
        _, version, desc_num, _, used = INFLIGHT_HDR.unpack_from(region, 0)
        assert (version, desc_num, used) == (1, 128, 1)
        assert not any(region[INFLIGHT_HDR.size + 16 * h] for h in range(128))
        region.close()
        os.close(fd)
    finally:
        fe.close()
    assert server.backend.path.read_bytes()[8 * 512 : 8 * 512 + 4096] == data  # type: ignore[attr-defined]


@pytest.mark.asyncio
@pytest.mark.parametrize("case", ["size", "file"])
async def test_a_region_of_the_wrong_size_drops_only_that_connection(
    server: VhostUserServer, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    fe = await FrontEnd.connect(server.path)
    try:
        await fe.negotiate(protocol=int(ProtocolFeature.INFLIGHT_SHMFD))
        size, fd = await fe.get_inflight()
        if case == "size":
            payload = INFLIGHT.pack(size // 2, 0, 1, 128)
        else:
            os.ftruncate(fd, size // 2)
            payload = INFLIGHT.pack(size, 0, 1, 128)
        with caplog.at_level(logging.ERROR, logger="mic_host.vhost_user"):
            await fe.send(Request.SET_INFLIGHT_FD, payload, (fd,))
            ack = await fe.ch.receive(expect_reply=True)
            assert ack is not None
            assert U64.unpack(ack.payload)[0] != 0
            assert await fe.closed_by_peer()
        os.close(fd)
    finally:
        fe.close()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    want = "region of" if case == "size" else "the file holds"
    assert any("SET_INFLIGHT_FD" in m and want in m for m in errors), errors
    assert server.dropped == 1
    # the next front-end is served, with a region of the right size
    fe = await FrontEnd.connect(server.path)
    try:
        await fe.negotiate(protocol=int(ProtocolFeature.INFLIGHT_SHMFD))
        size, fd = await asyncio.wait_for(fe.get_inflight(), 10)
        await fe.call_(Request.SET_INFLIGHT_FD, INFLIGHT.pack(size, 0, 1, 128), (fd,))
        os.close(fd)
        await fe.start()
        status, _ = await fe.blk(BlkReqType.IN, 0, in_len=512)
        assert status == BlkStatus.OK
    finally:
        fe.close()
