"""Where a split ring lives and the arithmetic on its indices (virtio 1.2 §2.7).

Owns :class:`SplitLayout` (size and the bus addresses of the descriptor table,
avail ring and used ring; the legacy contiguous layout; the rules a layout
must keep), the views a queue maps over a layout, the precompiled descriptor
and used-element ``struct`` twins (declared in :mod:`virtio.layouts`, tested
against the construct layouts there), the flag bits as plain ints (the one
copy both the device and the driver side use), and :func:`need_event`, the
EVENT_IDX arithmetic (§2.7.10).

Imports :mod:`virtio.split.faults` and the modules below ``virtio.split``
(constants, layouts, memory); must not import ``chain``, ``device`` or
``driver``, nor asyncio, the OS or ``transport``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from virtio.constants import VRING_SIZE_MAX, DescFlag, RingFlag
from virtio.layouts import SPLIT_DESC_STRUCT, USED_ELEM_STRUCT, vring_offsets, vring_size
from virtio.memory import ADDRESS_LIMIT, Memory
from virtio.split.faults import RingFault

__all__ = [
    "CHAIN_BYTES_LIMIT",
    "DESC",
    "DESC_SIZE",
    "INDIRECT",
    "NEXT",
    "NO_INTERRUPT",
    "NO_NOTIFY",
    "USED_ELEM",
    "WRITE",
    "SplitLayout",
    "need_event",
    "ring_views",
]

#: ``struct vring_desc {le64 addr; le32 len; le16 flags; le16 next}`` (§2.7.5) and
#: ``struct vring_used_elem {le32 id; le32 len}`` (§2.7.8): the precompiled
#: twins of the construct declarations, tested byte for byte against them.
#: A module that calls ``DESC.pack_into``/``unpack_from`` per descriptor
#: rebinds it by assignment (``DESC: Final = _DESC_STRUCT``), not by the import
#: alone: CPython 3.11 compiles ``NAME.method(...)`` without LOAD_METHOD (a
#: bound method built per call) when ``NAME`` was bound by an import.
DESC: Final = SPLIT_DESC_STRUCT
DESC_SIZE: Final = DESC.size
USED_ELEM: Final = USED_ELEM_STRUCT

#: The descriptor flags (§2.7.5) and the avail/used ring flags (§2.7.6, §2.7.8)
#: as plain ints, for both sides' hot paths.
NEXT: Final = int(DescFlag.NEXT)
WRITE: Final = int(DescFlag.WRITE)
INDIRECT: Final = int(DescFlag.INDIRECT)
NO_INTERRUPT: Final = int(RingFlag.NO_INTERRUPT)
NO_NOTIFY: Final = int(RingFlag.NO_NOTIFY)

#: §2.7.4: the total length of a chain must fit in 32 bits (``used.len`` is le32).
CHAIN_BYTES_LIMIT: Final = 1 << 32


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


def ring_views(
    mem: Memory, layout: SplitLayout, *, desc_w: bool, avail_w: bool, used_w: bool
) -> tuple[memoryview, memoryview, memoryview]:
    """Views of the descriptor table, avail ring and used ring, each writable or not.

    Raises:
        MemoryFault: a part lies outside ``mem`` (or is not writable there).
    """
    return (
        mem.view(layout.desc, layout.desc_bytes, desc_w),
        mem.view(layout.avail, layout.avail_bytes, avail_w),
        mem.view(layout.used, layout.used_bytes, used_w),
    )
