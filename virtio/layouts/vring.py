"""Virtqueue layouts (virtio 1.2 §2.7, §2.8), declared once with ``construct``.

Owns the split ring's descriptor, avail ring, used element and used ring, the
legacy contiguous vring arithmetic of Linux ``vring_init()``/``vring_size()``,
the packed ring's descriptor and event-suppression structure, their
precompiled ``struct.Struct`` twins (tested against the declarations), and
:func:`field_offset`, which derives offsets from any fixed-size declaration.

The bottom of ``virtio.layouts``: imports ``construct``, ``virtio.constants``
and ``virtio.errors`` only; must not import the sibling layout modules,
asyncio, the OS or ``transport``.
"""

from __future__ import annotations

import struct
from functools import lru_cache

from construct import Array, Construct, Int16ul, Int32ul, Int64ul, Struct

from virtio.constants import VRING_SIZE_MAX
from virtio.errors import LocalProtocolError

__all__ = [
    "field_offset",
    "SplitDesc",
    "UsedElem",
    "split_avail",
    "split_used",
    "vring_size",
    "vring_offsets",
    "SPLIT_DESC_STRUCT",
    "USED_ELEM_STRUCT",
    "PackedDesc",
    "PackedEvent",
    "PACKED_DESC_STRUCT",
    "PACKED_EVENT_STRUCT",
    "PACKED_DESC_BODY_STRUCT",
    "PACKED_USED_STRUCT",
]


def field_offset(layout: Construct, name: str) -> int:
    """Byte offset of field ``name`` in a fixed-size ``Struct``.

    Used to derive hot-path offsets (and ``struct`` formats) from the one
    declaration here instead of restating them.

    Raises:
        LocalProtocolError: ``name`` is not a field of ``layout``.
    """
    offset = 0
    for sub in layout.subcons:
        if sub.name == name:
            return offset
        offset += int(sub.sizeof())
    raise LocalProtocolError(f"no field {name!r} in {layout!r}")


# --- split ring (spec 2.7, Linux include/uapi/linux/virtio_ring.h) ----------

#: ``struct virtq_desc`` (2.7.5): 16 bytes.
SplitDesc = Struct(
    "addr" / Int64ul,
    "len" / Int32ul,
    "flags" / Int16ul,
    "next" / Int16ul,
)

#: ``struct virtq_used_elem`` (2.7.8): 8 bytes.
UsedElem = Struct(
    "id" / Int32ul,
    "len" / Int32ul,
)

#: Hot-path twins of :data:`SplitDesc` and :data:`UsedElem` (tested equal).
SPLIT_DESC_STRUCT = struct.Struct("<QIHH")
USED_ELEM_STRUCT = struct.Struct("<II")


def _check_ring_size(size: int) -> None:
    if not 1 <= size <= VRING_SIZE_MAX:
        raise LocalProtocolError(f"ring size {size} outside 1..{VRING_SIZE_MAX}")


@lru_cache(maxsize=64)
def split_avail(size: int) -> Construct:
    """``struct virtq_avail`` (2.7.6) for a ring of ``size`` entries: 6 + 2*size bytes.

    Raises:
        LocalProtocolError: ``size`` is outside 1..32768.
    """
    _check_ring_size(size)
    return Struct(
        "flags" / Int16ul,
        "idx" / Int16ul,
        "ring" / Array(size, Int16ul),
        "used_event" / Int16ul,  # only meaningful with VIRTIO_F_EVENT_IDX
    )


@lru_cache(maxsize=64)
def split_used(size: int) -> Construct:
    """``struct virtq_used`` (2.7.8) for a ring of ``size`` entries: 6 + 8*size bytes.

    Raises:
        LocalProtocolError: ``size`` is outside 1..32768.
    """
    _check_ring_size(size)
    return Struct(
        "flags" / Int16ul,
        "idx" / Int16ul,
        "ring" / Array(size, UsedElem),
        "avail_event" / Int16ul,  # only meaningful with VIRTIO_F_EVENT_IDX
    )


def vring_offsets(num: int, align: int) -> tuple[int, int, int]:
    """``(desc, avail, used)`` offsets of the legacy single-block vring.

    Same layout as Linux ``vring_init()``: descriptors at 0, the avail ring right
    after them, the used ring at the next multiple of ``align`` (MIC uses
    ``MIC_VIRTIO_RING_ALIGN`` = 4096).

    Raises:
        LocalProtocolError: ``num`` is outside 1..32768 or ``align`` is not a
            power of two.
    """
    _check_ring_size(num)
    if align <= 0 or align & (align - 1):
        raise LocalProtocolError(f"vring alignment {align} is not a power of two")
    avail_off = _DESC_BYTES * num
    used_off = (avail_off + _RING_HDR + 2 * num + 2 + align - 1) & ~(align - 1)
    return 0, avail_off, used_off


def vring_size(num: int, align: int) -> int:
    """Total bytes of the legacy vring, as Linux ``vring_size(num, align)``.

    Raises:
        LocalProtocolError: as :func:`vring_offsets`.
    """
    _, _, used_off = vring_offsets(num, align)
    return used_off + _RING_HDR + _USED_ELEM_BYTES * num + 2


# Sizes for the arithmetic above (checked against the construct layouts by the
# tests): a construct ``sizeof()`` costs ~50 µs, and these run per device add
# and in SplitLayout.
_DESC_BYTES = 16  # SplitDesc
_USED_ELEM_BYTES = 8  # UsedElem
_RING_HDR = 4  # flags + idx of avail and used; each ring ends with a 2-byte event field


# --- packed ring (spec 2.8) ---------------------------------------------------

#: ``struct pvirtq_desc`` (2.8.13): 16 bytes.
PackedDesc = Struct(
    "addr" / Int64ul,
    "len" / Int32ul,
    "id" / Int16ul,
    "flags" / Int16ul,
)

#: ``struct pvirtq_event_suppress`` (2.8.14): ``off_wrap`` is desc_event_off:15 | wrap:1.
PackedEvent = Struct(
    "off_wrap" / Int16ul,
    "flags" / Int16ul,
)

PACKED_DESC_STRUCT = struct.Struct("<QIHH")
PACKED_EVENT_STRUCT = struct.Struct("<HH")
#: :data:`PackedDesc` without its trailing ``flags`` (``addr, len, id``): the
#: flags word is what the peer polls, so it is published by itself with one
#: aligned 16-bit store after the body is written (tested against the declaration).
PACKED_DESC_BODY_STRUCT = struct.Struct("<QIH")
#: ``len, id`` of :data:`PackedDesc` at offset 8: what the device writes into a
#: used descriptor before publishing its flags (tested against the declaration).
PACKED_USED_STRUCT = struct.Struct("<IH")
