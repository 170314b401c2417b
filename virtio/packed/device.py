"""The device (host/backend) side of a packed ring, sans-IO (virtio 1.2 §2.8).

Owns :class:`DeviceQueue`: validating the layout the driver gave, popping
and walking hostile descriptor lists in consecutive ring slots with the
avail wrap counter (the checks follow QEMU ``virtqueue_packed_pop``, Linux
``vhost`` packed and DPDK ``fill_vec_buf_packed``, and raise where those
silently truncate or trust the driver), writing used descriptors in or out
of order with the used wrap counter and chain-length skips, notification
suppression (the device event word; the driver's word decides interrupts),
reset, and :class:`~virtio.packed.state.PackedQueueState` save/restore.

Imports the lower ``virtio.packed`` modules (layout, state), ``virtio.split.chain``,
``virtio.split.faults`` and ``virtio.split.fence`` and
``virtio.constants/errors/memory``; must not import
``virtio.packed.driver``, asyncio, the OS or ``transport``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from virtio.constants import VRING_SIZE_MAX, Feature
from virtio.errors import LocalProtocolError
from virtio.memory import ADDRESS_LIMIT, Memory, MemoryFault
from virtio.packed.layout import (
    AVAIL,
    DESC_SIZE,
    USED,
    PackedLayout,
    event_problem,
    event_word,
    packed_need_event,
    ring_views,
)
from virtio.packed.layout import DESC as _DESC_STRUCT
from virtio.packed.layout import EVENT_DESC as _DESC_EVENT
from virtio.packed.layout import EVENT_DISABLE as _DISABLE
from virtio.packed.layout import EVENT_ENABLE as _ENABLE
from virtio.packed.layout import INDIRECT as _INDIRECT
from virtio.packed.layout import NEXT as _NEXT
from virtio.packed.layout import U32_LIMIT as _U32_LIMIT
from virtio.packed.layout import USED_BODY as _USED_STRUCT
from virtio.packed.layout import WRITE as _WRITE
from virtio.packed.state import PackedQueueState, state_problem
from virtio.split.chain import Chain
from virtio.split.device_base import DeviceQueueBase
from virtio.split.faults import QueueBroken, RingError, RingFault
from virtio.split.fence import full_fence

__all__ = ["DeviceQueue"]

#: Bound by assignment (LOAD_METHOD on CPython 3.11: see virtio.split.layout.DESC).
DESC: Final = _DESC_STRUCT
USED_BODY: Final = _USED_STRUCT


def _available(flags: int, wrap: int) -> bool:
    """§2.8.1: AVAIL != USED and AVAIL == the (driver's) wrap counter of this lap."""
    a = (flags >> 7) & 1
    return a == wrap and (flags >> 15) != a


class DeviceQueue(DeviceQueueBase[PackedLayout]):
    """The device (host/backend) side of a packed ring. Every input is untrusted.

    Same shape and loop as :class:`virtio.split.DeviceQueue`::

        while (chain := q.pop()) is not None:
            n = serve(chain)
            q.add_used(chain.head, n)      # chain.head is the buffer id
        if q.publish_used():
            raise_interrupt()

    Raises :class:`RingError` on any malformed peer input (and latches the
    queue), :class:`QueueBroken` on use after that, :class:`LocalProtocolError`
    on misuse by the caller (pop before :meth:`activate`, pushing an id that
    is not in flight).
    """

    __slots__ = (
        "_avail_wrap",
        "_desc",
        "_desc_h",
        "_dev_ev",
        "_drv_ev",
        "_in_flight",
        "_inflight",
        "_inflight_slots",
        "_moved",
        "_next_avail",
        "_next_used",
        "_staged",
        "_used_wrap",
    )

    def __init__(
        self,
        mem: Memory,
        layout: PackedLayout,
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
            desc, drv, dev = ring_views(mem, layout, driver_w=False, device_w=True)
        except MemoryFault as e:
            self.broken = True
            raise RingError(RingFault.RING_OUT_OF_MEMORY, str(e)) from e
        self._desc = desc
        self._desc_h = desc.cast("H")
        self._drv_ev = drv.cast("I")
        self._dev_ev = dev.cast("I")
        self._init_state()

    def _init_state(self) -> None:
        self._next_avail = 0
        self._avail_wrap = 1  # §2.8.1: both wrap counters start at 1
        self._next_used = 0
        self._used_wrap = 1
        self._inflight = [0] * self.size  # buffer id -> ring slots it took (0: not in flight)
        self._inflight_slots = 0
        self._in_flight = 0
        self._staged: list[tuple[int, int]] = []  # (slot, flags) written at publish_used
        self._moved = 0  # used slots since the last publish_used
        self._dev_ev[0] = event_word(_DESC_EVENT, 0, 1) if self.event_idx else _ENABLE

    # -- lifecycle ---------------------------------------------------------
    def reset(self) -> None:
        """Forget every position and in-flight id and clear the broken latch (§2.6)."""
        self._init_state()
        self.broken = False
        self.ready = False
        self.notify_enabled = True

    def save(self) -> PackedQueueState:
        """Snapshot the private state (no shared memory is copied)."""
        return PackedQueueState(
            layout=self.layout,
            next_avail=self._next_avail,
            avail_wrap=self._avail_wrap,
            next_used=self._next_used,
            used_wrap=self._used_wrap,
            event_idx=self.event_idx,
            indirect=self.indirect,
            ready=self.ready,
            inflight=tuple((bid, c) for bid, c in enumerate(self._inflight) if c),
            notify_enabled=self.notify_enabled,
            staged=tuple(self._staged),
            moved=self._moved,
        )

    @classmethod
    def restore(cls, mem: Memory, state: PackedQueueState, **kwargs: bool | int) -> DeviceQueue:
        """Rebuild a queue from :meth:`save`, re-running every check.

        Raises:
            RingError: the layout is invalid in ``mem``.
            LocalProtocolError: the state itself is inconsistent.
        """
        features = (Feature.EVENT_IDX if state.event_idx else 0) | (
            Feature.INDIRECT_DESC if state.indirect else 0
        )
        q = cls(mem, state.layout, int(features), **kwargs)  # type: ignore[arg-type]
        bad = state_problem(state)
        if bad is not None:
            raise LocalProtocolError(f"inconsistent packed queue state: {bad}")
        q._next_avail, q._avail_wrap = state.next_avail, state.avail_wrap
        q._next_used, q._used_wrap = state.next_used, state.used_wrap
        for bid, count in state.inflight:
            q._inflight[bid] = count
        q._inflight_slots = sum(c for _, c in state.inflight)
        q._in_flight = len(state.inflight)
        q._staged = list(state.staged)
        q._moved = state.moved
        q.ready = state.ready
        if state.notify_enabled:
            q.enable_notifications()
        else:
            q.disable_notifications()
        return q

    # -- consuming ---------------------------------------------------------
    @property
    def next_avail(self) -> int:
        """The ring slot the next list starts at (its lap is :attr:`avail_wrap`)."""
        return self._next_avail

    @property
    def avail_wrap(self) -> int:
        return self._avail_wrap

    @property
    def in_flight(self) -> int:
        """Lists popped and not yet pushed back."""
        return self._in_flight

    def pending(self) -> int:
        """Lists the driver has made available that we have not popped.

        A read-only scan (it validates nothing: :meth:`pop` does), bounded by
        the ring slots the driver may legally use.
        """
        n, dh = self.size, self._desc_h
        pos, wrap = self._next_avail, self._avail_wrap
        lists = 0
        for _ in range(n - self._inflight_slots):
            flags = dh[8 * pos + 7]
            if not _available(flags, wrap):
                break
            if not flags & _NEXT:
                lists += 1
            pos += 1
            if pos == n:
                pos = 0
                wrap ^= 1
        return lists

    def pop(self) -> Chain | None:
        """The next available list, validated, or None when there is none.

        Raises:
            RingError: anything malformed in the list.
            QueueBroken: the queue was broken earlier.
            LocalProtocolError: before :meth:`activate`.
        """
        if self.broken or not self.ready:
            self._check_usable()
        chain = self._pop_one()
        if chain is not None and self.event_idx and self.notify_enabled:
            # keep the kick request at what we have consumed (as the split ring's avail_event)
            self._dev_ev[0] = event_word(_DESC_EVENT, self._next_avail, self._avail_wrap)
            full_fence()  # the next pop must see kicks the driver decided against
        return chain

    def pop_many(self, limit: int = VRING_SIZE_MAX) -> list[Chain]:
        """Up to ``limit`` lists (same checks as :meth:`pop`).

        If a list is malformed, :class:`RingError` is raised and the lists
        validated before it are dropped with the broken queue.
        """
        if self.broken or not self.ready:
            self._check_usable()
        out: list[Chain] = []
        desc, dh, inflight, n = self._desc, self._desc_h, self._inflight, self.size
        unpack, view = DESC.unpack_from, self._mem.view
        req_r, req_w = self.require_readable, self.require_writable
        pos, wrap, slots = self._next_avail, self._avail_wrap, self._inflight_slots
        while len(out) < limit:
            f = dh[8 * pos + 7]
            a = (f >> 7) & 1
            if a != wrap or f >> 15 == a:
                break  # not available in this lap
            addr, length, bid, flags = unpack(desc, pos * DESC_SIZE)
            is_w = flags & _WRITE
            if (
                not flags & (_NEXT | _INDIRECT)
                and length
                and addr + length <= ADDRESS_LIMIT
                and bid < n
                and not inflight[bid]
                and slots < n
                and not (req_r if is_w else req_w)
            ):
                # the one-buffer fast path of _pop_one, with locals
                try:
                    seg = view(addr, length, bool(is_w))
                except MemoryFault:
                    self._next_avail, self._avail_wrap, self._inflight_slots = pos, wrap, slots
                    self._pop_one()  # raises BUFFER_OUT_OF_MEMORY
                    raise  # pragma: no cover - _pop_one raised
                inflight[bid] = 1
                slots += 1
                self._in_flight += 1
                pos += 1
                if pos == n:
                    pos = 0
                    wrap ^= 1
                if is_w:
                    out.append(Chain(bid, [], [seg], 0, length, [(addr, length, True)]))
                else:
                    out.append(Chain(bid, [seg], [], length, 0, [(addr, length, False)]))
                continue
            self._next_avail, self._avail_wrap, self._inflight_slots = pos, wrap, slots
            chain = self._pop_one()  # the full walk: validates or raises
            if chain is None:  # pragma: no cover - the driver took the head back meanwhile
                break
            out.append(chain)
            pos, wrap, slots = self._next_avail, self._avail_wrap, self._inflight_slots
        self._next_avail, self._avail_wrap, self._inflight_slots = pos, wrap, slots
        if out and self.event_idx and self.notify_enabled:
            self._dev_ev[0] = event_word(_DESC_EVENT, pos, wrap)
            full_fence()
        return out

    def _pop_one(self) -> Chain | None:
        pos = self._next_avail
        wrap = self._avail_wrap
        if not _available(self._desc_h[8 * pos + 7], wrap):
            return None
        n = self.size
        addr, length, bid, flags = DESC.unpack_from(self._desc, pos * DESC_SIZE)
        if (
            not flags & (_NEXT | _INDIRECT)
            and length
            and addr + length <= ADDRESS_LIMIT
            and bid < n
            and not self._inflight[bid]
            and self._inflight_slots < n
        ):
            # Fast path: a list of one direct buffer (the common small request).
            # Anything unusual falls through to the full walk, which diagnoses it.
            is_w = flags & _WRITE
            if not (self.require_readable if is_w else self.require_writable):
                try:
                    seg = self._mem.view(addr, length, bool(is_w))
                except MemoryFault as e:
                    self._fail(RingFault.BUFFER_OUT_OF_MEMORY, str(e))
                self._inflight[bid] = 1
                self._inflight_slots += 1
                self._in_flight += 1
                pos += 1
                if pos == n:
                    pos = 0
                    self._avail_wrap = wrap ^ 1
                self._next_avail = pos
                if is_w:
                    return Chain(bid, [], [seg], 0, length, [(addr, length, True)])
                return Chain(bid, [seg], [], length, 0, [(addr, length, False)])
        room = n - self._inflight_slots
        desc = self._desc
        unpack = DESC.unpack_from
        view = self._mem.view
        fail = self._fail
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        segments: list[tuple[int, int, bool]] = []
        rlen = wlen = 0
        count = 0
        while True:
            count += 1
            if count > room:
                if count > n:
                    fail(RingFault.CHAIN_TOO_LONG, f"list at slot {self._next_avail} exceeds {n}")
                fail(
                    RingFault.RING_OVERRUN,
                    f"list at slot {self._next_avail} runs into {n - room} slots still in flight",
                )
            addr, length, bid, flags = unpack(desc, pos * DESC_SIZE)
            if count > 1 and not _available(flags, wrap):
                fail(
                    RingFault.DESC_NOT_AVAILABLE,
                    f"descriptor {pos} of the list at slot {self._next_avail} is not "
                    f"available (flags {flags:#x}, wrap {wrap})",
                )
            if flags & _INDIRECT:
                if count > 1:
                    fail(RingFault.INDIRECT_IN_CHAIN, f"INDIRECT in a list, at slot {pos}")
                if not self.indirect:
                    fail(RingFault.INDIRECT_NOT_NEGOTIATED, f"INDIRECT at slot {pos}")
                if flags & _NEXT:
                    fail(RingFault.INDIRECT_WITH_NEXT, f"INDIRECT with NEXT at slot {pos}")
                if length == 0 or length % DESC_SIZE:
                    fail(RingFault.INDIRECT_BAD_LEN, f"indirect table length {length}")
                m = length // DESC_SIZE
                if m > n:
                    fail(RingFault.INDIRECT_TOO_LONG, f"indirect table of {m} > size {n}")
                if addr + length > ADDRESS_LIMIT:
                    fail(RingFault.ADDRESS_OVERFLOW, f"indirect table at {addr:#x}+{length}")
                try:
                    table = view(addr, length, False)
                except MemoryFault as e:
                    fail(RingFault.BUFFER_OUT_OF_MEMORY, f"indirect table: {e}")
                entries = [unpack(table, i * DESC_SIZE) for i in range(m)]
            else:
                entries = [(addr, length, bid, flags)]
            for b_addr, b_len, _, b_flags in entries:
                if b_flags & _INDIRECT:  # only table entries can get here with it
                    fail(RingFault.NESTED_INDIRECT, f"nested indirect table at slot {pos}")
                if b_len == 0:
                    fail(RingFault.ZERO_LENGTH, f"zero-length buffer at slot {pos}")
                if b_addr + b_len > ADDRESS_LIMIT:
                    fail(RingFault.ADDRESS_OVERFLOW, f"buffer {b_addr:#x}+{b_len} overflows")
                is_w = bool(b_flags & _WRITE)
                try:
                    seg = view(b_addr, b_len, is_w)
                except MemoryFault as e:
                    fail(RingFault.BUFFER_OUT_OF_MEMORY, str(e))
                if is_w:
                    writable.append(seg)
                    wlen += b_len
                else:
                    if writable:
                        fail(
                            RingFault.READABLE_AFTER_WRITABLE,
                            f"readable buffer after a writable one at slot {pos}",
                        )
                    readable.append(seg)
                    rlen += b_len
                segments.append((b_addr, b_len, is_w))
            pos += 1
            if pos == n:
                pos = 0
                wrap ^= 1
            if not flags & _NEXT:
                break
        # §2.8.6: the buffer id is in the last descriptor of the list
        if bid >= n:
            fail(RingFault.BUFFER_ID_OUT_OF_RANGE, f"buffer id {bid} >= size {n}")
        if self._inflight[bid]:
            fail(RingFault.BUFFER_ID_IN_USE, f"buffer id {bid} is already in flight")
        if rlen + wlen >= _U32_LIMIT:
            fail(RingFault.CHAIN_TOO_BIG, f"buffer {bid} totals {rlen + wlen} B >= 2^32")
        if self.require_writable and not wlen:
            fail(RingFault.NO_WRITABLE, f"buffer {bid} has no writable part")
        if self.require_readable and not rlen:
            fail(RingFault.NO_READABLE, f"buffer {bid} has no readable part")
        self._inflight[bid] = count
        self._inflight_slots += count
        self._in_flight += 1
        self._next_avail = pos
        self._avail_wrap = wrap
        return Chain(bid, readable, writable, rlen, wlen, segments)

    # -- completing --------------------------------------------------------
    def add_used(self, head: int, length: int) -> None:
        """Stage a used descriptor for buffer id ``head`` (visible at :meth:`publish_used`).

        Written at the next used slot, whatever order the buffers were popped
        in; the slot then moves on by the list's length (§2.8.6).

        Raises:
            LocalProtocolError: ``head`` is not a buffer we popped, or
                ``length`` does not fit in 32 bits.
            QueueBroken: the queue is broken.
        """
        if self.broken:
            raise QueueBroken("queue is broken after a ring error; reset the device")
        if not 0 <= head < self.size or not self._inflight[head]:
            raise LocalProtocolError(f"buffer id {head} is not in flight")
        if not 0 <= length < _U32_LIMIT:
            raise LocalProtocolError(f"used length {length} out of range")
        slot = self._next_used
        # id and len now, flags (what the driver polls) at publish_used
        USED_BODY.pack_into(self._desc, slot * DESC_SIZE + 8, length, head)
        # §2.8.3: WRITE in a used descriptor says data was written (QEMU sets it too)
        self._staged.append(
            (slot, ((AVAIL | USED) if self._used_wrap else 0) | (_WRITE if length else 0))
        )
        count = self._inflight[head]
        self._inflight[head] = 0
        self._inflight_slots -= count
        self._in_flight -= 1
        self._moved += count
        slot += count
        if slot >= self.size:
            slot -= self.size
            self._used_wrap ^= 1
        self._next_used = slot

    def add_used_many(self, entries: Iterable[tuple[int, int]]) -> None:
        """Stage several used descriptors (same checks as :meth:`add_used`)."""
        if self.broken:
            raise QueueBroken("queue is broken after a ring error; reset the device")
        inflight, staged, desc, n = self._inflight, self._staged, self._desc, self.size
        pack = USED_BODY.pack_into
        slot, w = self._next_used, self._used_wrap
        moved = 0
        try:
            for head, length in entries:
                if not 0 <= head < n or not inflight[head]:
                    raise LocalProtocolError(f"buffer id {head} is not in flight")
                if not 0 <= length < _U32_LIMIT:
                    raise LocalProtocolError(f"used length {length} out of range")
                pack(desc, slot * DESC_SIZE + 8, length, head)
                staged.append((slot, ((AVAIL | USED) if w else 0) | (_WRITE if length else 0)))
                count = inflight[head]
                inflight[head] = 0
                self._in_flight -= 1
                moved += count
                slot += count
                if slot >= n:
                    slot -= n
                    w ^= 1
        finally:
            self._next_used, self._used_wrap = slot, w
            self._inflight_slots -= moved
            self._moved += moved

    def publish_used(self) -> bool:
        """Make staged used descriptors visible, in order, one aligned flags store each.

        Returns whether the driver wants an interrupt now: its event word,
        ENABLE/DISABLE or (EVENT_IDX) DESC with its wrap bit.

        Raises:
            RingError: the driver's event word is malformed.
        """
        staged = self._staged
        if not staged:
            return False
        dh = self._desc_h
        for slot, flags in staged:
            dh[8 * slot + 7] = flags
        staged.clear()
        new = self._next_used
        old = new - self._moved
        self._moved = 0
        full_fence()  # store the flags, then load the driver's event word
        word = self._drv_ev[0]
        bad = event_problem(word, self.size, self.event_idx)
        if bad is not None:
            self._fail(*bad)
        return packed_need_event(word, self.size, self._used_wrap, new, old)

    def push_used(self, head: int, length: int) -> bool:
        """:meth:`add_used` then :meth:`publish_used`."""
        self.add_used(head, length)
        return self.publish_used()

    # -- notification suppression -----------------------------------------
    def disable_notifications(self) -> None:
        """Ask the driver not to kick (device event flags DISABLE)."""
        self.notify_enabled = False
        self._dev_ev[0] = event_word(_DISABLE)

    def enable_notifications(self) -> bool:
        """Ask for kicks again, then re-check the ring.

        Returns True when a list arrived meanwhile: the caller must pop it
        instead of sleeping, or it would lose the wake-up.
        """
        self.notify_enabled = True
        if self.event_idx:
            self._dev_ev[0] = event_word(_DESC_EVENT, self._next_avail, self._avail_wrap)
        else:
            self._dev_ev[0] = _ENABLE
        full_fence()  # store the request for kicks, then re-load the head's flags
        return _available(self._desc_h[8 * self._next_avail + 7], self._avail_wrap)
