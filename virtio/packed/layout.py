"""Where a packed ring lives and the arithmetic on its positions (virtio 1.2 §2.8).

Owns :class:`PackedLayout` (size and the bus addresses of the descriptor ring,
the driver event suppression area and the device event suppression area; the
rules a layout must keep), the views a queue maps over a layout, the
precompiled descriptor ``struct`` twins (declared in :mod:`virtio.layouts`,
tested against the construct layouts there), the event-suppression word
helpers and :func:`packed_need_event`, the EVENT_IDX arithmetic with wrap
counters (§2.8.10, Linux ``virtqueue_kick_prepare_packed``).

Imports :mod:`virtio.split.faults`, :func:`virtio.split.need_event` and the
modules below ``virtio.split`` (constants, layouts, memory); must not import
``virtio.packed.device`` or ``virtio.packed.driver``, nor asyncio, the OS or
``transport``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from virtio.constants import VRING_SIZE_MAX, PackedDescFlag, PackedEventFlag
from virtio.layouts import (
    PACKED_DESC_BODY_STRUCT,
    PACKED_DESC_STRUCT,
    PACKED_EVENT_STRUCT,
    PACKED_USED_STRUCT,
)
from virtio.memory import ADDRESS_LIMIT, Memory
from virtio.split.faults import RingFault
from virtio.split.layout import need_event

__all__ = [
    "AVAIL",
    "DESC",
    "DESC_BODY",
    "DESC_SIZE",
    "EVENT_DESC",
    "EVENT_DISABLE",
    "EVENT_ENABLE",
    "EVENT_SIZE",
    "INDIRECT",
    "NEXT",
    "U32_LIMIT",
    "USED",
    "WRITE",
    "USED_BODY",
    "PackedLayout",
    "event_problem",
    "event_word",
    "packed_need_event",
    "ring_views",
]

#: ``struct pvirtq_desc {le64 addr; le32 len; le16 id; le16 flags}`` (§2.8.13)
#: and its body without ``flags``; ``len, id`` at offset 8 (what a used
#: descriptor carries); ``struct pvirtq_event_suppress`` (§2.8.14).
DESC: Final = PACKED_DESC_STRUCT
DESC_BODY: Final = PACKED_DESC_BODY_STRUCT
USED_BODY: Final = PACKED_USED_STRUCT
DESC_SIZE: Final = DESC.size
EVENT_SIZE: Final = PACKED_EVENT_STRUCT.size

#: the flag and event values as plain ints, for both sides' hot paths
AVAIL: Final = int(PackedDescFlag.AVAIL)
USED: Final = int(PackedDescFlag.USED)
NEXT: Final = int(PackedDescFlag.NEXT)
WRITE: Final = int(PackedDescFlag.WRITE)
INDIRECT: Final = int(PackedDescFlag.INDIRECT)
EVENT_ENABLE: Final = int(PackedEventFlag.ENABLE)
EVENT_DISABLE: Final = int(PackedEventFlag.DISABLE)
EVENT_DESC: Final = int(PackedEventFlag.DESC)
U32_LIMIT: Final = 1 << 32
_ENABLE, _DISABLE, _DESC_EVENT = EVENT_ENABLE, EVENT_DISABLE, EVENT_DESC

#: §2.8.14: ``desc_event_off`` has 15 bits, so a packed ring has at most 2^15 entries.
WRAP_BIT: Final = 15


def event_word(flags: int, off: int = 0, wrap: int = 0) -> int:
    """The event-suppression structure as one little-endian 32-bit word.

    ``off_wrap`` is the low half, ``flags`` the high half: both sides write it
    with one aligned 32-bit store (``memoryview.cast('I')``), so the peer never
    sees a new ``flags`` with a stale offset.
    """
    return (flags << 16) | (wrap << WRAP_BIT) | off


def event_problem(word: int, size: int, event_idx: bool) -> tuple[RingFault, str] | None:
    """The first rule a peer's event-suppression word breaks, or None.

    ``flags`` must be ENABLE, DISABLE or (only with EVENT_IDX) DESC, and the
    reserved bits zero; with DESC the offset must name a descriptor of the ring.
    """
    flags = word >> 16
    if flags > _DESC_EVENT or (flags == _DESC_EVENT and not event_idx):
        return RingFault.BAD_EVENT_FLAGS, (
            f"event flags {flags:#x} (valid: 0 enable, 1 disable{', 2 desc' if event_idx else ''})"
        )
    if flags == _DESC_EVENT and (word & 0x7FFF) >= size:
        return RingFault.BAD_EVENT_OFFSET, (f"event offset {word & 0x7FFF} >= queue size {size}")
    return None


def packed_need_event(word: int, size: int, wrap: int, new: int, old: int) -> bool:
    """Does the peer's (valid) event word ask for a notification for ``(old, new]``?

    ``new`` is our position (0..size-1) after the batch with wrap counter
    ``wrap``; ``old = new - moved`` (may be negative). ENABLE: always;
    DISABLE: never; DESC: the descriptor at ``off`` (in the lap named by its
    wrap bit) is one of those just made available or used (Linux
    ``vring_need_event`` after ``event_idx -= num`` for the other lap).
    """
    flags = word >> 16
    if flags != _DESC_EVENT:
        return flags == _ENABLE
    off = word & 0x7FFF
    if (word >> WRAP_BIT) & 1 != wrap:
        off -= size
    return need_event(off & 0xFFFF, new & 0xFFFF, old & 0xFFFF)


@dataclass(frozen=True, slots=True)
class PackedLayout:
    """Where a packed ring's three parts live (bus addresses) and its size.

    ``driver`` is the Driver Event Suppression area (written by the driver: it
    governs used-buffer notifications), ``device`` the Device Event
    Suppression area (written by the device: it governs kicks).
    """

    size: int
    desc: int
    driver: int
    device: int

    @property
    def desc_bytes(self) -> int:
        return DESC_SIZE * self.size

    @classmethod
    def contiguous(cls, base: int, size: int) -> PackedLayout:
        """Descriptor ring at ``base``, then the driver and the device areas (4 B each)."""
        return cls(size, base, base + DESC_SIZE * size, base + DESC_SIZE * size + EVENT_SIZE)

    @staticmethod
    def contiguous_bytes(size: int) -> int:
        """Bytes :meth:`contiguous` spans."""
        return DESC_SIZE * size + 2 * EVENT_SIZE

    def problem(self, max_size: int = VRING_SIZE_MAX) -> tuple[RingFault, str] | None:
        """The first rule this layout breaks (size, alignment, overflow), or None.

        Unlike the split ring, the size need not be a power of two (§2.8.10.1).
        """
        n = self.size
        limit = min(max_size, VRING_SIZE_MAX)
        if not 0 < n <= limit:
            return RingFault.BAD_SIZE, f"queue size {n} is not in [1, {limit}]"
        for name, addr, align, length in (
            ("descriptor ring", self.desc, 16, self.desc_bytes),
            ("driver event area", self.driver, 4, EVENT_SIZE),
            ("device event area", self.device, 4, EVENT_SIZE),
        ):
            if addr % align:
                return RingFault.MISALIGNED, f"{name} at {addr:#x} not {align}-byte aligned"
            if addr < 0 or addr + length > ADDRESS_LIMIT:
                return RingFault.ADDRESS_OVERFLOW, f"{name} at {addr:#x} overflows"
        return None


def ring_views(
    mem: Memory, layout: PackedLayout, *, driver_w: bool, device_w: bool
) -> tuple[memoryview, memoryview, memoryview]:
    """Views of the descriptor ring (writable: both sides write it) and the two
    event areas, the driver's and the device's, each writable or not.

    Raises:
        MemoryFault: a part lies outside ``mem`` (or is not writable there).
    """
    return (
        mem.view(layout.desc, layout.desc_bytes, True),
        mem.view(layout.driver, EVENT_SIZE, driver_w),
        mem.view(layout.device, EVENT_SIZE, device_w),
    )
