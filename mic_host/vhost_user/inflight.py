"""Inflight I/O tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) for split rings.

Owns :class:`InflightRegion`, the shared memory QEMU keeps for the back-end
across a back-end restart (allocated here on GET_INFLIGHT_FD, mapped again on
SET_INFLIGHT_FD), and :class:`TrackedQueue`, a split
:class:`virtio.split.DeviceQueue` that records in it every request it hands
to the backend. Layout and order follow QEMU's docs/interop/vhost-user.rst
("Inflight I/O tracking") and libvhost-user:

- a request popped gets ``counter`` (a per-queue sequence) then ``inflight = 1``;
- before ``used.idx`` is published, ``last_batch_head`` names the last head of
  the batch; after it, the batch's entries are cleared and ``used_idx`` is set;
- a ring started on a region that was in use (``version`` 1) first repairs a
  torn publication (``used_idx`` behind the ring's ``used.idx``: the heads in
  the used ring between the two were completed, their flags are cleared: for a
  batch of one that is libvhost-user's ``last_batch_head`` rule), then hands the
  backend the heads still in flight, oldest ``counter`` first, before any new
  request; the ring's next avail index is ``used.idx`` plus their number
  (libvhost-user's ``vu_check_queue_inflights``).

Only the block back-end offers it; a packed ring runs untracked (the packed
region layout is not implemented).
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterable

from transport.vhost_user.protocol import INFLIGHT, INFLIGHT_DESC, INFLIGHT_HDR
from virtio.errors import RemoteProtocolError
from virtio.memory import Memory
from virtio.split import Chain, DeviceQueue, QueueState, SplitLayout

__all__ = ["InflightRegion", "TrackedQueue", "queue_region_size"]

#: QEMU aligns each queue's part of the region (libvhost-user INFLIGHT_ALIGNMENT).
ALIGN = 64
#: ``version`` of a region in use; 0 means fresh (or the guest reset the device).
VERSION = 1
_LAST_BATCH_OFF = 12
_USED_IDX_OFF = 14
_U16 = struct.Struct("=H")
_U64 = struct.Struct("=Q")


def _error(msg: str) -> RemoteProtocolError:
    return RemoteProtocolError(msg, reason="vhost-user")


def queue_region_size(queue_size: int) -> int:
    """Bytes one split queue takes in the region (header + entries, 64-aligned)."""
    raw = INFLIGHT_HDR.size + INFLIGHT_DESC.size * queue_size
    return (raw + ALIGN - 1) // ALIGN * ALIGN


class InflightRegion:
    """The inflight region of one device (all its queues), mapped shared."""

    def __init__(self, mm: mmap.mmap, num_queues: int, queue_size: int) -> None:
        self._mm = mm
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.stride = queue_region_size(queue_size)

    @staticmethod
    def _check(num_queues: int, queue_size: int, max_queues: int, what: str) -> None:
        if not 1 <= num_queues <= max_queues:
            raise _error(f"{what}: {num_queues} queues, this device has 1..{max_queues}")
        if not queue_size or queue_size & (queue_size - 1) or queue_size > 32768:
            raise _error(f"{what}: queue size {queue_size} is not a power of two up to 32768")

    @classmethod
    def allocate(cls, num_queues: int, queue_size: int, max_queues: int) -> tuple[bytes, int]:
        """GET_INFLIGHT_FD: a zeroed memfd for the queues; the reply payload and the fd
        (the caller sends it and closes its copy)."""
        cls._check(num_queues, queue_size, max_queues, "GET_INFLIGHT_FD")
        size = queue_region_size(queue_size) * num_queues
        fd = os.memfd_create("mic-vhost-user-inflight", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
        except OSError:
            os.close(fd)
            raise
        return INFLIGHT.pack(size, 0, num_queues, queue_size), fd

    @classmethod
    def map(
        cls, fd: int, size: int, offset: int, num_queues: int, queue_size: int, max_queues: int
    ) -> InflightRegion:
        """SET_INFLIGHT_FD: map the region QEMU kept (``fd`` stays the caller's).

        Raises:
            RemoteProtocolError: counts out of range, a size that is not what
                those queues take, an unaligned offset, or a file too small.
        """
        cls._check(num_queues, queue_size, max_queues, "SET_INFLIGHT_FD")
        want = queue_region_size(queue_size) * num_queues
        if size != want:
            raise _error(
                f"SET_INFLIGHT_FD: region of {size} B; {num_queues} queues of {queue_size} "
                f"entries take {want} B"
            )
        if offset % mmap.ALLOCATIONGRANULARITY:
            raise _error(f"SET_INFLIGHT_FD: offset {offset} is not page-aligned")
        try:
            have = os.fstat(fd).st_size
            if have < offset + size:
                raise _error(
                    f"SET_INFLIGHT_FD: the file holds {have} B, the region needs {offset + size} B"
                )
            mm = mmap.mmap(
                fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset
            )
        except OSError as e:
            raise _error(f"SET_INFLIGHT_FD: cannot map the region: {e}") from e
        return cls(mm, num_queues, queue_size)

    def close(self) -> None:
        self._mm.close()

    def start_queue(self, index: int, mem: Memory, state: QueueState) -> TrackedQueue:
        """A tracked queue for ring ``index`` (``state`` as SET_VRING_BASE gave it),
        resuming what the region says was in flight.

        Raises:
            RemoteProtocolError: the ring is not covered by the region or does not
                match it (queue index, size), or the region's entries are corrupt.
            RingError: as :meth:`DeviceQueue.restore`.
        """
        size = state.layout.size
        if index >= self.num_queues:
            raise _error(f"queue {index} has no inflight region ({self.num_queues} queues tracked)")
        if size != self.queue_size:
            raise _error(
                f"queue {index}: ring of {size} entries, its inflight region tracks "
                f"{self.queue_size}"
            )
        base = index * self.stride
        mm = self._mm
        (used_idx,) = _U16.unpack_from(mem.view(state.layout.used + 2, 2), 0)
        _, version, desc_num, _last, region_used = INFLIGHT_HDR.unpack_from(mm, base)
        resubmit: list[int] = []
        counter = repaired = 0
        if version == 0:  # fresh (or reset by the guest): start tracking
            INFLIGHT_HDR.pack_into(mm, base, 0, VERSION, size, 0, state.next_used)
        else:
            if desc_num != size:
                raise _error(
                    f"queue {index}: inflight region describes {desc_num} descriptors, "
                    f"the ring has {size}"
                )
            repaired = _repair(mm, base, mem, state.layout, region_used, used_idx)
            entries: list[tuple[int, int]] = []
            for head in range(size):
                flag, _, c = INFLIGHT_DESC.unpack_from(mm, base + INFLIGHT_HDR.size + 16 * head)
                if flag > 1:
                    raise _error(f"queue {index}: inflight entry {head} is corrupt ({flag})")
                if flag:
                    entries.append((c, head))
            entries.sort()
            resubmit = [head for _, head in entries]
            if entries:
                counter = entries[-1][0] + 1
            state = QueueState(
                layout=state.layout,
                next_avail=(used_idx + len(resubmit)) & 0xFFFF,
                next_used=used_idx,
                event_idx=state.event_idx,
                indirect=state.indirect,
                ready=state.ready,
                inflight=tuple(resubmit),
            )
        q = TrackedQueue.restore(mem, state)
        assert isinstance(q, TrackedQueue)
        q.track(mm, base, counter, resubmit)
        q.repaired = repaired
        return q


def _repair(
    mm: mmap.mmap, base: int, mem: Memory, layout: SplitLayout, region_used: int, used_idx: int
) -> int:
    """Clear the heads the used ring shows completed past the region's ``used_idx``
    (the back-end died between publishing ``used.idx`` and clearing them); how many
    were still marked."""
    torn = (used_idx - region_used) & 0xFFFF
    if not torn:
        return 0
    if torn > layout.size:
        raise _error(
            f"inflight region's used index {region_used} is {torn} behind the ring's {used_idx}"
        )
    view = mem.view(layout.used, 4 + 8 * layout.size, False)
    cleared = 0
    for k in range(torn):
        slot = (region_used + k) & (layout.size - 1)
        (head,) = struct.unpack_from("=I", view, 4 + 8 * slot)
        if head < layout.size and mm[base + INFLIGHT_HDR.size + 16 * head]:
            mm[base + INFLIGHT_HDR.size + 16 * head] = 0
            cleared += 1
    INFLIGHT_HDR.pack_into(mm, base, 0, VERSION, layout.size, 0, used_idx)
    return cleared


class TrackedQueue(DeviceQueue):
    """A split device queue that records its requests in an :class:`InflightRegion`."""

    __slots__ = ("_batch", "_counter", "_entries", "_hdr", "_resubmit", "_rmm", "repaired")

    #: entries found marked although the used ring showed them completed (a torn
    #: publication), cleared at the start
    repaired: int

    def track(self, mm: mmap.mmap, base: int, counter: int, resubmit: list[int]) -> None:
        self._rmm = mm
        self._hdr = base
        self._entries = base + INFLIGHT_HDR.size
        self._counter = counter
        self._resubmit = resubmit[::-1]  # popped from the end: oldest counter first
        self._batch: list[int] = []

    @property
    def resubmitting(self) -> int:
        """Requests from before the reconnect not yet handed out again."""
        return len(self._resubmit)

    def _mark(self, head: int) -> None:
        """``counter`` then ``inflight = 1`` (``next`` is unused for split rings)."""
        off = self._entries + 16 * head
        _U64.pack_into(self._rmm, off + 8, self._counter)
        self._counter += 1
        self._rmm[off] = 1

    def pop(self) -> Chain | None:
        if self._resubmit:
            if self.broken or not self.ready:
                self._check_usable()
            return self._walk(self._resubmit.pop())
        chain = super().pop()
        if chain is not None:
            self._mark(chain.head)
        return chain

    def pop_many(self, limit: int = 32768) -> list[Chain]:
        if self._resubmit:
            if self.broken or not self.ready:
                self._check_usable()
            out: list[Chain] = []
            while self._resubmit and len(out) < limit:
                out.append(self._walk(self._resubmit.pop()))
            return out
        chains = super().pop_many(limit)
        if chains:  # _mark, inlined: this is the block backend's path
            mm, entries, counter = self._rmm, self._entries, self._counter
            for chain in chains:
                off = entries + 16 * chain.head
                _U64.pack_into(mm, off + 8, counter)
                counter += 1
                mm[off] = 1
            self._counter = counter
        return chains

    def pending(self) -> int:
        return super().pending() + len(self._resubmit)

    def enable_notifications(self) -> bool:
        return super().enable_notifications() or bool(self._resubmit)

    def add_used(self, head: int, length: int) -> None:
        super().add_used(head, length)
        self._batch.append(head)

    def add_used_many(self, entries: Iterable[tuple[int, int]]) -> None:
        for head, length in entries:
            self.add_used(head, length)

    def publish_used(self) -> bool:
        batch = self._batch
        if not batch:
            return super().publish_used()
        mm, entries = self._rmm, self._entries
        _U16.pack_into(mm, self._hdr + _LAST_BATCH_OFF, batch[-1])
        wanted = super().publish_used()
        for head in batch:
            mm[entries + 16 * head] = 0
        batch.clear()
        _U16.pack_into(mm, self._hdr + _USED_IDX_OFF, self._next_used)
        return wanted
