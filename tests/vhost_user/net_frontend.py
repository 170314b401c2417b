"""A vhost-user net front-end for tests: QEMU's ``-netdev vhost-user`` set-up in Python.

:class:`NetFrontEnd` extends :class:`tests.vhost_user.frontend.FrontEnd` to one
queue pair (receiveq 0, transmitq 1), each a :class:`DriverQueue` on the
shared memfd, with RX buffers to post and frames (VERSION_1 header + Ethernet)
to send; :func:`frame` builds a broadcast test frame.
"""

from __future__ import annotations

import os

from tests.vhost_user.frontend import GPA, UVA, FrontEnd
from transport.vhost_user import ProtocolFeature, Request, VhostUserChannel
from transport.vhost_user.protocol import (
    PROTOCOL_FEATURES_BIT,
    U64,
    VRING_ADDR,
    VRING_STATE,
    encode_mem_table,
)
from virtio.constants import Feature, NetFeature
from virtio.net import NET_HDR, NET_HDR_SIZE
from virtio.split import DriverQueue, SplitLayout

__all__ = ["RING", "NetFrontEnd", "frame"]

RING = 256
RINGS = (0x0, 0x8000)  # receiveq, transmitq offsets in the region
RXBUF, TXBUF, BUFSZ = 0x40000, 0x80000, 2048


class NetFrontEnd(FrontEnd):
    """QEMU's vhost-user net set-up: one queue pair, rings enabled after the kicks."""

    def __init__(self, ch: VhostUserChannel) -> None:
        super().__init__(ch)
        self.kicks = (self.kick, os.eventfd(0, os.EFD_NONBLOCK))
        self.calls = (self.call, os.eventfd(0, os.EFD_NONBLOCK))
        self.queues: list[DriverQueue[int]] = []

    def close(self) -> None:
        super().close()
        os.close(self.kicks[1])
        os.close(self.calls[1])

    async def negotiate_net(self, proto: int) -> tuple[int, int]:
        offered = U64.unpack(await self.call_(Request.GET_FEATURES))[0]
        offered_proto = U64.unpack(await self.call_(Request.GET_PROTOCOL_FEATURES))[0]
        await self.call_(Request.SET_PROTOCOL_FEATURES, U64.pack(proto))
        self.reply_ack = bool(proto & ProtocolFeature.REPLY_ACK)
        await self.call_(Request.SET_OWNER)
        acked = int(Feature.VERSION_1 | NetFeature.MRG_RXBUF) | PROTOCOL_FEATURES_BIT
        await self.call_(Request.SET_FEATURES, U64.pack(acked))
        return int(offered), int(offered_proto)

    def qlayout(self, i: int) -> SplitLayout:
        return SplitLayout.contiguous(GPA + RINGS[i], RING)

    def ring_addr_of(self, i: int) -> bytes:
        lay = self.qlayout(i)
        to_uva = UVA - GPA
        return VRING_ADDR.pack(i, 0, lay.desc + to_uva, lay.used + to_uva, lay.avail + to_uva, 0)

    async def start_net(self, enable: bool = True) -> None:
        await self.call_(Request.SET_MEM_TABLE, encode_mem_table([self.region()]), (self.memfd,))
        self.queues = []
        for i in (0, 1):
            await self.call_(Request.SET_VRING_NUM, VRING_STATE.pack(i, RING))
            await self.call_(Request.SET_VRING_BASE, VRING_STATE.pack(i, 0))
            await self.call_(Request.SET_VRING_ADDR, self.ring_addr_of(i))
            self.queues.append(DriverQueue(self.mem, self.qlayout(i), int(Feature.VERSION_1)))
            await self.call_(Request.SET_VRING_KICK, U64.pack(i), (self.kicks[i],))
            await self.call_(Request.SET_VRING_CALL, U64.pack(i), (self.calls[i],))
        if enable:
            await self.enable(True)

    async def enable(self, on: bool) -> None:
        for i in (0, 1):
            await self.call_(Request.SET_VRING_ENABLE, VRING_STATE.pack(i, int(on)))

    def post_rx(self, n: int) -> None:
        q = self.queues[0]
        for k in range(n):
            q.add([], [(GPA + RXBUF + k * BUFSZ, BUFSZ)], k)
        if q.publish():
            os.eventfd_write(self.kicks[0], 1)

    def send_frame(self, frame: bytes) -> None:
        q = self.queues[1]
        data = NET_HDR.pack(0, 0, 0, 0, 0, 0, 0) + frame
        view = self.mem.raw()
        view[TXBUF : TXBUF + len(data)] = data
        q.add([(GPA + TXBUF, len(data))], [], 0)
        if q.publish():
            os.eventfd_write(self.kicks[1], 1)

    async def used(self, i: int) -> tuple[int, int]:
        q = self.queues[i]
        while True:
            got = q.get_used()
            if got is not None:
                return got
            if not q.enable_interrupts():
                await self.wait_fd(self.calls[i])

    def rx_frame(self, token: int, length: int) -> bytes:
        off = RXBUF + token * BUFSZ
        return bytes(self.mem.raw()[off + NET_HDR_SIZE : off + length])


def frame(src: int, payload: bytes) -> bytes:
    return b"\xff" * 6 + bytes([0x52, 0x54, 0, 0, 0, src]) + b"\x88\xb5" + payload
