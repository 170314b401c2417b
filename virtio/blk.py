"""virtio-blk, the sans-IO part both sides share (virtio 1.2 §5.2).

Owns the wire rules of a block request, used by the host backend
(``mic_host.backends.block``) and the card driver (``mic_card.drivers.block``):

- a request is one chain: the 16-byte header (device-readable), the data
  (readable for OUT and the DISCARD/WRITE_ZEROES segments, writable for IN
  and GET_ID), then one status byte, the chain's last writable byte (§5.2.6);
- the header ``{le32 type; le32 reserved; le64 sector}``: :data:`REQ_HEADER`,
  the precompiled twin of :data:`virtio.layouts.BlkReqHeader` (the reserved
  word is written as zero and ignored on receipt);
- one DISCARD/WRITE_ZEROES segment ``{le64 sector; le32 num_sectors; le32
  flags}``: :data:`SEGMENT`, twin of :data:`virtio.layouts.BlkDiscardWriteZeroes`,
  and which flags a device accepts (:func:`segment_flags_ok`);
- GET_ID answers exactly :data:`ID_BYTES` bytes;
- :data:`DRIVER_FEATURES`: the device features the card's driver knows (and so
  what a back-end that is not MIC-VOP's passes on to it);
- the config space: :func:`parse_config` turns the bytes the host wrote into
  the construct value or raises the remote error.

The construct declarations in :mod:`virtio.layouts` stay the one source of
truth; the ``struct`` twins here are tested against them (sizes and golden
bytes). Must not import asyncio, ``transport`` or ``mic_*``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

from construct import ConstructError

from virtio.constants import BlkFeature, BlkReqType, BlkStatus
from virtio.errors import RemoteProtocolError
from virtio.layouts import BlkConfig

__all__ = [
    "DRIVER_FEATURES",
    "ID_BYTES",
    "REQ_HEADER",
    "REQ_HEADER_SIZE",
    "SEGMENT",
    "SEGMENT_SIZE",
    "STATUS_SIZE",
    "WRITE_ZEROES_FLAG_UNMAP",
    "build_segments",
    "parse_config",
    "segment_flags_ok",
    "status_name",
]

#: ``struct virtio_blk_req`` header: type, 4 reserved bytes, sector. Twin of
#: ``layouts.BlkReqHeader``: ``REQ_HEADER.pack(type, sector)``, and
#: ``unpack_from`` gives ``(type, sector)``.
REQ_HEADER = struct.Struct("<I4xQ")
REQ_HEADER_SIZE = REQ_HEADER.size  # 16
#: ``struct virtio_blk_discard_write_zeroes``: sector, num_sectors, flags.
#: Twin of ``layouts.BlkDiscardWriteZeroes``.
SEGMENT = struct.Struct("<QII")
SEGMENT_SIZE = SEGMENT.size  # 16
#: The status byte ends every request (the last writable byte of the chain).
STATUS_SIZE = 1
#: GET_ID answers exactly this many bytes, NUL-padded (VIRTIO_BLK_ID_BYTES).
ID_BYTES = 20
#: ``VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP``: the only defined segment flag.
WRITE_ZEROES_FLAG_UNMAP = 1
#: The virtio-blk device features MIC-VOP's card driver knows: what it accepts,
#: and what the vhost-user front-end passes on from an external back-end.
DRIVER_FEATURES = int(
    BlkFeature.SEG_MAX
    | BlkFeature.SIZE_MAX
    | BlkFeature.BLK_SIZE
    | BlkFeature.TOPOLOGY
    | BlkFeature.FLUSH
    | BlkFeature.RO
    | BlkFeature.MQ
    | BlkFeature.DISCARD
    | BlkFeature.WRITE_ZEROES
)


def segment_flags_ok(req_type: int, flags: int) -> bool:
    """May a device act on a segment with these ``flags`` (§5.2.6.2)?

    Reserved bits are never accepted, and "unmap" only on WRITE_ZEROES; the
    device answers UNSUPP otherwise.
    """
    if flags & ~WRITE_ZEROES_FLAG_UNMAP:
        return False
    return not (req_type == BlkReqType.DISCARD and flags & WRITE_ZEROES_FLAG_UNMAP)


def build_segments(ranges: Iterable[tuple[int, int]], flags: int = 0) -> bytes:
    """The payload of a DISCARD/WRITE_ZEROES request: one segment per ``(sector, count)``."""
    return b"".join(SEGMENT.pack(sector, count, flags) for sector, count in ranges)


def status_name(status: int) -> str:
    """``"OK"``, ``"IOERR"``, ``"UNSUPP"``, or the number of an undefined status."""
    try:
        return BlkStatus(status).name
    except ValueError:
        return str(status)


def parse_config(raw: bytes | bytearray | memoryview) -> Any:
    """Parse the config space the host wrote (``struct virtio_blk_config``, 60 bytes).

    Returns the construct value (fields as in :data:`virtio.layouts.BlkConfig`).

    Raises:
        RemoteProtocolError: the bytes do not parse (too short) (``reason="config"``).
    """
    try:
        return BlkConfig.parse(bytes(raw))
    except ConstructError as e:
        raise RemoteProtocolError(
            f"block config of {len(raw)} B does not parse: {e}", reason="config"
        ) from e
