"""The split virtqueue core (virtio 1.2 §2.7): driver side and device side, sans-IO.

Owns every rule about a split ring: layout validation, building and walking
descriptor chains, used-ring bookkeeping, notification suppression (flags and
EVENT_IDX), reset and save/restore. Must not import asyncio, the OS or
``transport``: it works on a :class:`virtio.memory.Memory` and *returns* what
must happen (a chain to serve, whether to kick, whether to interrupt); the
host and card adapters ring doorbells and sleep.

One concept per module, imports pointing down only::

    driver   DriverQueue                      (the card side)
    device   DeviceQueue, QueueState          (the host side)
    chain    Chain, slice/gather/scatter      (what the device pops)
    layout   SplitLayout, DESC, need_event    (where a ring lives, index arithmetic)
    fence    full_fence                       (the memory barrier)
    faults   RingFault, RingError, QueueBroken

``driver`` and ``device`` never import each other. This ``__init__`` only
re-exports: ``from virtio.split import DeviceQueue, ...`` is the public path.

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

from virtio.split.chain import Chain, gather_segments, scatter_segments, slice_segments
from virtio.split.device import DeviceQueue, QueueState
from virtio.split.driver import DriverQueue
from virtio.split.faults import QueueBroken, RingError, RingFault
from virtio.split.fence import full_fence
from virtio.split.layout import DESC, DESC_SIZE, USED_ELEM, SplitLayout, need_event

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
