"""The packed virtqueue core (virtio 1.2 §2.8): driver side and device side, sans-IO.

Same public shape as :mod:`virtio.split`, so an adapter can pick either ring
with one import: a :class:`DriverQueue` (``add``/``publish``/``get_used``,
interrupt suppression) and a :class:`DeviceQueue` (``pop``/``add_used``/
``publish_used``, notification suppression) over the
:class:`virtio.memory.Memory` protocol, popping the same
:class:`~virtio.split.Chain` and raising the same :class:`RingError` /
:class:`QueueBroken` (with the packed ring's own :class:`RingFault` codes).
Where the shapes differ: a ring is a :class:`PackedLayout` (descriptor ring,
driver event area, device event area; any size up to 2^15), the "head" of a
list is its buffer id, and ``save`` returns a :class:`PackedQueueState`
(positions with their wrap counters, in-flight ids with their list lengths).

One concept per module, imports pointing down only::

    driver   DriverQueue                      (the card side)
    device   DeviceQueue                      (the host side)
    state    PackedQueueState                 (save/restore)
    layout   PackedLayout, descriptor twins, event words, packed_need_event

It reuses ``virtio.split``'s ``faults``, ``fence`` and ``chain``; ``driver``
and ``device`` never import each other. This ``__init__`` only re-exports.

Trust model: as the split ring. The device side treats every descriptor and
the driver's event word as hostile (QEMU ``virtqueue_packed_pop``, Linux
vhost, DPDK ``fill_vec_buf_packed``, raising where those truncate); the
driver side treats used descriptors and the device's event word as hostile
(Linux ``virtqueue_get_buf_ctx_packed``). A violation raises
:class:`RingError` and latches the queue; the caller sets DEVICE_NEEDS_RESET.

Hot path: descriptors go through precompiled ``struct.Struct`` twins of the
construct declarations in :mod:`virtio.layouts`; every word the peer polls (a
descriptor's ``flags``, an event-suppression word) is published with one
aligned store through ``memoryview.cast``, after the rest of the descriptor.
"""

from virtio.packed.device import DeviceQueue
from virtio.packed.driver import DriverQueue
from virtio.packed.layout import (
    DESC,
    DESC_SIZE,
    PackedLayout,
    event_word,
    packed_need_event,
)
from virtio.packed.state import PackedQueueState
from virtio.split.chain import Chain
from virtio.split.faults import QueueBroken, RingError, RingFault
from virtio.split.fence import full_fence

__all__ = [
    "DESC",
    "DESC_SIZE",
    "Chain",
    "DeviceQueue",
    "DriverQueue",
    "PackedLayout",
    "PackedQueueState",
    "QueueBroken",
    "RingError",
    "RingFault",
    "event_word",
    "full_fence",
    "packed_need_event",
]
