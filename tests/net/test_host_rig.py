"""An in-process card for the host net backends, and tests of its small helpers.

:class:`NetCard` plays the card with the ring core's ``DriverQueue`` directly
(no card OS, no processes): it owns a ``FlatMemory`` "card RAM", the driver
side of the receiveq and transmitq, and the host's ``QueueEndpoint``\\ s over
``DeviceQueue``\\ s on the same memory, as ``VopDevice`` would build them. It
posts RX buffers, sends frames (optionally split across descriptors), and
reassembles received packets by ``num_buffers``. Kernel TAPs and namespaces
in the TAP tests are real; nothing here mocks them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest

from mic_host.backends.net import NetBackend
from mic_host.backends.net.frames import scatter
from mic_host.endpoint import EndpointState, QueueEndpoint
from transport.tap import create_netns, delete_netns, ip, run_in_netns, tap_privilege_problem
from virtio.constants import Feature, NetFeature
from virtio.errors import MicError
from virtio.memory import FlatMemory
from virtio.net import DEVICE_FEATURES, NET_HDR, NET_HDR_SIZE, NUM_BUFFERS, NUM_BUFFERS_OFFSET
from virtio.split import DeviceQueue, DriverQueue, SplitLayout

QSIZE = 256
RING_FEATURES = int(Feature.EVENT_IDX)
#: What a card in tap mode acks (everything the device offers + VERSION_1).
ALL = int(Feature.VERSION_1) | int(DEVICE_FEATURES)
#: A card in frames mode: no receive offloads, MRG_RXBUF kept.
PLAIN = int(Feature.VERSION_1) | int(
    NetFeature.MTU | NetFeature.MAC | NetFeature.MRG_RXBUF | NetFeature.STATUS
)

TAP_PROBLEM = tap_privilege_problem()
needs_tap = pytest.mark.skipif(
    TAP_PROBLEM is not None, reason=f"TAP/netns unavailable: {TAP_PROBLEM}"
)

ETH_TEST = 0x88B5


def uid() -> str:
    return uuid.uuid4().hex[:6]


def eth(dst: bytes, src: bytes, payload: bytes, ethertype: int = ETH_TEST) -> bytes:
    return dst + src + ethertype.to_bytes(2, "big") + payload


def hdr(
    flags: int = 0,
    gso_type: int = 0,
    hdr_len: int = 0,
    gso_size: int = 0,
    csum_start: int = 0,
    csum_offset: int = 0,
    num_buffers: int = 0,
) -> bytes:
    return NET_HDR.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers)


async def until(pred: Callable[[], bool], what: str, limit: float = 20.0) -> None:
    """Wait for ``pred()``; ``limit`` only guards against a hang (not a timed assertion)."""
    try:
        async with asyncio.timeout(limit):
            while not pred():  # noqa: ASYNC110 - the card side polls its used ring
                await asyncio.sleep(0.001)
    except TimeoutError:
        raise AssertionError(f"never happened: {what}") from None


class _Owner:
    def __init__(self) -> None:
        self.interrupts = 0
        self.ring_errors: list[MicError] = []

    def _interrupt(self) -> None:
        self.interrupts += 1

    def _ring_error(self, index: int, exc: MicError) -> None:
        self.ring_errors.append(exc)

    def _published(self, index: int, next_avail: int) -> None:
        pass


class _Ctx:
    """The BackendContext a ``VopDevice`` gives a backend."""

    def __init__(self, name: str, queues: list[QueueEndpoint]) -> None:
        self.name = name
        self.queues = queues
        self.features = 0
        self.log = logging.getLogger(f"test.{name}")
        self.configs: list[bytes] = []

    async def update_config(self, config: bytes) -> None:
        self.configs.append(bytes(config))


class _Alloc:
    def __init__(self, base: int, end: int) -> None:
        self.next = base
        self.end = end
        self.free: dict[int, list[int]] = {}

    def get(self, size: int) -> int:
        pool = self.free.get(size)
        if pool:
            return pool.pop()
        addr = self.next
        self.next += (size + 63) & ~63
        assert self.next <= self.end, "card RAM exhausted"
        return addr

    def put(self, addr: int, size: int) -> None:
        self.free.setdefault(size, []).append(addr)


class NetCard:
    """The card side of one NIC, driving ``backend`` through real endpoints."""

    def __init__(self, backend: NetBackend, features: int = ALL) -> None:
        self.backend = backend
        self.mem = FlatMemory(48 << 20)
        self.layouts = [SplitLayout.contiguous(0, QSIZE), SplitLayout.contiguous(1 << 16, QSIZE)]
        self.alloc = _Alloc(1 << 20, 48 << 20)
        self.owner = _Owner()
        self.eps = [QueueEndpoint(self.owner, i, QSIZE) for i in range(2)]
        self.ctx = _Ctx(backend.name, self.eps)
        self.features = features
        self.rxd: DriverQueue[tuple[int, int]] | None = None
        self.txd: DriverQueue[tuple[int, int]] | None = None
        self.task: asyncio.Task[None] | None = None
        self.received: list[tuple[tuple[int, ...], bytes, int]] = []  # (hdr, frame, nbufs)
        #: used lengths of the buffers of every packet kept (not the kernel's IPv6
        #: chatter), in order
        self.rx_chunks: list[int] = []
        self._partial: list[bytes] = []
        self._partial_lens: list[int] = []
        self._want = 0
        self.sent_done = 0
        self.ignored = 0
        self.posts = 0  # post_rx() calls
        self._tx_bufs: dict[tuple[int, int], list[tuple[int, int]]] = {}

    @property
    def mrg(self) -> bool:
        return bool(self.features & NetFeature.MRG_RXBUF)

    # -- lifecycle --------------------------------------------------------------------
    def start(self) -> None:
        self.task = asyncio.create_task(self.backend.run(self.ctx))  # type: ignore[arg-type]

    def driver_ok(self) -> None:
        """FEATURES_OK + DRIVER_OK: fresh rings on both sides, queues live."""
        self.ctx.features = self.features
        for layout in self.layouts:
            # Fresh rings, as VOP zeroes them on reset: a used.idx left from the
            # last session (the kernel's IPv6 chatter arrives at random times)
            # would otherwise be read as completions of the new buffers.
            span = SplitLayout.contiguous_bytes(layout.size)
            self.mem.view(layout.desc, span, True)[:] = bytes(span)
        self.rxd = DriverQueue(self.mem, self.layouts[0], RING_FEATURES)
        self.txd = DriverQueue(self.mem, self.layouts[1], RING_FEATURES)
        self._partial, self._partial_lens, self._want = [], [], 0
        for ep, layout in zip(self.eps, self.layouts, strict=True):
            dq = DeviceQueue(self.mem, layout, RING_FEATURES)
            dq.activate()
            ep.attach(dq)

    async def reset(self) -> None:
        """The card resets the device: queues idle, held chains must come back."""
        for ep in self.eps:
            ep.detach(EndpointState.IDLE, "reset")
        async with asyncio.timeout(10):
            for ep in self.eps:
                await ep.drain()
        self.ctx.features = 0

    async def aclose(self) -> None:
        for ep in self.eps:
            ep.detach(EndpointState.CLOSED, "removed")
        if self.task is not None:
            async with asyncio.timeout(10):
                await self.task
        await self.backend.aclose()

    # -- RX -------------------------------------------------------------------------------
    def post_rx(self, count: int, size: int | None = None) -> None:
        """Post ``count`` writable buffers (16 KiB with MRG_RXBUF, else one whole packet)."""
        assert self.rxd is not None
        if size is None:
            size = 16384 if self.mrg else 65562 + 64
        for _ in range(count):
            addr = self.alloc.get(size)
            self.rxd.add([], [(addr, size)], (addr, size))
        self.posts += 1
        if self.rxd.publish():
            self.eps[0].notify()

    def poll_rx(self, repost: bool = True) -> int:
        """Collect completed RX buffers into packets; returns packets added."""
        assert self.rxd is not None
        before = len(self.received)
        freed = []
        while (u := self.rxd.get_used()) is not None:
            (addr, size), ln = u
            data = bytes(self.mem.view(addr, ln))
            freed.append((addr, size))
            if not self._want:
                assert ln >= NET_HDR_SIZE, f"RX buffer with {ln} B, no room for a header"
                (nb,) = NUM_BUFFERS.unpack_from(data, NUM_BUFFERS_OFFSET)
                assert nb >= 1
                self._want = nb if self.mrg else 1
                self._partial, self._partial_lens = [], []
            self._partial.append(data)
            self._partial_lens.append(ln)
            if len(self._partial) == self._want:
                raw = b"".join(self._partial)
                h = NET_HDR.unpack_from(raw)
                if raw[NET_HDR_SIZE + 12 : NET_HDR_SIZE + 14] == b"\x86\xdd":
                    self.ignored += 1  # the kernel's own IPv6 chatter on a fresh TAP
                else:
                    self.received.append((h, raw[NET_HDR_SIZE:], self._want))
                    self.rx_chunks.extend(self._partial_lens)
                self._want = 0
        for addr, size in freed:
            self.alloc.put(addr, size)
        if repost and freed:
            self.post_rx(len(freed), freed[0][1])
        return len(self.received) - before

    async def recv(
        self, count: int, what: str = "frames"
    ) -> list[tuple[tuple[int, ...], bytes, int]]:
        """Wait for ``count`` more packets than already taken; return them (and forget them)."""
        await until(lambda: (self.poll_rx(), len(self.received) >= count)[1], f"{count} {what}")
        out, self.received = self.received[:count], self.received[count:]
        return out

    # -- TX -------------------------------------------------------------------------------
    def send(self, packet: bytes, split: Sequence[int] = ()) -> None:
        """Send header+frame bytes as one chain, cut into descriptors at ``split`` offsets."""
        assert self.txd is not None
        self.reap_tx()
        cuts = [0, *split, len(packet)]
        bufs = []
        for a, b in itertools.pairwise(cuts):
            if b <= a:
                continue
            addr = self.alloc.get(b - a)
            self.mem.view(addr, b - a, True)[:] = packet[a:b]
            bufs.append((addr, b - a))
        self.txd.add(bufs, [], (bufs[0][0], len(packet)))
        self._tx_bufs[(bufs[0][0], len(packet))] = bufs
        if self.txd.publish():
            self.eps[1].notify()

    def reap_tx(self) -> int:
        assert self.txd is not None
        n = 0
        while (u := self.txd.get_used()) is not None:
            for addr, size in self._tx_bufs.pop(u[0]):
                self.alloc.put(addr, size)
            n += 1
        self.sent_done += n
        return n

    async def sent(self, count: int) -> None:
        """Wait until ``count`` TX chains in total were completed by the device."""
        await until(lambda: (self.reap_tx(), self.sent_done >= count)[1], f"{count} TX done")


@contextlib.asynccontextmanager
async def running(
    backend: NetBackend, features: int = ALL, *, rx: int = QSIZE
) -> AsyncIterator[NetCard]:
    card = NetCard(backend, features)
    card.start()
    await asyncio.sleep(0)  # run() has the context
    card.driver_ok()
    if rx:
        card.post_rx(rx)
    try:
        yield card
    finally:
        await card.aclose()


# -- namespaces and packet sockets (root) ------------------------------------------------


@contextlib.asynccontextmanager
async def netns(prefix: str = "mvt") -> AsyncIterator[str]:
    name = f"{prefix}-{uid()}"
    await create_netns(name)
    try:
        yield name
    finally:
        await delete_netns(name)


def packet_socket(ns: str | None, ifname: str, *, vnet_hdr: bool = False) -> socket.socket:
    """An AF_PACKET socket bound to ``ifname`` inside ``ns`` (sees both directions)."""

    def make() -> socket.socket:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        if vnet_hdr:
            s.setsockopt(263, 15, 1)  # SOL_PACKET, PACKET_VNET_HDR
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        s.bind((ifname, 0))
        s.setblocking(False)
        return s

    return run_in_netns(ns, make)


async def recv_incoming(s: socket.socket, what: str = "a frame") -> bytes:
    """The next frame the interface *received* (not one it sent)."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(20):
            while True:
                data, addr = await loop.sock_recvfrom(s, 1 << 17)
                if addr[2] != socket.PACKET_OUTGOING:
                    return data
    except TimeoutError:
        raise AssertionError(f"never received {what}") from None


async def wait_oper_up(ns: str | None, ifname: str) -> None:
    """Carrier is handed to the qdisc by the kernel's linkwatch, asynchronously."""

    async def up() -> bool:
        out = await ip("-o", "link", "show", "dev", ifname, netns=ns)
        return "state UP" in out and "NO-CARRIER" not in out

    async with asyncio.timeout(20):
        while not await up():  # noqa: ASYNC110 - no event for operstate here
            await asyncio.sleep(0.01)


def tap_mac(ns: str | None, ifname: str) -> bytes:
    import json

    from transport.tap import ip_sync

    info: list[dict[str, Any]] = json.loads(ip_sync("-j", "link", "show", "dev", ifname, netns=ns))
    return bytes.fromhex(info[0]["address"].replace(":", ""))


# -- tests of the helpers ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("src", "dst"),
    [([10], [10]), ([3, 7], [10]), ([10], [1, 2, 7]), ([4, 4, 2], [5, 5]), ([1] * 10, [9, 1])],
)
def test_scatter_copies_between_any_two_scatter_lists(src: list[int], dst: list[int]) -> None:
    data = os.urandom(10)
    sv, off = [], 0
    for n in src:
        sv.append(memoryview(data)[off : off + n])
        off += n
    out = bytearray(sum(dst))
    dv, off = [], 0
    for n in dst:
        dv.append(memoryview(out)[off : off + n])
        off += n
    scatter(sv, dv, 10)
    assert bytes(out) == data
