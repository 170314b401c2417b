"""A packed device queue's private state, enough to rebuild it elsewhere (migration).

Owns :class:`PackedQueueState` (what :meth:`virtio.packed.DeviceQueue.save`
returns) and :func:`state_problem`, the consistency rules
:meth:`~virtio.packed.DeviceQueue.restore` checks before trusting one. Pure
data: imports :mod:`virtio.packed.layout` only; must not import
``device`` or ``driver``, asyncio, the OS or ``transport``.
"""

from __future__ import annotations

from dataclasses import dataclass

from virtio.packed.layout import PackedLayout

__all__ = ["PackedQueueState", "state_problem"]


@dataclass(frozen=True, slots=True)
class PackedQueueState:
    """Positions, wrap counters, in-flight buffers and staged used descriptors."""

    layout: PackedLayout
    next_avail: int
    avail_wrap: int
    next_used: int
    used_wrap: int
    event_idx: bool
    indirect: bool
    ready: bool
    #: ``(buffer id, ring slots its list took)`` for every list popped and not completed
    inflight: tuple[tuple[int, int], ...]
    notify_enabled: bool = True
    #: used descriptors written but not yet published: ``(slot, flags)``, and
    #: the ring slots they moved the used position by
    staged: tuple[tuple[int, int], ...] = ()
    moved: int = 0


def _linear(pos: int, wrap: int, size: int) -> int:
    """A position on the doubled ring: lap parity from the wrap counter (starts at 1)."""
    return pos + (0 if wrap else size)


def state_problem(s: PackedQueueState) -> str | None:
    """The first inconsistency of a saved state, or None."""
    n = s.layout.size
    if not (0 <= s.next_avail < n and 0 <= s.next_used < n):
        return "positions outside the ring"
    if s.avail_wrap not in (0, 1) or s.used_wrap not in (0, 1):
        return "wrap counters are not 0 or 1"
    ids = [bid for bid, _ in s.inflight]
    if len(set(ids)) != len(ids) or any(not 0 <= bid < n for bid in ids):
        return "in-flight buffer ids repeat or lie outside the ring"
    if any(count < 1 for _, count in s.inflight):
        return "an in-flight list takes no slot"
    distance = (_linear(s.next_avail, s.avail_wrap, n) - _linear(s.next_used, s.used_wrap, n)) % (
        2 * n
    )
    if distance != sum(count for _, count in s.inflight):
        return "in-flight slots do not add up to the distance between the positions"
    if not 0 <= s.moved <= n or len(s.staged) > n:
        return "staged completions exceed the ring"
    if any(
        not 0 <= slot < n or flags & ~0x8082 or (flags & 0x8080) not in (0, 0x8080)
        for slot, flags in s.staged
    ):
        return "a staged used descriptor is outside the ring or has foreign flags"
    return None
