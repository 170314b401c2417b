"""A minimal vhost-user front-end for tests: the protocol codec, a memfd, a DriverQueue.

It speaks to the back-end the way QEMU's vhost-user-blk does (features,
protocol features with REPLY_ACK, SET_MEM_TABLE with a memfd, then per queue
NUM, BASE, ADDR, KICK, CALL, ENABLE) and pushes virtio-blk requests through a
:class:`virtio.split.DriverQueue` on the shared memory. Its guest-physical
addresses (descriptors) and user addresses (SET_VRING_ADDR) differ on purpose,
so the back-end's translation between the two is exercised. Lower-level
methods let a test send anything at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import socket
from pathlib import Path

from transport.vhost_user import MemRegion, Message, ProtocolFeature, Request, VhostUserChannel
from transport.vhost_user.protocol import (
    CONFIG_HDR,
    INFLIGHT,
    PROTOCOL_FEATURES_BIT,
    U64,
    VRING_ADDR,
    VRING_STATE,
    encode_mem_table,
)
from virtio import packed
from virtio.blk import REQ_HEADER
from virtio.constants import Feature
from virtio.memory import FlatMemory
from virtio.split import DriverQueue, SplitLayout

GPA = 0x100000  # guest-physical base of the one region
UVA = 0x7F0000000000  # the front-end's "user address" of it
MEM_SIZE = 1 << 20
RING = 0x0  # ring offset in the region
INDIRECT = 0x10000
DATA = 0x40000  # request buffers from here


class FrontEnd:
    def __init__(self, ch: VhostUserChannel) -> None:
        self.ch = ch
        self.memfd = os.memfd_create("vu-test-guest")
        os.ftruncate(self.memfd, MEM_SIZE)
        self.map = mmap.mmap(self.memfd, MEM_SIZE)
        self.mem = FlatMemory(memoryview(self.map), base=GPA)
        self.kick = os.eventfd(0, os.EFD_NONBLOCK)
        self.call = os.eventfd(0, os.EFD_NONBLOCK)
        self.err = os.eventfd(0, os.EFD_NONBLOCK)
        self.queue: DriverQueue[int] | None = None
        self.reply_ack = False

    @classmethod
    async def connect(cls, path: Path) -> FrontEnd:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, str(path))
        return cls(VhostUserChannel(sock))

    def close(self) -> None:
        self.queue = None
        self.mem = FlatMemory(1)
        self.ch.close()
        with contextlib.suppress(BufferError):  # a test may still hold a view; gc unmaps
            self.map.close()
        for fd in (self.memfd, self.kick, self.call, self.err):
            os.close(fd)

    # -- raw protocol --------------------------------------------------------------------
    async def send(
        self, request: int, payload: bytes = b"", fds: list[int] | tuple[int, ...] = ()
    ) -> None:
        await self.ch.send(request, payload, fds, reply=False, need_reply=self.reply_ack)

    async def reply(self) -> Message:
        msg = await asyncio.wait_for(self.ch.receive(expect_reply=True), 10)
        assert msg is not None, "back-end closed the connection"
        return msg

    async def call_(self, request: int, payload: bytes = b"", fds: tuple[int, ...] = ()) -> bytes:
        """Send a request; its reply payload (or the REPLY_ACK, checked to be 0)."""
        await self.send(request, payload, fds)
        if request in (
            Request.GET_FEATURES,
            Request.GET_PROTOCOL_FEATURES,
            Request.GET_QUEUE_NUM,
            Request.GET_VRING_BASE,
            Request.GET_CONFIG,
        ):
            return (await self.reply()).payload
        if self.reply_ack:
            ack = await self.reply()
            assert U64.unpack(ack.payload)[0] == 0, f"{request!r} refused"
        return b""

    async def closed_by_peer(self) -> bool:
        """Read until EOF: True once the back-end dropped the connection."""
        try:
            while True:
                msg = await asyncio.wait_for(self.ch.receive(expect_reply=True), 10)
                if msg is None:
                    return True
        except OSError:
            return True

    # -- the usual setup -----------------------------------------------------------------
    def layout(self, size: int) -> SplitLayout:
        return SplitLayout.contiguous(GPA + RING, size)

    def region(self) -> MemRegion:
        return MemRegion(GPA, MEM_SIZE, UVA, 0)

    def ring_addr(self, size: int, index: int = 0) -> bytes:
        lay = self.layout(size)
        to_uva = UVA - GPA
        return VRING_ADDR.pack(
            index, 0, lay.desc + to_uva, lay.used + to_uva, lay.avail + to_uva, 0
        )

    async def negotiate(self, features: int = 0, protocol: int = 0) -> int:
        offered = U64.unpack(await self.call_(Request.GET_FEATURES))[0]
        assert offered & PROTOCOL_FEATURES_BIT
        proto = U64.unpack(await self.call_(Request.GET_PROTOCOL_FEATURES))[0]
        want = int(ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIG | ProtocolFeature.MQ)
        want |= protocol
        assert proto & want == want
        await self.call_(Request.SET_PROTOCOL_FEATURES, U64.pack(want))
        self.reply_ack = True
        await self.call_(Request.SET_OWNER)
        acked = int(Feature.VERSION_1) | PROTOCOL_FEATURES_BIT | (features & offered)
        await self.call_(Request.SET_FEATURES, U64.pack(acked))
        return int(offered)

    async def get_inflight(self, num_queues: int = 1, queue_size: int = 128) -> tuple[int, int]:
        """GET_INFLIGHT_FD as QEMU's vhost-user-blk sends it: ``(mmap_size, fd)``."""
        await self.send(Request.GET_INFLIGHT_FD, INFLIGHT.pack(0, 0, num_queues, queue_size))
        msg = await self.reply()
        assert len(msg.fds) == 1, msg
        size, offset, nq, qs = INFLIGHT.unpack(msg.payload)
        assert (offset, nq, qs) == (0, num_queues, queue_size)
        return int(size), msg.fds[0]

    async def config(self, size: int = 60) -> bytes:
        out = await self.call_(Request.GET_CONFIG, CONFIG_HDR.pack(0, size, 0) + bytes(size))
        return out[CONFIG_HDR.size :]

    async def start(self, size: int = 128, features: int = 0) -> None:
        await self.call_(Request.SET_MEM_TABLE, encode_mem_table([self.region()]), (self.memfd,))
        await self.call_(Request.SET_VRING_NUM, VRING_STATE.pack(0, size))
        await self.call_(Request.SET_VRING_BASE, VRING_STATE.pack(0, 0))
        await self.call_(Request.SET_VRING_ADDR, self.ring_addr(size))
        self.queue = DriverQueue(
            self.mem, self.layout(size), features, indirect_area=GPA + INDIRECT, indirect_max=4
        )
        await self.call_(Request.SET_VRING_KICK, U64.pack(0), (self.kick,))
        await self.call_(Request.SET_VRING_CALL, U64.pack(0), (self.call,))
        await self.call_(Request.SET_VRING_ERR, U64.pack(0), (self.err,))
        await self.call_(Request.SET_VRING_ENABLE, VRING_STATE.pack(0, 1))

    # -- I/O ------------------------------------------------------------------------------
    async def wait_fd(self, fd: int, timeout: float = 10.0) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        loop.add_reader(fd, lambda: fut.done() or fut.set_result(None))
        try:
            await asyncio.wait_for(fut, timeout)
        finally:
            loop.remove_reader(fd)
        os.eventfd_read(fd)

    async def blk(
        self,
        rtype: int,
        sector: int,
        out: bytes = b"",
        in_len: int = 0,
        *,
        queue: DriverQueue[int] | packed.DriverQueue[int] | None = None,
    ) -> tuple[int, bytes]:
        """One virtio-blk request on ``queue`` (default: this front-end's split
        queue); ``(status, data read)``."""
        q = queue if queue is not None else self.queue
        assert q is not None
        view = self.mem.raw()
        hdr, data = GPA + DATA, GPA + DATA + 4096
        view[DATA : DATA + 16] = REQ_HEADER.pack(rtype, sector)
        readable = [(hdr, 16)]
        writable = []
        if out:
            view[DATA + 4096 : DATA + 4096 + len(out)] = out
            readable.append((data, len(out)))
        if in_len:
            writable.append((data, in_len))
        status = data + 0x20000
        writable.append((status, 1))
        q.add(readable, writable, 1)
        if q.publish():
            os.eventfd_write(self.kick, 1)
        while q.get_used() is None:
            if not q.enable_interrupts():
                await self.wait_fd(self.call)
        st = status - GPA
        return view[st], bytes(view[DATA + 4096 : DATA + 4096 + in_len])


__all__ = ["FrontEnd"]
