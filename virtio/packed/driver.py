"""The driver (card) side of a packed ring, sans-IO (virtio 1.2 §2.8).

Owns :class:`DriverQueue`: writing descriptor lists into consecutive ring
slots (direct, or one descriptor pointing at a per-id indirect table) with
the avail wrap counter, buffer ids from a free list, exposing the heads and
deciding whether to kick (the device's event-suppression word, EVENT_IDX
with wrap counters), reaping the hostile used descriptors (Linux
``virtqueue_get_buf_ctx_packed``: the id must be in range and outstanding,
the driver skips by its own record of the list length; ``len`` is clamped to
the writable size), interrupt suppression and reset.

Imports the lower ``virtio.packed`` module (layout), ``virtio.split.faults``
and ``virtio.split.fence`` and ``virtio.constants/errors/memory``; must not
import ``virtio.packed.device``, asyncio, the OS or ``transport``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, Generic, TypeVar

from virtio.constants import Feature
from virtio.errors import LocalProtocolError, WouldBlock
from virtio.memory import Memory, MemoryFault
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
from virtio.packed.layout import DESC_BODY as _BODY_STRUCT
from virtio.packed.layout import EVENT_DESC as _DESC_EVENT
from virtio.packed.layout import EVENT_DISABLE as _DISABLE
from virtio.packed.layout import EVENT_ENABLE as _ENABLE
from virtio.packed.layout import INDIRECT as _INDIRECT
from virtio.packed.layout import NEXT as _NEXT
from virtio.packed.layout import U32_LIMIT as _U32_LIMIT
from virtio.packed.layout import WRITE as _WRITE
from virtio.split.faults import QueueBroken, RingError, RingFault
from virtio.split.fence import full_fence

__all__ = ["DriverQueue"]

#: Bound by assignment (LOAD_METHOD on CPython 3.11: see virtio.split.layout.DESC).
DESC: Final = _DESC_STRUCT
BODY: Final = _BODY_STRUCT

#: Ids' states: free, added (not visible to the device), published.
_FREE, _ADDED, _PUBLISHED = 0, 1, 2

T = TypeVar("T")


class DriverQueue(Generic[T]):
    """The driver (card) side of a packed ring. Used descriptors are untrusted.

    Same shape as :class:`virtio.split.DriverQueue`: ``add`` writes a list and
    returns its buffer id (the packed ring's "head"); ``publish`` exposes the
    added lists (one aligned 16-bit store of each head's flags) and says
    whether to kick; ``get_used`` returns ``(token, length)``.

    Raises :class:`WouldBlock` when the ring has no room, :class:`RingError`
    for a device that writes an illegal used descriptor or event word (queue
    latched), and :class:`LocalProtocolError` for the caller's mistakes.
    """

    __slots__ = (
        "_added",
        "_avail_wrap",
        "_chain_len",
        "_desc",
        "_desc_h",
        "_desc_i",
        "_dev_ev",
        "_drv_ev",
        "_free_ids",
        "_ind",
        "_ind_max",
        "_ind_view",
        "_last_used",
        "_next_avail",
        "_pending",
        "_state",
        "_tokens",
        "_used_wrap",
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
        layout: PackedLayout,
        features: int,
        *,
        indirect_area: int | None = None,
        indirect_max: int = 0,
    ) -> None:
        """Map and initialise the ring (descriptor ring zeroed, driver area set).

        ``indirect_area``, when INDIRECT_DESC is negotiated, is a 16-byte
        aligned bus address of ``size * indirect_max * 16`` bytes: buffer id
        ``i`` uses the slot at ``indirect_area + i * indirect_max * 16``.

        Raises:
            LocalProtocolError: the layout or indirect area is invalid here.
        """
        bad = layout.problem()
        if bad is not None:
            raise LocalProtocolError(bad[1])
        if indirect_max < 0:
            raise LocalProtocolError(f"indirect_max {indirect_max} is negative")
        indirect_max = min(indirect_max, layout.size)
        self.layout = layout
        self.size = n = layout.size
        self.event_idx = bool(features & Feature.EVENT_IDX)
        try:
            desc, drv, dev = ring_views(mem, layout, driver_w=True, device_w=False)
            ind_view = None
            if features & Feature.INDIRECT_DESC and indirect_area is not None and indirect_max:
                if indirect_area % DESC_SIZE:
                    raise LocalProtocolError(f"indirect area {indirect_area:#x} not 16-aligned")
                ind_view = mem.view(indirect_area, n * indirect_max * DESC_SIZE, True)
        except MemoryFault as e:
            raise LocalProtocolError(f"ring not reachable: {e}") from e
        self.indirect = ind_view is not None
        self._ind_view = ind_view
        self._ind = indirect_area or 0
        self._ind_max = indirect_max if ind_view is not None else 0
        desc[:] = bytes(len(desc))
        self._desc = desc
        self._desc_h = desc.cast("H")
        self._desc_i = desc.cast("I")
        self._drv_ev = drv.cast("I")
        self._dev_ev = dev.cast("I")
        self._init_state()

    def _init_state(self) -> None:
        n = self.size
        self._free_ids = list(range(n - 1, -1, -1))  # a stack: id 0 first
        self.num_free = n
        self._tokens: list[T | None] = [None] * n
        self._chain_len = [0] * n
        self._wlen = [0] * n
        self._state = bytearray(n)
        self._next_avail = 0
        self._avail_wrap = 1  # §2.8.1: both wrap counters start at 1
        self._added = 0  # ring slots added since the last publish
        self._pending: list[tuple[int, int, int]] = []  # (slot, head flags, id)
        self._last_used = 0
        self._used_wrap = 1
        self.broken = False
        self.interrupts_enabled = True
        self._drv_ev[0] = event_word(_DESC_EVENT, 0, 1) if self.event_idx else _ENABLE

    def reset(self) -> None:
        """Return to the just-initialised state (after a device reset)."""
        self._desc[:] = bytes(len(self._desc))
        self._init_state()

    # -- adding ------------------------------------------------------------
    def add(
        self,
        readable: Sequence[tuple[int, int]],
        writable: Sequence[tuple[int, int]],
        token: T,
    ) -> int:
        """Put one list (readable buffers, then writable) into the ring; return its buffer id.

        Not visible to the device until :meth:`publish`.

        Raises:
            WouldBlock: not enough free ring slots.
            LocalProtocolError: empty list, zero-length buffer, list >= 2^32 B,
                more buffers than the queue size, ``token`` is None.
            QueueBroken: the queue is broken.
        """
        nr = len(readable)
        nseg = nr + len(writable)
        if nseg == 1 and self.num_free and token is not None and not self.broken:
            # Fast path: one buffer (checks inline, same rules as below).
            if nr:
                addr, ln = readable[0]
                wf = 0
            else:
                addr, ln = writable[0]
                wf = _WRITE
            if 0 < ln < _U32_LIMIT:
                bid = self._free_ids.pop()
                slot = self._next_avail
                wrap = self._avail_wrap
                BODY.pack_into(self._desc, slot * DESC_SIZE, addr, ln, bid)
                self._pending.append((slot, wf | (AVAIL if wrap else USED), bid))
                slot += 1
                if slot == self.size:
                    slot = 0
                    self._avail_wrap = wrap ^ 1
                self._next_avail = slot
                self._added += 1
                self.num_free -= 1
                self._chain_len[bid] = 1
                self._wlen[bid] = ln if wf else 0
                self._tokens[bid] = token
                self._state[bid] = _ADDED
                return bid
        if self.broken:
            raise QueueBroken("queue is broken after a ring error; reset the device")
        if token is None:
            raise LocalProtocolError("token must not be None")
        if nseg == 0:
            raise LocalProtocolError("a chain needs at least one buffer")
        n = self.size
        if nseg > n:
            raise LocalProtocolError(f"chain of {nseg} buffers exceeds the queue size {n}")
        rtotal = wtotal = 0
        for _, ln in readable:
            if ln <= 0:
                raise LocalProtocolError("zero-length buffers are not allowed")
            rtotal += ln
        for _, ln in writable:
            if ln <= 0:
                raise LocalProtocolError("zero-length buffers are not allowed")
            wtotal += ln
        if rtotal + wtotal >= _U32_LIMIT:
            raise LocalProtocolError("chain of 2^32 bytes or more")
        use_ind = 1 < nseg <= self._ind_max
        need = 1 if use_ind else nseg
        if need > self.num_free:
            raise WouldBlock(f"{need} descriptors needed, {self.num_free} free")
        bid = self._free_ids.pop()
        slot = pos = self._next_avail
        wrap = self._avail_wrap
        desc = self._desc
        if use_ind:
            assert self._ind_view is not None
            tbl = self._ind_view
            base = bid * self._ind_max * DESC_SIZE
            off = base
            for addr, ln in readable:
                DESC.pack_into(tbl, off, addr, ln, 0, 0)
                off += DESC_SIZE
            for addr, ln in writable:
                DESC.pack_into(tbl, off, addr, ln, 0, _WRITE)
                off += DESC_SIZE
            BODY.pack_into(desc, slot * DESC_SIZE, self._ind + base, nseg * DESC_SIZE, bid)
            head_flags = _INDIRECT | (AVAIL if wrap else USED)
            pos += 1
            if pos == n:
                pos = 0
                wrap ^= 1
        else:
            k = 0
            head_flags = 0
            for bufs, wflag in ((readable, 0), (writable, _WRITE)):
                for addr, ln in bufs:
                    k += 1
                    flags = wflag | (_NEXT if k < nseg else 0) | (AVAIL if wrap else USED)
                    if k == 1:
                        # the head: its flags wait for publish (§2.8.6: made available last)
                        BODY.pack_into(desc, pos * DESC_SIZE, addr, ln, bid)
                        head_flags = flags
                    else:
                        DESC.pack_into(desc, pos * DESC_SIZE, addr, ln, bid, flags)
                    pos += 1
                    if pos == n:
                        pos = 0
                        wrap ^= 1
        self._next_avail = pos
        self._avail_wrap = wrap
        self._added += need
        self._pending.append((slot, head_flags, bid))
        self.num_free -= need
        self._chain_len[bid] = need
        self._wlen[bid] = wtotal
        self._tokens[bid] = token
        self._state[bid] = _ADDED
        return bid

    def publish(self) -> bool:
        """Expose added lists (one aligned store of each head's flags); return whether to kick.

        The kick decision is Linux ``virtqueue_kick_prepare_packed``: the
        device's event word, ENABLE/DISABLE or (EVENT_IDX) DESC with its wrap bit.

        Raises:
            RingError: the device's event word is malformed (reserved flags,
                DESC without EVENT_IDX, an offset outside the ring).
        """
        pending = self._pending
        if not pending:
            return False
        dh, state = self._desc_h, self._state
        for slot, flags, bid in pending:
            dh[8 * slot + 7] = flags
            state[bid] = _PUBLISHED
        pending.clear()
        new = self._next_avail
        old = new - self._added
        self._added = 0
        full_fence()  # store the flags, then load the device's event word
        word = self._dev_ev[0]
        bad = event_problem(word, self.size, self.event_idx)
        if bad is not None:
            self._fail(*bad)
        return packed_need_event(word, self.size, self._avail_wrap, new, old)

    # -- completions -------------------------------------------------------
    @property
    def outstanding(self) -> int:
        """Lists published or added and not yet returned by the device."""
        return self.size - len(self._free_ids)

    def _fail(self, fault: RingFault, message: str) -> None:
        self.broken = True
        raise RingError(fault, message)

    def _used_at(self, slot: int) -> bool:
        """Is the descriptor at ``slot`` used in the current used lap (AVAIL == USED == wrap)?"""
        flags = self._desc_h[8 * slot + 7]
        w = self._used_wrap
        return (flags >> 7) & 1 == w and flags >> 15 == w

    def get_used(self) -> tuple[T, int] | None:
        """The next completed list as ``(token, length)``, or None.

        ``length`` is clamped to the list's writable size: the device's
        ``len`` is untrusted.

        Raises:
            RingError: the device returned an id out of range or not outstanding.
            QueueBroken: the queue is broken.
        """
        if self.broken:
            raise QueueBroken("queue is broken after a ring error; reset the device")
        slot = self._last_used
        if not self._used_at(slot):
            return None
        bid = self._desc_h[8 * slot + 6]
        length = self._desc_i[4 * slot + 2]
        n = self.size
        if bid >= n:
            self._fail(RingFault.USED_ID_OUT_OF_RANGE, f"used id {bid} >= size {n}")
        if self._state[bid] != _PUBLISHED:
            self._fail(RingFault.USED_ID_NOT_HEAD, f"used id {bid} is not an outstanding buffer")
        token = self._tokens[bid]
        assert token is not None
        self._tokens[bid] = None
        self._state[bid] = _FREE
        self._free_ids.append(bid)
        count = self._chain_len[bid]
        self.num_free += count
        slot += count  # skip the list's slots (the driver's record, never the device's)
        if slot >= n:
            slot -= n
            self._used_wrap ^= 1
        self._last_used = slot
        if self.event_idx and self.interrupts_enabled:
            self._drv_ev[0] = event_word(_DESC_EVENT, slot, self._used_wrap)
            full_fence()  # virtio_store_mb: the next get_used must see what we asked for
        wlen = self._wlen[bid]
        return token, (length if length <= wlen else wlen)

    def get_used_many(self, limit: int = 1 << 16) -> list[tuple[T, int]]:
        """Every completed list (up to ``limit``), as :meth:`get_used` returns them.

        One batch per interrupt: the common case is handled with locals;
        anything suspicious goes through :meth:`get_used`, which diagnoses it.
        """
        if self.broken:
            raise QueueBroken("queue is broken after a ring error; reset the device")
        out: list[tuple[T, int]] = []
        dh, di, state, tokens = self._desc_h, self._desc_i, self._state, self._tokens
        chain_len, wlens, free_ids = self._chain_len, self._wlen, self._free_ids
        n = self.size
        slot, w = self._last_used, self._used_wrap
        freed = 0
        while len(out) < limit:
            flags = dh[8 * slot + 7]
            if (flags >> 7) & 1 != w or flags >> 15 != w:
                break
            bid = dh[8 * slot + 6]
            if bid >= n or state[bid] != _PUBLISHED:
                self._last_used, self._used_wrap = slot, w
                self.num_free += freed
                freed = 0
                # diagnoses (raises), unless the device rewrote the slot meanwhile
                r = self.get_used()
                if r is None:  # pragma: no cover - a race with the device
                    return out
                out.append(r)  # pragma: no cover - a race with the device
                slot, w = self._last_used, self._used_wrap  # pragma: no cover
                continue  # pragma: no cover
            length = di[4 * slot + 2]
            token = tokens[bid]
            tokens[bid] = None
            state[bid] = _FREE
            free_ids.append(bid)
            count = chain_len[bid]
            freed += count
            slot += count
            if slot >= n:
                slot -= n
                w ^= 1
            wl = wlens[bid]
            out.append((token, length if length <= wl else wl))  # type: ignore[arg-type]
        self._last_used, self._used_wrap = slot, w
        self.num_free += freed
        if out and self.event_idx and self.interrupts_enabled:
            self._drv_ev[0] = event_word(_DESC_EVENT, slot, w)
            full_fence()
        return out

    # -- interrupt suppression ---------------------------------------------
    def disable_interrupts(self) -> None:
        """Ask the device not to interrupt (driver event flags DISABLE)."""
        self.interrupts_enabled = False
        self._drv_ev[0] = event_word(_DISABLE)

    def enable_interrupts(self) -> bool:
        """Ask for interrupts again; return True if completions are already pending.

        With EVENT_IDX the request names the next used slot and its wrap
        counter (DESC); otherwise ENABLE. A True return means: drain with
        :meth:`get_used` before sleeping (virtqueue_enable_cb_prepare_packed).
        """
        self.interrupts_enabled = True
        if self.event_idx:
            self._drv_ev[0] = event_word(_DESC_EVENT, self._last_used, self._used_wrap)
        else:
            self._drv_ev[0] = _ENABLE
        full_fence()  # store the request for interrupts, then re-load the flags
        return self._used_at(self._last_used)
