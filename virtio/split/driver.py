"""The driver (card) side of a split ring, sans-IO (virtio 1.2 §2.7).

Owns :class:`DriverQueue`: writing chains (direct or through a per-head
indirect table), publishing ``avail.idx`` and deciding whether to kick,
reaping the hostile used ring (Linux ``virtqueue_get_buf_ctx_split``: ``id``
must be an outstanding head; ``len`` is clamped to the writable size),
interrupt suppression (flags and EVENT_IDX) and reset.

Imports the lower ``virtio.split`` modules (faults, fence, layout) and
``virtio.constants/errors/memory``; must not import ``virtio.split.device``
or ``virtio.split.chain``, asyncio, the OS or ``transport``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, Generic, TypeVar

from virtio.constants import Feature
from virtio.errors import LocalProtocolError, WouldBlock
from virtio.memory import Memory, MemoryFault
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

__all__ = ["DriverQueue"]

#: Bound by assignment (LOAD_METHOD on CPython 3.11: see virtio.split.layout.DESC).
DESC: Final = _DESC_STRUCT

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
            desc, avail, used = ring_views(mem, layout, desc_w=True, avail_w=True, used_w=False)
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
