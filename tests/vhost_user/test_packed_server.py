"""The vhost-user back-end with the packed ring, against a small Python front-end.

The front-end acks VIRTIO_F_RING_PACKED and drives a
:class:`virtio.packed.DriverQueue` on the shared memfd: SET_VRING_ADDR names
the descriptor ring and the two event areas, SET_VRING_BASE / GET_VRING_BASE
carry both positions with their wrap counters (vhost-user.rst: bit 15 of each
16-bit half). Requests round-trip with every byte checked in the image, across
ring laps and across a stop/restart at the base the back-end returned; a base
the back-end cannot resume from drops that connection with a clear error.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from mic_host.backends.block import BlockBackend
from mic_host.vhost_user import VhostUserServer
from mic_host.vhost_user.packed import decode_base
from tests.vhost_user.frontend import GPA, INDIRECT, RING, UVA, FrontEnd
from transport.vhost_user import Request
from transport.vhost_user.protocol import U64, VRING_ADDR, VRING_STATE, encode_mem_table
from virtio import packed
from virtio.constants import BlkReqType, BlkStatus, Feature
from virtio.errors import RemoteProtocolError

IMAGE = 1 << 20
SIZE = 128
PACKED = int(Feature.RING_PACKED)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="vu-", dir="/tmp"))  # AF_UNIX paths: 108 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest_asyncio.fixture
async def server(short_dir: Path) -> AsyncIterator[VhostUserServer]:
    image = short_dir / "disk.img"
    image.write_bytes(os.urandom(IMAGE))
    backend = BlockBackend(image, name="vu", serial="vu", label="")
    async with VhostUserServer(backend, short_dir / "vu.sock", queue_size=SIZE) as srv:
        yield srv


def _image(srv: VhostUserServer) -> bytes:
    backend = srv.backend
    assert isinstance(backend, BlockBackend)
    return backend.path.read_bytes()


def _base(pos: int, wrap: int) -> int:
    """The packed SET/GET_VRING_BASE value with both positions at ``pos`` of lap ``wrap``."""
    half = pos | wrap << 15
    return half | half << 16


class Packed:
    """The front-end's packed ring: its layout, the driver queue and one request at a time."""

    def __init__(self, fe: FrontEnd, features: int) -> None:
        self.fe = fe
        self.layout = packed.PackedLayout.contiguous(GPA + RING, SIZE)
        self.queue: packed.DriverQueue[int] = packed.DriverQueue(
            fe.mem, self.layout, features, indirect_area=GPA + INDIRECT, indirect_max=4
        )

    def ring_addr(self) -> bytes:
        to_uva = UVA - GPA
        lay = self.layout
        # vhost-user.rst: desc, then the device area in the "used" field and the
        # driver area in the "avail" field
        return VRING_ADDR.pack(0, 0, lay.desc + to_uva, lay.device + to_uva, lay.driver + to_uva, 0)

    async def start(self, base: int) -> None:
        fe = self.fe
        await fe.call_(Request.SET_VRING_NUM, VRING_STATE.pack(0, SIZE))
        await fe.call_(Request.SET_VRING_BASE, VRING_STATE.pack(0, base))
        await fe.call_(Request.SET_VRING_ADDR, self.ring_addr())
        await fe.call_(Request.SET_VRING_KICK, U64.pack(0), (fe.kick,))
        await fe.call_(Request.SET_VRING_CALL, U64.pack(0), (fe.call,))
        await fe.call_(Request.SET_VRING_ENABLE, VRING_STATE.pack(0, 1))

    async def blk(
        self, rtype: int, sector: int, out: bytes = b"", in_len: int = 0
    ) -> tuple[int, bytes]:
        """One virtio-blk request on the packed ring (the frontend's buffers)."""
        return await self.fe.blk(rtype, sector, out, in_len, queue=self.queue)


async def _connect(srv: VhostUserServer, ring: int) -> tuple[FrontEnd, Packed]:
    fe = await FrontEnd.connect(srv.path)
    offered = await fe.negotiate(PACKED | ring)
    assert offered & PACKED
    await fe.call_(Request.SET_MEM_TABLE, encode_mem_table([fe.region()]), (fe.memfd,))
    return fe, Packed(fe, PACKED | ring)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "ring", [0, int(Feature.EVENT_IDX | Feature.INDIRECT_DESC)], ids=["plain", "event+indirect"]
)
async def test_packed_round_trip_laps_and_restart(server: VhostUserServer, ring: int) -> None:
    fe, pk = await _connect(server, ring)
    try:
        await pk.start(_base(0, 1))  # both wrap counters start at 1 (§2.8.1)
        q = server.vrings[0].queue
        assert isinstance(q, packed.DeviceQueue)
        # enough requests to lap the 128-slot ring more than once
        for n in range(150):
            data = os.urandom(512)
            st, _ = await pk.blk(BlkReqType.OUT, n % 64, data)
            assert st == BlkStatus.OK
            st, got = await pk.blk(BlkReqType.IN, n % 64, in_len=512)
            assert (st, got) == (BlkStatus.OK, data)
            assert _image(server)[(n % 64) * 512 : (n % 64 + 1) * 512] == data
        # stop: the base holds both positions and laps, where the driver is now
        reply = await fe.call_(Request.GET_VRING_BASE, VRING_STATE.pack(0, 0))
        index, base = VRING_STATE.unpack(reply)
        dq = pk.queue
        assert (index, base) == (0, _base(dq._next_avail, dq._avail_wrap))
        assert decode_base(base, SIZE, 0)[1] == dq._avail_wrap
        # restart at that base: the same driver ring carries on
        await pk.start(base)
        st, _ = await pk.blk(BlkReqType.OUT, 70, b"r" * 512)
        assert st == BlkStatus.OK
        assert (await pk.blk(BlkReqType.IN, 70, in_len=512))[1] == b"r" * 512
        assert server.dropped == 0
    finally:
        fe.close()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("base", "error"),
    [
        pytest.param(_base(5, 1) & 0xFFFF, "not resubmitted", id="used behind avail"),
        pytest.param(_base(SIZE, 1), "of a 128-entry ring", id="slot outside the ring"),
    ],
)
async def test_packed_bad_base_drops_the_connection(
    server: VhostUserServer, base: int, error: str, caplog: pytest.LogCaptureFixture
) -> None:
    fe, pk = await _connect(server, 0)
    try:
        with caplog.at_level(logging.ERROR, logger="mic_host.vhost_user"):
            await fe.call_(Request.SET_VRING_NUM, VRING_STATE.pack(0, SIZE))
            await fe.call_(Request.SET_VRING_BASE, VRING_STATE.pack(0, base))
            await fe.call_(Request.SET_VRING_ADDR, pk.ring_addr())
            await fe.send(Request.SET_VRING_KICK, U64.pack(0), (fe.kick,))
            ack = await fe.ch.receive(expect_reply=True)
            if ack is not None:
                assert U64.unpack(ack.payload)[0] != 0
            assert await fe.closed_by_peer()
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert any(error in m for m in errors), errors
    finally:
        fe.close()
    assert server.dropped == 1


def test_decode_base_refuses_slots_outside_the_ring() -> None:
    assert decode_base(_base(3, 0), 8, 0) == (3, 0, 3, 0)
    assert decode_base(0x8000_8000, 8, 0) == (0, 1, 0, 1)
    with pytest.raises(RemoteProtocolError, match="slot 9"):
        decode_base(_base(9, 1), 8, 2)


@pytest.mark.asyncio
async def test_split_front_end_still_gets_a_split_ring(server: VhostUserServer) -> None:
    """RING_PACKED is offered, not imposed: a front-end that does not ack it keeps split."""
    fe = await FrontEnd.connect(server.path)
    try:
        await fe.negotiate(0)
        await fe.start(SIZE)
        assert not isinstance(server.vrings[0].queue, packed.DeviceQueue)
        assert (await fe.blk(BlkReqType.IN, 0, in_len=512))[0] == BlkStatus.OK
    finally:
        fe.close()
