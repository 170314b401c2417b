"""The vhost-user back-end against a small Python front-end, over a real Unix socket.

The server runs in-process on the real :class:`BlockBackend` and a real image;
the front-end (tests/vhost_user/frontend.py) shares a memfd with it and drives
a :class:`DriverQueue`. Requests round-trip with every byte checked in the
image; every kind of bad input drops that connection only (with a clear error
in the log, and a refusal first when the front-end asked for an ack), after
which the next front-end is served; a driver that breaks the ring rules
latches its queue broken and is told on the error eventfd.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from mic_host.backends.block import BlockBackend
from mic_host.vhost_user import VhostUserServer
from tests.vhost_user.frontend import GPA, MEM_SIZE, UVA, FrontEnd
from transport.vhost_user import MemRegion, Request, VhostUserChannel
from transport.vhost_user.protocol import (
    HEADER,
    U64,
    VRING_ADDR,
    VRING_NOFD,
    VRING_STATE,
    encode_mem_table,
)
from virtio.blk import parse_config
from virtio.constants import BlkFeature, BlkReqType, BlkStatus, Feature

IMAGE = 1 << 20
SERIAL = "vu-serial"


@pytest.fixture
def short_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="vu-", dir="/tmp"))  # AF_UNIX paths: 108 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest_asyncio.fixture
async def server(short_dir: Path) -> AsyncIterator[VhostUserServer]:
    image = short_dir / "disk.img"
    image.write_bytes(os.urandom(IMAGE))
    backend = BlockBackend(image, name="vu", serial=SERIAL, label="")
    async with VhostUserServer(backend, short_dir / "vu.sock", queue_size=128) as srv:
        yield srv


async def _frontend(srv: VhostUserServer) -> FrontEnd:
    return await FrontEnd.connect(srv.path)


def _image(srv: VhostUserServer) -> bytes:
    backend = srv.backend
    assert isinstance(backend, BlockBackend)
    return backend.path.read_bytes()


@pytest.mark.asyncio
@pytest.mark.parametrize("ring", [0, int(Feature.EVENT_IDX | Feature.INDIRECT_DESC)])
async def test_requests_round_trip(server: VhostUserServer, ring: int) -> None:
    fe = await _frontend(server)
    try:
        offered = await fe.negotiate(ring)
        assert offered & Feature.VERSION_1
        cfg = parse_config(await fe.config())
        assert cfg.capacity == IMAGE // 512
        assert cfg.seg_max == 126  # from the 128-entry ring the back-end is configured for
        await fe.start(128, ring)
        data = os.urandom(8192)
        for i in range(40):  # past several interrupts, and with EVENT_IDX past used_event
            status, _ = await fe.blk(BlkReqType.OUT, 8 + 16 * i, data)
            assert status == BlkStatus.OK
        status, got = await fe.blk(BlkReqType.IN, 8 + 16 * 39, in_len=8192)
        assert (status, got) == (BlkStatus.OK, data)
        assert _image(server)[4096 + 39 * 8192 : 4096 + 40 * 8192] == data
        status, ident = await fe.blk(BlkReqType.GET_ID, 0, in_len=20)
        assert status == BlkStatus.OK
        assert ident.rstrip(b"\0") == SERIAL.encode()
        status, _ = await fe.blk(BlkReqType.FLUSH, 0)
        assert status == BlkStatus.OK
        # GET_VRING_BASE stops the ring where it is: 43 requests were consumed
        base = await fe.call_(Request.GET_VRING_BASE, VRING_STATE.pack(0, 0))
        assert VRING_STATE.unpack(base) == (0, 43)
    finally:
        fe.close()


@pytest.mark.asyncio
async def test_new_memory_table_while_running(server: VhostUserServer) -> None:
    fe = await _frontend(server)
    try:
        await fe.negotiate()
        await fe.start(128)
        data = os.urandom(4096)
        assert (await fe.blk(BlkReqType.OUT, 0, data))[0] == BlkStatus.OK
        # the same memory again (QEMU resends the table when its memory map changes):
        # the ring stops where it is and carries on from there on the new mapping
        table = encode_mem_table([fe.region()])
        await fe.call_(Request.SET_MEM_TABLE, table, (fe.memfd,))
        assert await fe.blk(BlkReqType.IN, 0, in_len=4096) == (BlkStatus.OK, data)
        base = await fe.call_(Request.GET_VRING_BASE, VRING_STATE.pack(0, 0))
        assert VRING_STATE.unpack(base) == (0, 2)
    finally:
        fe.close()


async def _still_serving(srv: VhostUserServer) -> None:
    fe = await _frontend(srv)
    try:
        (features,) = U64.unpack(await fe.call_(Request.GET_FEATURES))
        assert features & Feature.VERSION_1
    finally:
        fe.close()


def _bad_cases(fe: FrontEnd, other: int) -> dict[str, tuple[int, bytes, tuple[int, ...]]]:
    region = fe.region()
    overlap = MemRegion(GPA + MEM_SIZE // 2, MEM_SIZE, UVA + 4 * MEM_SIZE, 0)
    outside = VRING_ADDR.pack(0, 0, UVA + 8 * MEM_SIZE, UVA + 8 * MEM_SIZE + 4096, UVA, 0)
    zero = MemRegion(GPA, 0, UVA, 0)
    table = encode_mem_table([region])
    return {
        "missing fd": (Request.SET_MEM_TABLE, table, ()),
        "extra fds": (Request.SET_VRING_CALL, U64.pack(0), (fe.call, fe.err)),
        "fd with NOFD": (Request.SET_VRING_CALL, U64.pack(VRING_NOFD), (fe.call,)),
        "overlapping regions": (
            Request.SET_MEM_TABLE,
            encode_mem_table([region, overlap]),
            (fe.memfd, other),
        ),
        "zero-sized region": (Request.SET_MEM_TABLE, encode_mem_table([zero]), (fe.memfd,)),
        "region larger than its fd": (
            Request.SET_MEM_TABLE,
            encode_mem_table([MemRegion(GPA, 2 * MEM_SIZE, UVA, 0)]),
            (fe.memfd,),
        ),
        "vring outside the regions": (Request.SET_VRING_ADDR, outside, ()),
        "ring smaller than seg_max needs": (Request.SET_VRING_NUM, VRING_STATE.pack(0, 64), ()),
        "no such queue": (Request.SET_VRING_NUM, VRING_STATE.pack(7, 128), ()),
        "truncated payload": (Request.SET_VRING_NUM, b"\0\0\0", ()),
        "unknown request": (99, b"", ()),
        "legacy driver": (Request.SET_FEATURES, U64.pack(0), ()),
    }


CASES = [
    "missing fd",
    "extra fds",
    "fd with NOFD",
    "overlapping regions",
    "zero-sized region",
    "region larger than its fd",
    "vring outside the regions",
    "ring smaller than seg_max needs",
    "no such queue",
    "truncated payload",
    "unknown request",
    "legacy driver",
]


@pytest.mark.asyncio
@pytest.mark.parametrize("case", CASES)
async def test_bad_input_drops_only_that_connection(
    server: VhostUserServer, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    fe = await _frontend(server)
    other = os.memfd_create("vu-other")
    os.ftruncate(other, MEM_SIZE)
    try:
        await fe.negotiate()
        if case == "vring outside the regions":
            table = encode_mem_table([fe.region()])
            await fe.call_(Request.SET_MEM_TABLE, table, (fe.memfd,))
            await fe.call_(Request.SET_VRING_NUM, VRING_STATE.pack(0, 128))
        request, payload, fds = _bad_cases(fe, other)[case]
        with caplog.at_level(logging.ERROR, logger="mic_host.vhost_user"):
            await fe.send(request, payload, fds)
            # asked for an ack: the refusal comes first (non-zero), then the close
            ack = await fe.ch.receive(expect_reply=True)
            if ack is not None:
                assert U64.unpack(ack.payload)[0] != 0
            assert await fe.closed_by_peer()
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert any("vhost-user connection dropped" in m for m in errors), errors
    finally:
        os.close(other)
        fe.close()
    assert server.dropped == 1
    await _still_serving(server)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(HEADER.pack(1, 2, 0), id="version 2"),
        pytest.param(HEADER.pack(1, 1 | 4, 0), id="reply from the front-end"),
        pytest.param(HEADER.pack(5, 1, 1 << 20), id="oversized payload"),
        pytest.param(b"\xff" * 12, id="garbage"),
    ],
)
async def test_garbage_header_drops_the_connection(server: VhostUserServer, raw: bytes) -> None:
    fe = await _frontend(server)
    try:
        await fe.ch._fs.send_raw(raw)
        assert await fe.closed_by_peer()
    finally:
        fe.close()
    assert server.dropped == 1
    await _still_serving(server)


@pytest.mark.asyncio
async def test_truncated_message_then_eof(server: VhostUserServer) -> None:
    fe = await _frontend(server)
    await fe.ch._fs.send_raw(HEADER.pack(Request.SET_FEATURES, 1, 8) + b"\0\0\0")
    fe.close()
    await _still_serving(server)


@pytest.mark.asyncio
async def test_driver_breaking_the_ring_latches_the_queue(server: VhostUserServer) -> None:
    fe = await _frontend(server)
    try:
        await fe.negotiate()
        await fe.start(128)
        q = fe.queue
        assert q is not None
        # avail.idx jumps past the ring size: a ring error, not a connection error
        avail = q.layout.avail - GPA
        fe.mem.raw()[avail + 2 : avail + 4] = (500).to_bytes(2, "little")
        os.eventfd_write(fe.kick, 1)
        await fe.wait_fd(fe.err)
        ep = server.endpoints[0]
        assert ep.state.value == "broken"
        # the connection is still served; GET_VRING_BASE still answers
        base = await fe.call_(Request.GET_VRING_BASE, VRING_STATE.pack(0, 0))
        assert VRING_STATE.unpack(base) == (0, 0)
        # and a restarted ring serves again
        await fe.start(128)
        status, _ = await fe.blk(BlkReqType.FLUSH, 0)
        assert status == BlkStatus.OK
    finally:
        fe.close()
    assert server.dropped == 0


@pytest.mark.asyncio
async def test_one_front_end_at_a_time(server: VhostUserServer) -> None:
    first = await _frontend(server)
    try:
        await first.negotiate()
        second = await _frontend(server)
        try:
            assert await second.closed_by_peer()
        finally:
            second.close()
        (features,) = U64.unpack(await first.call_(Request.GET_FEATURES))
        assert features
    finally:
        first.close()


@pytest.mark.asyncio
async def test_serves_one_end_of_a_socketpair(server: VhostUserServer) -> None:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    fe = FrontEnd(VhostUserChannel(ours))
    task = asyncio.create_task(server.serve_connection(theirs))
    try:
        await fe.negotiate()
        await fe.start(128)
        assert (await fe.blk(BlkReqType.FLUSH, 0))[0] == BlkStatus.OK
        # garbage: this connection is dropped, the task ends without raising
        await fe.ch._fs.send_raw(b"\x00" * 12)
        assert await fe.closed_by_peer()
        await asyncio.wait_for(task, 30)
    finally:
        fe.close()
    assert server.dropped == 1
    await _still_serving(server)


@pytest.mark.asyncio
async def test_read_only_disk(short_dir: Path) -> None:
    image = short_dir / "ro.img"
    content = os.urandom(IMAGE)
    image.write_bytes(content)
    backend = BlockBackend(image, name="ro", read_only=True, label="")
    async with VhostUserServer(backend, short_dir / "ro.sock", queue_size=128) as srv:
        fe = await _frontend(srv)
        try:
            offered = await fe.negotiate()
            assert offered & BlkFeature.RO
            await fe.start(128)
            assert (await fe.blk(BlkReqType.OUT, 0, bytes(512)))[0] == BlkStatus.IOERR
            assert await fe.blk(BlkReqType.IN, 0, in_len=512) == (BlkStatus.OK, content[:512])
        finally:
            fe.close()
    assert image.read_bytes() == content
