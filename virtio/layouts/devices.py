"""Device-type layouts (virtio 1.2 §5.1-5.3), declared once with ``construct``.

Owns the request header, DISCARD/WRITE_ZEROES segment and config space of
virtio-blk, the headers and config space of virtio-net, and the config space,
control message and RESIZE payload of virtio-console. The rules of each
protocol and the hot-path ``struct`` twins live in :mod:`virtio.blk`,
:mod:`virtio.net` and :mod:`virtio.console`, tested against these.

Imports ``construct`` only; must not import the sibling layout modules, the
protocol modules, asyncio, the OS or ``transport``.
"""

from __future__ import annotations

from construct import (
    Bytes,
    Int8ul,
    Int16ul,
    Int32ul,
    Int64ul,
    Padding,
    Struct,
)

__all__ = [
    "BlkReqHeader",
    "BlkDiscardWriteZeroes",
    "BlkConfig",
    "NetHdrLegacy",
    "NetHdr",
    "NetConfig",
    "ConsoleConfig",
    "ConsoleControl",
    "ConsoleResize",
]


# --- virtio-blk (spec 5.2, Linux include/uapi/linux/virtio_blk.h) -------------

#: ``struct virtio_blk_req`` header (5.2.6): type, reserved (legacy ioprio), sector.
BlkReqHeader = Struct(
    "type" / Int32ul,
    Padding(4),  # "reserved"; legacy ioprio, ignored by the device
    "sector" / Int64ul,
)

#: ``struct virtio_blk_discard_write_zeroes`` (5.2.6): one segment of a
#: DISCARD/WRITE_ZEROES request; ``flags`` bit 0 is "unmap", the rest reserved
#: (the device answers UNSUPP to reserved bits, so they are kept, not dropped).
BlkDiscardWriteZeroes = Struct(
    "sector" / Int64ul,
    "num_sectors" / Int32ul,
    "flags" / Int32ul,
)

#: ``struct virtio_blk_config`` (5.2.4) up to ``write_zeroes_may_unmap`` and its
#: 3 ``unused1`` bytes: 60 bytes, as in Linux before the secure-erase fields.
BlkConfig = Struct(
    "capacity" / Int64ul,
    "size_max" / Int32ul,
    "seg_max" / Int32ul,
    "geometry"
    / Struct(
        "cylinders" / Int16ul,
        "heads" / Int8ul,
        "sectors" / Int8ul,
    ),
    "blk_size" / Int32ul,
    "topology"
    / Struct(
        "physical_block_exp" / Int8ul,
        "alignment_offset" / Int8ul,
        "min_io_size" / Int16ul,
        "opt_io_size" / Int32ul,
    ),
    "writeback" / Int8ul,
    Padding(1),  # unused0
    "num_queues" / Int16ul,
    "max_discard_sectors" / Int32ul,
    "max_discard_seg" / Int32ul,
    "discard_sector_alignment" / Int32ul,
    "max_write_zeroes_sectors" / Int32ul,
    "max_write_zeroes_seg" / Int32ul,
    "write_zeroes_may_unmap" / Int8ul,
    Padding(3),  # unused1
)


# --- virtio-net (spec 5.1, Linux include/uapi/linux/virtio_net.h) -------------

_NET_HDR_LEGACY_FIELDS = (
    "flags" / Int8ul,
    "gso_type" / Int8ul,
    "hdr_len" / Int16ul,
    "gso_size" / Int16ul,
    "csum_start" / Int16ul,
    "csum_offset" / Int16ul,
)

#: ``struct virtio_net_hdr`` (legacy, no MRG_RXBUF): 10 bytes.
NetHdrLegacy = Struct(*_NET_HDR_LEGACY_FIELDS)

#: ``struct virtio_net_hdr_mrg_rxbuf`` / the VERSION_1 header: 12 bytes.
NetHdr = Struct(*_NET_HDR_LEGACY_FIELDS, "num_buffers" / Int16ul)

#: ``struct virtio_net_config`` (5.1.4) up to ``mtu``: 12 bytes.
NetConfig = Struct(
    "mac" / Bytes(6),
    "status" / Int16ul,
    "max_virtqueue_pairs" / Int16ul,
    "mtu" / Int16ul,
)


# --- virtio-console (spec 5.3, Linux include/uapi/linux/virtio_console.h) -----

#: ``struct virtio_console_config`` (5.3.4): 12 bytes.
ConsoleConfig = Struct(
    "cols" / Int16ul,
    "rows" / Int16ul,
    "max_nr_ports" / Int32ul,
    "emerg_wr" / Int32ul,
)

#: ``struct virtio_console_control`` (5.3.6.2): 8 bytes; ``event`` is a ConsoleEvent.
ConsoleControl = Struct(
    "id" / Int32ul,
    "event" / Int16ul,
    "value" / Int16ul,
)

#: The payload after a RESIZE control message: 4 bytes. Rows first, as Linux
#: ``virtio_console.c`` reads it (the spec's ``struct virtio_console_resize``
#: lists cols first; we follow the driver that exists).
ConsoleResize = Struct(
    "rows" / Int16ul,
    "cols" / Int16ul,
)
