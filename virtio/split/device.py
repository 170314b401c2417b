"""The device (host/backend) side of a split ring, sans-IO (virtio 1.2 §2.7).

Owns :class:`DeviceQueue`: validating the layout the driver gave, popping and
walking hostile descriptor chains (the checks follow QEMU
``virtqueue_split_pop``, Linux ``vhost_get_vq_desc``/``vringh`` and rust-vmm
``virtio-queue``, and raise where those silently truncate), staging and
publishing used entries, notification suppression (flags and EVENT_IDX),
reset, and :class:`QueueState` save/restore.

Imports the lower ``virtio.split`` modules (faults, fence, layout, chain) and
``virtio.constants/errors/memory``; must not import ``virtio.split.driver``,
asyncio, the OS or ``transport``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from mypy_extensions import mypyc_attr

from virtio.constants import VRING_SIZE_MAX, Feature
from virtio.errors import LocalProtocolError
from virtio.memory import ADDRESS_LIMIT, Memory, MemoryFault
from virtio.split.chain import Chain
from virtio.split.device_base import DeviceQueueBase
from virtio.split.faults import QueueBroken, RingError, RingFault
from virtio.split.fence import full_fence
from virtio.split.layout import CHAIN_BYTES_LIMIT as _U32_LIMIT
from virtio.split.layout import DESC as _DESC_STRUCT
from virtio.split.layout import (
    DESC_SIZE,
    SplitLayout,
    need_event,
    ring_views,
)
from virtio.split.layout import INDIRECT as _INDIRECT
from virtio.split.layout import NEXT as _NEXT
from virtio.split.layout import NO_INTERRUPT as _NO_INTERRUPT
from virtio.split.layout import NO_NOTIFY as _NO_NOTIFY
from virtio.split.layout import WRITE as _WRITE

__all__ = ["DeviceQueue", "QueueState"]

#: Bound by assignment (LOAD_METHOD on CPython 3.11: see virtio.split.layout.DESC).
DESC: Final = _DESC_STRUCT


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


# subclassed by interpreted code (mic_host.vhost_user.inflight.TrackedQueue)
@mypyc_attr(allow_interpreted_subclasses=True)
class DeviceQueue(DeviceQueueBase[SplitLayout]):
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
        "_next_avail",
        "_next_used",
        "_published_used",
        "_used_h",
        "_used_i",
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
        self._setup(mem, layout, features, max_size, require_readable, require_writable)
        try:
            desc, avail, used = ring_views(mem, layout, desc_w=False, avail_w=False, used_w=True)
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
            inflight=tuple(i for i in range(self.size) if self._inflight[i]),
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
        size, mask, inflight = self.size, self._mask, self._inflight
        out: list[Chain] = []
        for _ in range(n):
            head = ah[2 + (nxt & mask)]
            if head >= size:
                self._fail(RingFault.HEAD_OUT_OF_RANGE, f"avail head {head} >= size {size}")
            if inflight[head]:
                self._fail(RingFault.HEAD_IN_USE, f"head {head} is already in flight")
            # self._walk, not a bound method kept in a local: compiled, a native call
            out.append(self._walk(head))
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
