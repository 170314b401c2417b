"""In-memory pair helpers for the split ring (h11's ``ConnectionPair``, STYLE.md §7).

:class:`QueuePair` puts a driver queue and a device queue of one ring format
over one :class:`~virtio.memory.FlatMemory`, with a small block allocator for
buffers and :meth:`QueuePair.round_trip` that pumps one request through both
sides; :class:`RingPair` is the split one (``request`` is ``round_trip``), the
packed one is :class:`tests.virtio.packed_pair.PackedPair`. :class:`HostileDriver` writes raw bytes
into the descriptor table and the avail ring (the device side's adversary);
:meth:`RingPair.put_used` does the same to the used ring (the driver side's).
No processes, no asyncio.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from virtio.constants import Feature
from virtio.memory import FlatMemory, Memory
from virtio.split import DESC, DESC_SIZE, USED_ELEM, DeviceQueue, DriverQueue, SplitLayout

_U16 = struct.Struct("<H")

#: Where things live in a pair's memory (bus addresses).
RING_BASE = 0x1000
BLOCK = 256


def features_of(*, event_idx: bool = False, indirect: bool = False) -> int:
    return (int(Feature.EVENT_IDX) if event_idx else 0) | (
        int(Feature.INDIRECT_DESC) if indirect else 0
    )


class BlockPool:
    """Fixed-size blocks handed out and returned; enough for tests, no fragmentation."""

    def __init__(self, base: int, block: int, count: int) -> None:
        self.base = base
        self.block = block
        self.count = count
        self._free: deque[int] = deque(base + i * block for i in range(count))

    @property
    def end(self) -> int:
        return self.base + self.block * self.count

    @property
    def available(self) -> int:
        return len(self._free)

    def alloc(self, length: int) -> int:
        if not 0 < length <= self.block:
            raise ValueError(f"block pool serves 1..{self.block} bytes, not {length}")
        return self._free.popleft()

    def free(self, addr: int) -> None:
        self._free.append(addr)

    def reset(self) -> None:
        self._free = deque(self.base + i * self.block for i in range(self.count))


@dataclass(frozen=True, slots=True)
class RoundTrip:
    """What one :meth:`QueuePair.request` saw on both sides."""

    kick: bool
    interrupt: bool
    head: int
    request: bytes
    response: bytes
    used_len: int
    segments: list[tuple[int, int, bool]]
    chain: Any = None


def echo_upper(chain: Any) -> bytes:
    return chain.read().upper()


class QueuePair:
    """A driver queue and a device queue of one ring format over one flat memory,
    with the buffer pool and the request pump both formats share.

    Memory map: the ring at ``RING_BASE`` (:meth:`ring_layout`), then the
    driver's indirect area (``size * indirect_max`` descriptors), then the
    buffer pool. A subclass names its format: :meth:`ring_layout` and the
    ``DRIVER``/``DEVICE`` queue classes and ``DESC_SIZE``; :class:`RingPair`
    (split), :class:`tests.virtio.packed_pair.PackedPair`.
    """

    DRIVER: ClassVar[Any]
    DEVICE: ClassVar[Any]
    DESC_SIZE: ClassVar[int]

    @classmethod
    def ring_layout(cls, size: int) -> tuple[Any, int]:
        """The ring's layout at ``RING_BASE`` and how many bytes it takes."""
        raise NotImplementedError

    def __init__(
        self,
        size: int = 8,
        *,
        event_idx: bool = False,
        indirect: bool = False,
        indirect_max: int = 4,
        blocks: int | None = None,
        require_readable: bool = False,
        require_writable: bool = False,
        activate: bool = True,
        memory: Callable[[FlatMemory], Memory] | None = None,
    ) -> None:
        self.size = size
        self.features = features_of(event_idx=event_idx, indirect=indirect)
        self.layout, ring_bytes = self.ring_layout(size)
        self.indirect_area = (RING_BASE + ring_bytes + 15) & ~15
        self.indirect_max = indirect_max if indirect else 0
        ind_end = self.indirect_area + size * max(self.indirect_max, 1) * self.DESC_SIZE
        nblocks = blocks if blocks is not None else size * max(self.indirect_max, 2) + 4
        self.pool = BlockPool((ind_end + 0xFF) & ~0xFF, BLOCK, nblocks)
        self.flat = FlatMemory(self.pool.end)
        self.mem: Memory = memory(self.flat) if memory is not None else self.flat
        self.driver = self.DRIVER(
            self.mem,
            self.layout,
            self.features,
            indirect_area=self.indirect_area if indirect else None,
            indirect_max=self.indirect_max,
        )
        self.device = self.DEVICE(
            self.mem,
            self.layout,
            self.features,
            require_readable=require_readable,
            require_writable=require_writable,
        )
        if activate:
            self.device.activate()
        self._bufs: dict[int, tuple[list[tuple[int, int]], list[tuple[int, int]]]] = {}
        self._next_token = 1

    def raw(self) -> memoryview:
        return self.flat.raw()

    # -- buffers and requests -----------------------------------------------
    def alloc(self, data: bytes) -> tuple[int, int]:
        addr = self.pool.alloc(len(data))
        self.raw()[addr : addr + len(data)] = data
        return addr, len(data)

    def alloc_out(self, length: int) -> tuple[int, int]:
        addr = self.pool.alloc(length)
        self.raw()[addr : addr + length] = b"\xee" * length
        return addr, length

    def add(
        self, readable: Sequence[bytes], writable: Sequence[int], token: int | None = None
    ) -> tuple[int, int]:
        """Allocate buffers (readable filled with data) and add one chain; returns
        (token, head) -- the head is the buffer id on a packed ring.

        On any error from ``add`` the buffers go back to the pool.
        """
        r = [self.alloc(d) for d in readable]
        w = [self.alloc_out(n) for n in writable]
        if token is None:
            token = self._next_token
            self._next_token += 1
        try:
            head = self.driver.add(r, w, token)
        except Exception:
            for addr, _ in (*r, *w):
                self.pool.free(addr)
            raise
        self._bufs[token] = (r, w)
        return token, int(head)

    def response(self, token: int, length: int) -> bytes:
        """The first ``length`` bytes of a completed token's writable buffers."""
        _, w = self._bufs[token]
        out = bytearray()
        for addr, n in w:
            out += self.raw()[addr : addr + n]
        return bytes(out[:length])

    def release(self, token: int) -> None:
        r, w = self._bufs.pop(token)
        for addr, _ in (*r, *w):
            self.pool.free(addr)

    def complete(self, token: int, length: int) -> bytes:
        data = self.response(token, length)
        self.release(token)
        return data

    def round_trip(
        self,
        readable: Sequence[bytes] = (b"ping",),
        writable: Sequence[int] = (16,),
        serve: Callable[[Any], bytes] = echo_upper,
    ) -> RoundTrip:
        """One request through both sides: add+publish, pop, serve, push_used, get_used."""
        token, head = self.add(readable, writable)
        kick = self.driver.publish()
        chain = self.device.pop()
        assert chain is not None, "device saw no chain after publish"
        assert chain.head == head
        request = chain.read()
        n = chain.write(serve(chain))
        interrupt = self.device.push_used(chain.head, n)
        got = self.driver.get_used()
        assert got is not None, "driver saw no completion after push_used"
        got_token, used_len = got
        assert got_token == token
        return RoundTrip(
            kick=kick,
            interrupt=interrupt,
            head=head,
            request=request,
            response=self.complete(token, used_len),
            used_len=used_len,
            segments=chain.segments,
            chain=chain,
        )

    def reset(self) -> None:
        """Reset both sides (and the pool), then activate the device again."""
        self.driver.reset()
        self.device.reset()  # split: scrubs used.flags/idx/avail_event; driver.reset() used_event
        self._bufs.clear()
        self.pool.reset()
        self.device.activate()


class RingPair(QueuePair):
    """A split driver ring and device ring over one flat memory (Linux
    ``vring_init`` layout, 4096-aligned used ring, at ``RING_BASE``)."""

    DRIVER = DriverQueue
    DEVICE = DeviceQueue
    DESC_SIZE = DESC_SIZE
    driver: DriverQueue[int]
    device: DeviceQueue

    @classmethod
    def ring_layout(cls, size: int) -> tuple[SplitLayout, int]:
        return (
            SplitLayout.contiguous(RING_BASE, size, 4096),
            SplitLayout.contiguous_bytes(size, 4096),
        )

    # -- raw access -------------------------------------------------------
    def read_u16(self, addr: int) -> int:
        return int(_U16.unpack_from(self.raw(), addr)[0])

    def write_u16(self, addr: int, value: int) -> None:
        _U16.pack_into(self.raw(), addr, value & 0xFFFF)

    @property
    def avail_flags(self) -> int:
        return self.read_u16(self.layout.avail)

    @property
    def avail_idx(self) -> int:
        return self.read_u16(self.layout.avail + 2)

    @property
    def used_event(self) -> int:
        return self.read_u16(self.layout.avail + 4 + 2 * self.size)

    @property
    def used_flags(self) -> int:
        return self.read_u16(self.layout.used)

    @property
    def used_idx(self) -> int:
        return self.read_u16(self.layout.used + 2)

    @property
    def avail_event(self) -> int:
        return self.read_u16(self.layout.used + 4 + 8 * self.size)

    def put_used(self, slot: int, head: int, length: int) -> None:
        """Write a used element as a hostile device would (``slot`` is masked)."""
        off = self.layout.used + 4 + 8 * (slot % self.size)
        USED_ELEM.pack_into(self.raw(), off, head, length)

    def set_used_idx(self, value: int) -> None:
        self.write_u16(self.layout.used + 2, value)

    def read_desc(self, index: int) -> tuple[int, int, int, int]:
        return DESC.unpack_from(self.raw(), self.layout.desc + index * DESC_SIZE)

    request = QueuePair.round_trip


class HostileDriver:
    """Writes a split ring byte by byte for a :class:`DeviceQueue` to judge.

    The table and the avail ring live at the usual places of a ``size``-ring
    in a :class:`FlatMemory`; buffers come from ``DATA`` upwards.
    """

    DESC_AT = 0x1000
    DATA = 0x4000

    def __init__(
        self,
        size: int = 8,
        *,
        features: int = 0,
        mem_size: int = 0x10000,
        memory: Memory | None = None,
        activate: bool = True,
        **kwargs: bool,
    ) -> None:
        self.size = size
        self.flat = FlatMemory(mem_size)
        self.layout = SplitLayout.contiguous(self.DESC_AT, size, 16)
        self.mem = memory if memory is not None else self.flat
        self.q = DeviceQueue(self.mem, self.layout, features, **kwargs)
        if activate:
            self.q.activate()
        self.idx = 0

    def raw(self) -> memoryview:
        return self.flat.raw()

    def desc(self, index: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        DESC.pack_into(self.raw(), self.layout.desc + index * DESC_SIZE, addr, length, flags, nxt)

    def table(self, at: int, entries: Sequence[tuple[int, int, int, int]]) -> tuple[int, int]:
        """Write an indirect table at ``at``; returns ``(at, byte length)``."""
        for i, (addr, length, flags, nxt) in enumerate(entries):
            DESC.pack_into(self.raw(), at + i * DESC_SIZE, addr, length, flags, nxt)
        return at, len(entries) * DESC_SIZE

    def set_avail_idx(self, value: int) -> None:
        _U16.pack_into(self.raw(), self.layout.avail + 2, value & 0xFFFF)

    def offer(self, *heads: int) -> None:
        """Put ``heads`` into the avail ring and move ``avail.idx`` past them."""
        for h in heads:
            slot = self.layout.avail + 4 + 2 * (self.idx % self.size)
            _U16.pack_into(self.raw(), slot, h)
            self.idx = (self.idx + 1) & 0xFFFF
        self.set_avail_idx(self.idx)

    def used(self, slot: int) -> tuple[int, int]:
        off = self.layout.used + 4 + 8 * (slot % self.size)
        return USED_ELEM.unpack_from(self.raw(), off)
