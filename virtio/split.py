"""The split virtqueue core (virtio 1.2 §2.7): driver side and device side, sans-IO.

Owns every rule about a split ring: layout validation, building and walking
descriptor chains, used-ring bookkeeping, notification suppression (flags and
EVENT_IDX), reset and save/restore. Must not import asyncio, the OS or
``transport``: it works on a :class:`virtio.memory.Memory` and *returns* what
must happen (a chain to serve, whether to kick, whether to interrupt); the
host and card adapters ring doorbells and sleep.

Trust model. The device side treats everything in the avail ring and the
descriptor table as hostile (the checks follow QEMU ``virtqueue_split_pop``,
Linux ``vhost_get_vq_desc``/``vringh`` and rust-vmm ``virtio-queue``, and
raise where those silently truncate). The driver side treats the used ring as
hostile (Linux ``virtqueue_get_buf_ctx_split``: ``id`` must be an outstanding
head; ``len`` is clamped to the writable size because the 2021 length check
was reverted upstream). Any such violation raises :class:`RingError` (a
:class:`~virtio.errors.RemoteProtocolError`) and latches the queue broken, as
QEMU's ``virtio_error`` does; the caller then sets DEVICE_NEEDS_RESET.

Hot path. Descriptors go through one precompiled ``struct.Struct`` (tested
against the construct declaration in :mod:`virtio.layouts`); ring indices and
every word the peer polls are read and published through ``memoryview.cast``
views with one aligned store, never ``struct.pack_into`` (see
``tests/virtio/test_publish.py`` for the torn-write demonstration).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Generic, TypeVar

from virtio.constants import VRING_SIZE_MAX, DescFlag, Feature, RingFlag
from virtio.errors import (
    BrokenResourceError,
    LocalProtocolError,
    RemoteProtocolError,
    WouldBlock,
)
from virtio.layouts import SPLIT_DESC_STRUCT, USED_ELEM_STRUCT, vring_offsets, vring_size
from virtio.memory import ADDRESS_LIMIT, Memory, MemoryFault

__all__ = [
    "DESC",
    "DESC_SIZE",
    "USED_ELEM",
    "Chain",
    "DeviceQueue",
    "DriverQueue",
    "QueueBroken",
    "QueueState",
    "RingError",
    "RingFault",
    "SplitLayout",
    "full_fence",
    "need_event",
    "gather_segments",
    "scatter_segments",
    "slice_segments",
]

#: ``struct vring_desc {le64 addr; le32 len; le16 flags; le16 next}`` (§2.7.5) and
#: ``struct vring_used_elem {le32 id; le32 len}`` (§2.7.8): the precompiled
#: twins of the construct declarations, tested byte for byte against them.
DESC = SPLIT_DESC_STRUCT
DESC_SIZE = DESC.size
USED_ELEM = USED_ELEM_STRUCT

_NEXT = int(DescFlag.NEXT)
_WRITE = int(DescFlag.WRITE)
_INDIRECT = int(DescFlag.INDIRECT)
_NO_INTERRUPT = int(RingFlag.NO_INTERRUPT)
_NO_NOTIFY = int(RingFlag.NO_NOTIFY)
_U32_LIMIT = 1 << 32


class RingFault(StrEnum):
    """Why a peer's ring was refused; ``RingError.reason`` carries one of these."""

    BAD_SIZE = "bad-queue-size"
    MISALIGNED = "misaligned-ring"
    RING_OUT_OF_MEMORY = "ring-outside-memory"
    AVAIL_IDX_JUMP = "avail-index-jump"
    HEAD_OUT_OF_RANGE = "head-out-of-range"
    HEAD_IN_USE = "head-already-in-use"
    NEXT_OUT_OF_RANGE = "next-out-of-range"
    CHAIN_TOO_LONG = "chain-too-long"
    NESTED_INDIRECT = "nested-indirect"
    INDIRECT_WITH_NEXT = "indirect-with-next"
    INDIRECT_BAD_LEN = "indirect-bad-length"
    INDIRECT_TOO_LONG = "indirect-too-long"
    INDIRECT_NOT_NEGOTIATED = "indirect-not-negotiated"
    READABLE_AFTER_WRITABLE = "readable-after-writable"
    ZERO_LENGTH = "zero-length-buffer"
    CHAIN_TOO_BIG = "chain-too-big"
    ADDRESS_OVERFLOW = "address-overflow"
    BUFFER_OUT_OF_MEMORY = "buffer-outside-memory"
    NO_WRITABLE = "no-writable-buffer"
    NO_READABLE = "no-readable-buffer"
    USED_IDX_JUMP = "used-index-jump"
    USED_ID_OUT_OF_RANGE = "used-id-out-of-range"
    USED_ID_NOT_HEAD = "used-id-not-outstanding"


class RingError(RemoteProtocolError):
    """The peer broke a ring rule; the queue is now latched broken."""

    def __init__(self, fault: RingFault, message: str) -> None:
        super().__init__(f"{fault.value}: {message}", reason=fault.value)
        self.fault = fault


class QueueBroken(BrokenResourceError):
    """The queue was latched broken by an earlier :class:`RingError`; reset it."""


_fence_lock = threading.Lock()


def full_fence() -> None:
    """A full memory barrier between a store to the ring and a later load.

    Every notification decision is a Dekker handshake: one side stores its
    index (or event word) and then loads the peer's, the peer does the
    mirror image. x86 may let a load pass an earlier store (the store
    buffer), and then both sides read the other's old value and both decide
    "no wake-up needed": a lost wake-up. Linux puts ``virtio_mb()`` at each
    such point; CPython has no fence primitive, so this is an uncontended
    lock round trip, whose locked read-modify-write is a full barrier on x86
    (the same device ``transport.notify`` uses). Not I/O: the core stays sans-IO.
    """
    _fence_lock.acquire()
    _fence_lock.release()


def need_event(event: int, new: int, old: int) -> bool:
    """``vring_need_event`` (§2.7.10): did ``event`` fall in ``(old, new]``?"""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


@dataclass(frozen=True, slots=True)
class SplitLayout:
    """Where a split ring's three parts live (bus addresses) and its size."""

    size: int
    desc: int
    avail: int
    used: int

    @property
    def desc_bytes(self) -> int:
        return DESC_SIZE * self.size

    @property
    def avail_bytes(self) -> int:
        return 6 + 2 * self.size

    @property
    def used_bytes(self) -> int:
        return 6 + 8 * self.size

    @classmethod
    def contiguous(cls, base: int, size: int, align: int = 4096) -> SplitLayout:
        """The legacy single-block layout of Linux ``vring_init(num, align)``.

        Raises:
            LocalProtocolError: ``size`` outside 1..32768 or ``align`` not a power of two.
        """
        _, avail, used = vring_offsets(size, align)
        return cls(size, base, base + avail, base + used)

    @staticmethod
    def contiguous_bytes(size: int, align: int = 4096) -> int:
        """Linux ``vring_size(num, align)``: bytes the contiguous layout spans."""
        return vring_size(size, align)

    def problem(self, max_size: int = VRING_SIZE_MAX) -> tuple[RingFault, str] | None:
        """The first rule this layout breaks (size, alignment, overflow), or None."""
        n = self.size
        if n <= 0 or n & (n - 1) or n > min(max_size, VRING_SIZE_MAX):
            return RingFault.BAD_SIZE, (
                f"queue size {n} is not a power of two in [1, {min(max_size, VRING_SIZE_MAX)}]"
            )
        for name, addr, align, length in (
            ("descriptor table", self.desc, 16, self.desc_bytes),
            ("avail ring", self.avail, 2, self.avail_bytes),
            ("used ring", self.used, 4, self.used_bytes),
        ):
            if addr % align:
                return RingFault.MISALIGNED, f"{name} at {addr:#x} not {align}-byte aligned"
            if addr < 0 or addr + length > ADDRESS_LIMIT:
                return RingFault.ADDRESS_OVERFLOW, f"{name} at {addr:#x} overflows"
        return None


@dataclass(slots=True)
class Chain:
    """One descriptor chain popped by the device.

    ``readable``/``writable`` are zero-copy views of the driver's buffers, in
    chain order; ``segments`` holds ``(addr, length, is_writable)`` for users
    that move data with a DMA engine instead. Release the views (drop the chain)
    before the memory they point into is unmapped.
    """

    head: int
    readable: list[memoryview]
    writable: list[memoryview]
    readable_len: int
    writable_len: int
    segments: list[tuple[int, int, bool]]

    def read(self) -> bytes:
        """All readable bytes, concatenated (one copy)."""
        if len(self.readable) == 1:
            return bytes(self.readable[0])
        return b"".join(self.readable)

    def read_into(self, dst: memoryview, offset: int = 0) -> int:
        """Copy readable bytes from ``offset`` into ``dst``; returns bytes copied."""
        return gather_segments(self.readable, dst, offset)

    def write(self, data: bytes | bytearray | memoryview, offset: int = 0) -> int:
        """Scatter ``data`` into the writable buffers from ``offset``; returns bytes written."""
        return scatter_segments(self.writable, data, offset)


def gather_segments(views: Sequence[memoryview], dst: memoryview, offset: int = 0) -> int:
    """Copy the scatter list's bytes from ``offset`` into ``dst`` (as many as fit);
    returns bytes copied. One copy, no join."""
    done = 0
    for seg in slice_segments(views, offset, len(dst)):
        n = len(seg)
        dst[done : done + n] = seg
        done += n
    return done


def scatter_segments(
    views: Sequence[memoryview], data: bytes | bytearray | memoryview, offset: int = 0
) -> int:
    """Copy ``data`` into the scatter list from ``offset``; returns bytes written
    (fewer when the list ends first)."""
    src = memoryview(data).cast("B")
    done = 0
    for seg in slice_segments(views, offset, len(src)):
        n = len(seg)
        seg[:] = src[done : done + n]
        done += n
    return done


def slice_segments(views: Sequence[memoryview], start: int, length: int) -> list[memoryview]:
    """The byte range ``[start, start+length)`` of a scatter list, as views (no copy).

    Shorter than ``length`` when the list ends first. This is the one walk over
    a chain's buffers: :func:`gather_segments`, :func:`scatter_segments` and
    the backends (``preadv``/``pwritev`` straight into card memory) all use it.
    """
    out: list[memoryview] = []
    if length <= 0:
        return out
    for v in views:
        n = len(v)
        if start >= n:
            start -= n
            continue
        take = min(n - start, length)
        out.append(v[start : start + take])
        length -= take
        start = 0
        if not length:
            break
    return out


@dataclass(frozen=True, slots=True)
class QueueState:
    """A device queue's private state, enough to rebuild it elsewhere (migration)."""

    layout: SplitLayout
    next_avail: int
    next_used: int
    event_idx: bool
    indirect: bool
    ready: bool
    inflight: tuple[int, ...]
    notify_enabled: bool = True
    #: used.idx as last published; None means "equal to next_used".
    published_used: int | None = None


def _views(
    mem: Memory, layout: SplitLayout, *, desc_w: bool, avail_w: bool, used_w: bool
) -> tuple[memoryview, memoryview, memoryview]:
    return (
        mem.view(layout.desc, layout.desc_bytes, desc_w),
        mem.view(layout.avail, layout.avail_bytes, avail_w),
        mem.view(layout.used, layout.used_bytes, used_w),
    )


class DeviceQueue:
    """The device (host/backend) side of a split ring. Every input is untrusted.

    Typical loop in an adapter::

        while (chain := q.pop()) is not None:
            n = serve(chain)
            q.add_used(chain.head, n)
        if q.publish_used():
            raise_interrupt()

    Raises :class:`RingError` on any malformed peer input (and latches the
    queue), :class:`QueueBroken` on use after that, :class:`LocalProtocolError`
    on misuse by the caller (pop before :meth:`activate`, pushing a head that
    is not in flight).
    """

    __slots__ = (
        "_avail_h",
        "_desc",
        "_inflight",
        "_mask",
        "_mem",
        "_next_avail",
        "_next_used",
        "_published_used",
        "_used_h",
        "_used_i",
        "broken",
        "errors",
        "event_idx",
        "indirect",
        "layout",
        "notify_enabled",
        "ready",
        "require_readable",
        "require_writable",
        "size",
    )

    def __init__(
        self,
        mem: Memory,
        layout: SplitLayout,
        features: int,
        *,
        max_size: int = VRING_SIZE_MAX,
        require_readable: bool = False,
        require_writable: bool = False,
    ) -> None:
        """Validate the layout the driver gave and map the ring.

        Raises:
            RingError: bad size, misaligned part, ring outside memory.
        """
        self.layout = layout
        self.size = layout.size
        self.event_idx = bool(features & Feature.EVENT_IDX)
        self.indirect = bool(features & Feature.INDIRECT_DESC)
        self.require_readable = require_readable
        self.require_writable = require_writable
        self.broken = False
        self.errors = 0
        self.ready = False
        self.notify_enabled = True
        self._mem = mem
        bad = layout.problem(max_size)
        if bad is not None:
            self._fail(*bad)
        try:
            desc, avail, used = _views(mem, layout, desc_w=False, avail_w=False, used_w=True)
        except MemoryFault as e:
            self.broken = True
            raise RingError(RingFault.RING_OUT_OF_MEMORY, str(e)) from e
        self._desc = desc
        self._avail_h = avail.cast("H")
        self._used_h = used.cast("H")
        self._used_i = used[4 : 4 + 8 * self.size].cast("I")
        self._mask = self.size - 1
        self._inflight = bytearray(self.size)
        self._next_avail = 0
        self._next_used = 0
        self._published_used = 0

    # -- lifecycle ---------------------------------------------------------
    def activate(self) -> None:
        """Allow consumption; call on DRIVER_OK (§3.1.1: none before it)."""
        self.ready = True

    def reset(self) -> None:
        """Forget every index and in-flight head and clear the broken latch (§2.6)."""
        self._next_avail = self._next_used = self._published_used = 0
        self._inflight = bytearray(self.size)
        # The used ring is ours: clear flags, idx and avail_event so no stale
        # NO_NOTIFY or index survives the reset (Linux virtqueue_reset_split).
        self._used_h[0] = self._used_h[1] = self._used_h[2 + 4 * self.size] = 0
        self.broken = False
        self.ready = False
        self.notify_enabled = True

    def save(self) -> QueueState:
        """Snapshot the private state (no shared memory is copied)."""
        return QueueState(
            layout=self.layout,
            next_avail=self._next_avail,
            next_used=self._next_used,
            event_idx=self.event_idx,
            indirect=self.indirect,
            ready=self.ready,
            inflight=tuple(i for i, f in enumerate(self._inflight) if f),
            notify_enabled=self.notify_enabled,
            published_used=self._published_used,
        )

    @classmethod
    def restore(cls, mem: Memory, state: QueueState, **kwargs: bool | int) -> DeviceQueue:
        """Rebuild a queue from :meth:`save`, re-running every check.

        Raises:
            RingError: the layout is invalid in ``mem``.
            LocalProtocolError: the state itself is inconsistent.
        """
        features = (Feature.EVENT_IDX if state.event_idx else 0) | (
            Feature.INDIRECT_DESC if state.indirect else 0
        )
        q = cls(mem, state.layout, int(features), **kwargs)  # type: ignore[arg-type]
        in_flight = (state.next_avail - state.next_used) & 0xFFFF
        if (
            len(state.inflight) != in_flight
            or len(set(state.inflight)) != len(state.inflight)
            or any(not 0 <= h < q.size for h in state.inflight)
        ):
            raise LocalProtocolError("inconsistent queue state: in-flight heads do not add up")
        q._next_avail = state.next_avail & 0xFFFF
        q._next_used = state.next_used & 0xFFFF
        pub = state.next_used if state.published_used is None else state.published_used
        if ((state.next_used - pub) & 0xFFFF) > q.size:
            raise LocalProtocolError("inconsistent queue state: staged completions exceed size")
        q._published_used = pub & 0xFFFF
        for h in state.inflight:
            q._inflight[h] = 1
        q.ready = state.ready
        q.notify_enabled = state.notify_enabled
        return q

    # -- errors ------------------------------------------------------------
    def _fail(self, fault: RingFault, message: str) -> None:
        self.broken = True
        self.errors += 1
        raise RingError(fault, message)

    def _check_usable(self) -> None:
        if self.broken:
            raise QueueBroken("queue is broken after a ring error; reset the device")
        if not self.ready:
            raise LocalProtocolError("queue not activated: no buffer is used before DRIVER_OK")

    # -- consuming ---------------------------------------------------------
    @property
    def next_avail(self) -> int:
        return self._next_avail

    @property
    def in_flight(self) -> int:
        """Chains popped and not yet pushed back."""
        return (self._next_avail - self._next_used) & 0xFFFF

    def pending(self) -> int:
        """Chains the driver has made available that we have not popped.

        Raises:
            RingError: ``avail.idx`` moved more than the queue size.
        """
        n = (self._avail_h[1] - self._next_avail) & 0xFFFF
        if n > self.size:
            self._fail(
                RingFault.AVAIL_IDX_JUMP,
                f"avail.idx {self._avail_h[1]} is {n} ahead of {self._next_avail} "
                f"on a ring of {self.size}",
            )
        return n

    def pop(self) -> Chain | None:
        """The next available chain, validated, or None when the ring is empty.

        Raises:
            RingError: anything malformed in the avail ring or the chain.
            QueueBroken: the queue was broken earlier.
            LocalProtocolError: before :meth:`activate`.
        """
        if self.broken or not self.ready:
            self._check_usable()
        nxt = self._next_avail
        avail_idx = self._avail_h[1]
        if avail_idx == nxt:
            return None
        if ((avail_idx - nxt) & 0xFFFF) > self.size:
            self.pending()  # raises AVAIL_IDX_JUMP
        head = self._avail_h[2 + (nxt & self._mask)]
        if head >= self.size:
            self._fail(RingFault.HEAD_OUT_OF_RANGE, f"avail head {head} >= size {self.size}")
        if self._inflight[head]:
            self._fail(RingFault.HEAD_IN_USE, f"head {head} is already in flight")
        chain = self._walk(head)
        self._inflight[head] = 1
        nxt = (nxt + 1) & 0xFFFF
        self._next_avail = nxt
        if self.event_idx and self.notify_enabled:
            # QEMU virtqueue_split_pop: keep avail_event at what we have consumed.
            self._used_h[2 + 4 * self.size] = nxt
            full_fence()  # the next pop must see kicks the driver decided against
        return chain

    def pop_many(self, limit: int = VRING_SIZE_MAX) -> list[Chain]:
        """Up to ``limit`` chains: the batch one doorbell brought (same checks as :meth:`pop`).

        If a chain in the batch is malformed, :class:`RingError` is raised and
        the chains validated before it are dropped with the broken queue: the
        device must be reset (which forgets every in-flight head) either way.
        """
        if self.broken or not self.ready:
            self._check_usable()
        nxt = self._next_avail
        ah = self._avail_h
        n = (ah[1] - nxt) & 0xFFFF
        if not n:
            return []
        if n > self.size:
            self.pending()  # raises AVAIL_IDX_JUMP
        if n > limit:
            n = limit
        size, mask, inflight, walk = self.size, self._mask, self._inflight, self._walk
        out: list[Chain] = []
        for _ in range(n):
            head = ah[2 + (nxt & mask)]
            if head >= size:
                self._fail(RingFault.HEAD_OUT_OF_RANGE, f"avail head {head} >= size {size}")
            if inflight[head]:
                self._fail(RingFault.HEAD_IN_USE, f"head {head} is already in flight")
            out.append(walk(head))
            inflight[head] = 1
            nxt = (nxt + 1) & 0xFFFF
            self._next_avail = nxt
        if self.event_idx and self.notify_enabled:
            self._used_h[2 + 4 * size] = nxt
            full_fence()
        return out

    def _walk(self, head: int) -> Chain:
        addr, length, flags, _ = DESC.unpack_from(self._desc, head * DESC_SIZE)
        if not flags & (_NEXT | _INDIRECT) and length and addr + length <= ADDRESS_LIMIT:
            # Fast path: a chain of one direct buffer (the common small request).
            # Anything unusual falls through to the full walk, which diagnoses it.
            try:
                if flags & _WRITE:
                    if not self.require_readable:
                        seg = self._mem.view(addr, length, True)
                        return Chain(head, [], [seg], 0, length, [(addr, length, True)])
                elif not self.require_writable:
                    seg = self._mem.view(addr, length, False)
                    return Chain(head, [seg], [], length, 0, [(addr, length, False)])
            except MemoryFault as e:
                self._fail(RingFault.BUFFER_OUT_OF_MEMORY, str(e))
        return self._walk_slow(head)

    def _walk_slow(self, head: int) -> Chain:
        size = self.size
        table = self._desc
        table_size = size
        unpack = DESC.unpack_from
        view = self._mem.view
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        segments: list[tuple[int, int, bool]] = []
        rlen = wlen = 0
        count = 0
        in_indirect = False
        idx = head
        fail = self._fail
        while True:
            count += 1
            if count > size:
                fail(
                    RingFault.CHAIN_TOO_LONG,
                    f"chain from head {head} exceeds the queue size {size} (loop or too long)",
                )
            addr, length, flags, nxt = unpack(table, idx * DESC_SIZE)
            if flags & _INDIRECT:
                if in_indirect:
                    fail(RingFault.NESTED_INDIRECT, f"nested indirect table in chain {head}")
                if not self.indirect:
                    fail(RingFault.INDIRECT_NOT_NEGOTIATED, f"INDIRECT in chain {head}")
                if flags & _NEXT:
                    fail(RingFault.INDIRECT_WITH_NEXT, f"INDIRECT with NEXT in chain {head}")
                if length == 0 or length % DESC_SIZE:
                    fail(RingFault.INDIRECT_BAD_LEN, f"indirect table length {length}")
                n = length // DESC_SIZE
                if n > size:
                    fail(RingFault.INDIRECT_TOO_LONG, f"indirect table of {n} > size {size}")
                if addr + length > ADDRESS_LIMIT:
                    fail(RingFault.ADDRESS_OVERFLOW, f"indirect table at {addr:#x}+{length}")
                try:
                    table = view(addr, length, False)
                except MemoryFault as e:
                    fail(RingFault.BUFFER_OUT_OF_MEMORY, f"indirect table: {e}")
                table_size = n
                in_indirect = True
                count -= 1  # the pointer is not a buffer; its entries are counted
                idx = 0
                continue
            if length == 0:
                fail(RingFault.ZERO_LENGTH, f"zero-length buffer in chain {head}")
            if addr + length > ADDRESS_LIMIT:
                fail(RingFault.ADDRESS_OVERFLOW, f"buffer {addr:#x}+{length} overflows")
            is_w = bool(flags & _WRITE)
            try:
                seg = view(addr, length, is_w)
            except MemoryFault as e:
                fail(RingFault.BUFFER_OUT_OF_MEMORY, str(e))
            if is_w:
                writable.append(seg)
                wlen += length
            else:
                if writable:
                    fail(
                        RingFault.READABLE_AFTER_WRITABLE,
                        f"readable descriptor after a writable one in chain {head}",
                    )
                readable.append(seg)
                rlen += length
            segments.append((addr, length, is_w))
            if not flags & _NEXT:
                break
            if nxt >= table_size:
                fail(RingFault.NEXT_OUT_OF_RANGE, f"next {nxt} >= table size {table_size}")
            idx = nxt
        if rlen + wlen >= _U32_LIMIT:
            fail(RingFault.CHAIN_TOO_BIG, f"chain {head} totals {rlen + wlen} B >= 2^32")
        if self.require_writable and not wlen:
            fail(RingFault.NO_WRITABLE, f"chain {head} has no writable buffer")
        if self.require_readable and not rlen:
            fail(RingFault.NO_READABLE, f"chain {head} has no readable buffer")
        return Chain(head, readable, writable, rlen, wlen, segments)

    # -- completing --------------------------------------------------------
    def add_used(self, head: int, length: int) -> None:
        """Stage a used entry (not yet visible; see :meth:`publish_used`).

        Raises:
            LocalProtocolError: ``head`` is not a chain we popped, or ``length``
                does not fit in 32 bits.
            QueueBroken: the queue is broken.
        """
        if self.broken:
            raise QueueBroken("queue is broken after a ring error; reset the device")
        if not 0 <= head < self.size or not self._inflight[head]:
            raise LocalProtocolError(f"head {head} is not in flight")
        if not 0 <= length < _U32_LIMIT:
            raise LocalProtocolError(f"used length {length} out of range")
        self._inflight[head] = 0
        i = 2 * (self._next_used & self._mask)
        # Entries are written before used.idx is published (§2.7.8.2), so a
        # plain store is fine here; only the index needs the single-store rule.
        self._used_i[i] = head
        self._used_i[i + 1] = length
        self._next_used = (self._next_used + 1) & 0xFFFF

    def add_used_many(self, entries: Iterable[tuple[int, int]]) -> None:
        """Stage several used entries (same checks as :meth:`add_used`)."""
        if self.broken:
            raise QueueBroken("queue is broken after a ring error; reset the device")
        inflight, ui, mask, size = self._inflight, self._used_i, self._mask, self.size
        nu = self._next_used
        try:
            for head, length in entries:
                if not 0 <= head < size or not inflight[head]:
                    raise LocalProtocolError(f"head {head} is not in flight")
                if not 0 <= length < _U32_LIMIT:
                    raise LocalProtocolError(f"used length {length} out of range")
                inflight[head] = 0
                i = 2 * (nu & mask)
                ui[i] = head
                ui[i + 1] = length
                nu = (nu + 1) & 0xFFFF
        finally:
            self._next_used = nu

    def publish_used(self) -> bool:
        """Make staged used entries visible with one aligned store of ``used.idx``.

        Returns whether the driver wants an interrupt now (EVENT_IDX
        ``used_event`` or the NO_INTERRUPT flag, §2.7.7/2.7.10).
        """
        old = self._published_used
        new = self._next_used
        if old == new:
            return False
        self._used_h[1] = new
        self._published_used = new
        full_fence()  # store used.idx, then load used_event/flags (virtio_mb in vring)
        if self.event_idx:
            return need_event(self._avail_h[2 + self.size], new, old)
        return not self._avail_h[0] & _NO_INTERRUPT

    def push_used(self, head: int, length: int) -> bool:
        """:meth:`add_used` then :meth:`publish_used`."""
        self.add_used(head, length)
        return self.publish_used()

    # -- notification suppression -----------------------------------------
    def disable_notifications(self) -> None:
        """Ask the driver not to kick (NO_NOTIFY, or a stale ``avail_event``)."""
        self.notify_enabled = False
        if not self.event_idx:
            self._used_h[0] = _NO_NOTIFY

    def enable_notifications(self) -> bool:
        """Ask for kicks again, then re-check the ring.

        Returns True when buffers arrived meanwhile: the caller must pop them
        instead of sleeping, or it would lose the wake-up (vhost_enable_notify).
        """
        self.notify_enabled = True
        if self.event_idx:
            self._used_h[2 + 4 * self.size] = self._next_avail
        else:
            self._used_h[0] = 0
        full_fence()  # store the request for kicks, then re-load avail.idx
        return self._avail_h[1] != self._next_avail


T = TypeVar("T")


class DriverQueue(Generic[T]):
    """The driver (card) side of a split ring. The used ring is untrusted.

    ``add`` writes descriptors and an avail slot; ``publish`` makes them
    visible with one store of ``avail.idx`` and says whether to kick;
    ``get_used`` returns ``(token, length)`` for completed chains.

    Raises :class:`WouldBlock` when the ring has no room, :class:`RingError`
    for a device that writes an illegal used ring (queue latched), and
    :class:`LocalProtocolError` for the caller's mistakes.
    """

    __slots__ = (
        "_avail_h",
        "_chain_len",
        "_desc",
        "_free",
        "_ind",
        "_ind_max",
        "_ind_view",
        "_last_used",
        "_mask",
        "_next",
        "_published",
        "_shadow",
        "_tokens",
        "_used_h",
        "_used_i",
        "_wlen",
        "broken",
        "event_idx",
        "indirect",
        "interrupts_enabled",
        "layout",
        "num_free",
        "size",
    )

    def __init__(
        self,
        mem: Memory,
        layout: SplitLayout,
        features: int,
        *,
        indirect_area: int | None = None,
        indirect_max: int = 0,
    ) -> None:
        """Map and initialise the ring (descriptor table and avail ring zeroed).

        ``indirect_area``, when INDIRECT_DESC is negotiated, is a bus address
        of ``size * indirect_max * 16`` bytes: head ``h`` uses the slot at
        ``indirect_area + h * indirect_max * 16`` for its table, so no
        allocation happens per request.

        Raises:
            LocalProtocolError: the layout or indirect area is invalid here.
        """
        bad = layout.problem()
        if bad is not None:
            raise LocalProtocolError(bad[1])
        if indirect_max < 0:
            raise LocalProtocolError(f"indirect_max {indirect_max} is negative")
        # §2.7.5.3.1: no indirect table longer than the queue size
        indirect_max = min(indirect_max, layout.size)
        self.layout = layout
        self.size = n = layout.size
        self.event_idx = bool(features & Feature.EVENT_IDX)
        try:
            desc, avail, used = _views(mem, layout, desc_w=True, avail_w=True, used_w=False)
            ind_view = None
            if features & Feature.INDIRECT_DESC and indirect_area is not None and indirect_max:
                ind_view = mem.view(indirect_area, n * indirect_max * DESC_SIZE, True)
        except MemoryFault as e:
            raise LocalProtocolError(f"ring not reachable: {e}") from e
        self.indirect = ind_view is not None
        self._ind_view = ind_view
        self._ind = indirect_area or 0
        self._ind_max = indirect_max if ind_view is not None else 0
        desc[:] = bytes(len(desc))
        avail[:] = bytes(len(avail))
        self._desc = desc
        self._avail_h = avail.cast("H")
        self._used_h = used.cast("H")
        self._used_i = used[4 : 4 + 8 * n].cast("I")
        self._mask = n - 1
        self._init_state()

    def _init_state(self) -> None:
        n = self.size
        self._next = [*range(1, n), 0]  # private shadow of the free list
        self._free = 0
        self.num_free = n
        self._tokens: list[T | None] = [None] * n
        self._chain_len = [0] * n
        self._wlen = [0] * n
        self._shadow = 0
        self._published = 0
        self._last_used = 0
        self.broken = False
        self.interrupts_enabled = True

    def reset(self) -> None:
        """Return to the just-initialised state (after a device reset)."""
        self._desc[:] = bytes(len(self._desc))
        self._avail_h[0] = self._avail_h[1] = self._avail_h[2 + self.size] = 0
        self._init_state()

    # -- adding ------------------------------------------------------------
    def add(
        self,
        readable: Sequence[tuple[int, int]],
        writable: Sequence[tuple[int, int]],
        token: T,
    ) -> int:
        """Put one chain (readable buffers, then writable) into the ring; return its head.

        Not visible to the device until :meth:`publish`.

        Raises:
            WouldBlock: not enough free descriptors.
            LocalProtocolError: empty chain, zero-length buffer, chain >= 2^32 B,
                ``token`` is None.
            QueueBroken: the queue is broken.
        """
        nr = len(readable)
        nseg = nr + len(writable)
        if nseg == 1 and self.num_free and token is not None and not self.broken:
            # Fast path: one buffer (checks inline, same rules as below).
            if nr:
                addr, ln = readable[0]
                flags = 0
            else:
                addr, ln = writable[0]
                flags = _WRITE
            if 0 < ln < _U32_LIMIT:
                head = self._free
                DESC.pack_into(self._desc, head * DESC_SIZE, addr, ln, flags, 0)
                self._free = self._next[head]
                self.num_free -= 1
                self._chain_len[head] = 1
                self._wlen[head] = ln if flags else 0
                self._tokens[head] = token
                sh = self._shadow
                self._avail_h[2 + (sh & self._mask)] = head
                self._shadow = (sh + 1) & 0xFFFF
                return head
        if self.broken:
            raise QueueBroken("queue is broken after a ring error; reset the device")
        if token is None:
            raise LocalProtocolError("token must not be None")
        if nseg == 0:
            raise LocalProtocolError("a chain needs at least one buffer")
        if nseg > self.size:
            raise LocalProtocolError(f"chain of {nseg} buffers exceeds the queue size {self.size}")
        rtotal = wtotal = 0
        for _, ln in readable:
            if ln <= 0:
                raise LocalProtocolError("zero-length buffers are not allowed (§2.7.4)")
            rtotal += ln
        for _, ln in writable:
            if ln <= 0:
                raise LocalProtocolError("zero-length buffers are not allowed (§2.7.4)")
            wtotal += ln
        if rtotal + wtotal >= _U32_LIMIT:
            raise LocalProtocolError("chain of 2^32 bytes or more (§2.7.4)")
        use_ind = 1 < nseg <= self._ind_max
        need = 1 if use_ind else nseg
        if need > self.num_free:
            raise WouldBlock(f"{need} descriptors needed, {self.num_free} free")
        pack = DESC.pack_into
        head = self._free
        if use_ind:
            assert self._ind_view is not None
            slot = head * self._ind_max * DESC_SIZE
            tbl = self._ind_view
            i = 0
            for addr, ln in readable:
                pack(tbl, slot + i * DESC_SIZE, addr, ln, _NEXT, i + 1)
                i += 1
            for addr, ln in writable:
                pack(tbl, slot + i * DESC_SIZE, addr, ln, _WRITE | _NEXT, i + 1)
                i += 1
            # clear NEXT on the last entry
            last = slot + (i - 1) * DESC_SIZE
            a, ln, fl, _ = DESC.unpack_from(tbl, last)
            pack(tbl, last, a, ln, fl & ~_NEXT, 0)
            pack(self._desc, head * DESC_SIZE, self._ind + slot, nseg * DESC_SIZE, _INDIRECT, 0)
            self._free = self._next[head]
        else:
            nxt_list = self._next
            idx = head
            desc = self._desc
            k = 0
            for addr, ln in readable:
                k += 1
                nxt = nxt_list[idx]
                pack(desc, idx * DESC_SIZE, addr, ln, _NEXT if k < nseg else 0, nxt)
                last_idx, idx = idx, nxt
            for addr, ln in writable:
                k += 1
                nxt = nxt_list[idx]
                pack(desc, idx * DESC_SIZE, addr, ln, _WRITE | (_NEXT if k < nseg else 0), nxt)
                last_idx, idx = idx, nxt
            self._free = idx
            del last_idx
        self.num_free -= need
        self._chain_len[head] = need
        self._wlen[head] = wtotal
        self._tokens[head] = token
        self._avail_h[2 + (self._shadow & self._mask)] = head
        self._shadow = (self._shadow + 1) & 0xFFFF
        return head

    def publish(self) -> bool:
        """Expose added chains (one aligned store of ``avail.idx``); return whether to kick.

        The kick decision is Linux ``virtqueue_kick_prepare_split``: EVENT_IDX
        ``avail_event`` or the device's NO_NOTIFY flag.
        """
        old = self._published
        new = self._shadow
        if old == new:
            return False
        self._avail_h[1] = new
        self._published = new
        full_fence()  # store avail.idx, then load avail_event/flags (virtqueue_kick_prepare)
        if self.event_idx:
            return need_event(self._used_h[2 + 4 * self.size], new, old)
        return not self._used_h[0] & _NO_NOTIFY

    # -- completions -------------------------------------------------------
    @property
    def outstanding(self) -> int:
        """Chains published or added and not yet returned by the device."""
        return (self._shadow - self._last_used) & 0xFFFF

    def _fail(self, fault: RingFault, message: str) -> None:
        self.broken = True
        raise RingError(fault, message)

    def _unpublished(self, head: int) -> bool:
        """Is ``head`` added but not yet published (so the device cannot know it)?"""
        ah, mask = self._avail_h, self._mask
        i = self._published
        while i != self._shadow:
            if ah[2 + (i & mask)] == head:
                return True
            i = (i + 1) & 0xFFFF
        return False

    def get_used(self) -> tuple[T, int] | None:
        """The next completed chain as ``(token, length)``, or None.

        ``length`` is clamped to the chain's writable size: the device's
        ``len`` is untrusted (and may be an underestimate, §2.7.8).

        Raises:
            RingError: the device moved ``used.idx`` too far, or returned an id
                that is out of range or not an outstanding head.
            QueueBroken: the queue is broken.
        """
        if self.broken:
            raise QueueBroken("queue is broken after a ring error; reset the device")
        last = self._last_used
        used_idx = self._used_h[1]
        if used_idx == last:
            return None
        if ((used_idx - last) & 0xFFFF) > ((self._published - last) & 0xFFFF):
            self._fail(
                RingFault.USED_IDX_JUMP,
                f"used.idx {used_idx} moved past the {self.outstanding} outstanding chains",
            )
        ui = self._used_i
        i = 2 * (last & self._mask)
        head = ui[i]
        length = ui[i + 1]
        if head >= self.size:
            self._fail(RingFault.USED_ID_OUT_OF_RANGE, f"used id {head} >= size {self.size}")
        token = self._tokens[head]
        if token is None or (self._shadow != self._published and self._unpublished(head)):
            self._fail(RingFault.USED_ID_NOT_HEAD, f"used id {head} is not an outstanding head")
        assert token is not None
        self._tokens[head] = None
        # Return the chain's descriptors to the free list from our private
        # shadow, never from the (device-writable) table.
        n = self._chain_len[head]
        tail = head
        if n > 1:
            nx = self._next
            for _ in range(n - 1):
                tail = nx[tail]
        self._next[tail] = self._free
        self._free = head
        self.num_free += n
        wlen = self._wlen[head]
        last = (last + 1) & 0xFFFF
        self._last_used = last
        if self.event_idx and self.interrupts_enabled:
            self._avail_h[2 + self.size] = last  # used_event (virtqueue_get_buf_ctx_split)
            full_fence()  # virtio_store_mb: the next get_used must see what we asked for
        return token, (length if length <= wlen else wlen)

    def get_used_many(self, limit: int = 1 << 16) -> list[tuple[T, int]]:
        """Every completed chain (up to ``limit``), as :meth:`get_used` returns them.

        One batch per interrupt: the ring words are read once and the common
        case (a published, outstanding, one-descriptor chain) is handled with
        locals; anything else goes through :meth:`get_used`, which diagnoses it.
        """
        if self.broken:
            raise QueueBroken("queue is broken after a ring error; reset the device")
        last = self._last_used
        n = (self._used_h[1] - last) & 0xFFFF
        if not n:
            return []
        if n > ((self._published - last) & 0xFFFF):
            self.get_used()  # raises USED_IDX_JUMP
        out: list[tuple[T, int]] = []
        if self._shadow != self._published:
            get = self.get_used
            for _ in range(min(n, limit)):
                r = get()
                if r is None:  # pragma: no cover - n entries are there
                    break
                out.append(r)
            return out
        ui, mask, size = self._used_i, self._mask, self.size
        tokens, chain_len, nxt, wlens = self._tokens, self._chain_len, self._next, self._wlen
        free = self._free
        freed = 0
        for _ in range(min(n, limit)):
            i = 2 * (last & mask)
            head = ui[i]
            if head >= size or tokens[head] is None or chain_len[head] != 1:
                self._free, self.num_free, self._last_used = free, self.num_free + freed, last
                freed = 0
                r = self.get_used()  # slow path: diagnoses or frees a longer chain
                assert r is not None
                out.append(r)
                free, last = self._free, self._last_used
                continue
            length = ui[i + 1]
            token = tokens[head]
            tokens[head] = None
            nxt[head] = free
            free = head
            freed += 1
            w = wlens[head]
            out.append((token, length if length <= w else w))  # type: ignore[arg-type]
            last = (last + 1) & 0xFFFF
        self._free = free
        self.num_free += freed
        self._last_used = last
        if self.event_idx and self.interrupts_enabled:
            self._avail_h[2 + size] = last
            full_fence()
        return out

    # -- interrupt suppression ---------------------------------------------
    def disable_interrupts(self) -> None:
        """Ask the device not to interrupt (NO_INTERRUPT; with EVENT_IDX ``used_event`` lags)."""
        self.interrupts_enabled = False
        if not self.event_idx:
            self._avail_h[0] = _NO_INTERRUPT

    def enable_interrupts(self) -> bool:
        """Ask for interrupts again; return True if completions are already pending.

        A True return means: drain with :meth:`get_used` before sleeping, or the
        wake-up for those completions is lost (virtqueue_enable_cb).
        """
        self.interrupts_enabled = True
        if self.event_idx:
            self._avail_h[2 + self.size] = self._last_used
        else:
            self._avail_h[0] = 0
        full_fence()  # store the request for interrupts, then re-load used.idx
        return self._used_h[1] != self._last_used
