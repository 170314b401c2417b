"""virtio-net, the sans-IO part both sides share (virtio 1.2 §5.1).

Owns: the 12-byte VERSION_1 header (``struct virtio_net_hdr_v1``, the same as
``virtio_net_hdr_mrg_rxbuf``) packed and checked with one precompiled
``struct`` (twin of :data:`virtio.layouts.NetHdr`, tested equal), the config
space, the feature set a device offers and how it maps to offloads, checks of
a header against the negotiated features in each direction, Ethernet address
helpers, and software checksum completion (for a receiver that did not
negotiate GUEST_CSUM), summed where the frame lies across its buffers
(:func:`segments_checksum`, :func:`splice_segments`).

A Linux TAP opened with ``IFF_VNET_HDR`` and ``TUNSETVNETHDRSZ 12`` reads and
writes exactly this header in front of each frame, so a frame travels
TAP -> ring -> TAP as one buffer, header included, with GSO and partial
checksums intact: that is where virtio-net's speed is (a 64 KiB TSO segment
is one chain, not 45 MTU-sized frames).

Must not import asyncio, ``transport`` or ``mic_*`` (checked by a test).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from virtio.constants import NetFeature, NetHdrFlag, NetHdrGso, NetStatus
from virtio.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "BROADCAST",
    "DEVICE_FEATURES",
    "ETH_HLEN",
    "MAX_FRAME",
    "MAX_PACKET",
    "NET_CONFIG_STRUCT",
    "NET_HDR",
    "NET_HDR_SIZE",
    "NUM_BUFFERS",
    "NUM_BUFFERS_OFFSET",
    "FrameError",
    "NetConfigValues",
    "Offloads",
    "build_config",
    "check_header",
    "complete_checksum",
    "segments_checksum",
    "splice_segments",
    "format_mac",
    "guest_offloads",
    "host_offloads",
    "is_multicast",
    "parse_config",
    "parse_mac",
    "random_mac",
]

#: The VERSION_1 header: flags, gso_type, hdr_len, gso_size, csum_start,
#: csum_offset, num_buffers (all little-endian). Twin of ``layouts.NetHdr``.
NET_HDR = struct.Struct("<BBHHHHH")
NET_HDR_SIZE = NET_HDR.size  # 12
#: ``num_buffers`` (MRG_RXBUF, §5.1.6.4): the header's last field, set by the device.
NUM_BUFFERS = struct.Struct("<H")
NUM_BUFFERS_OFFSET = 10
#: ``struct virtio_net_config`` up to ``mtu``. Twin of ``layouts.NetConfig``.
NET_CONFIG_STRUCT = struct.Struct("<6sHHH")

#: Ethernet header; also the shortest frame we accept (padding to 60 is
#: optional on a virtual link).
ETH_HLEN = 14
#: Largest frame of one GSO packet: IP's 64 KiB limit + Ethernet header + a VLAN tag.
MAX_FRAME = 65535 + ETH_HLEN + 4
#: Header + largest frame: what one received packet may need in buffers.
MAX_PACKET = NET_HDR_SIZE + MAX_FRAME
BROADCAST = b"\xff" * 6

#: What our backends offer (mpssd offered CSUM, GSO, GUEST_TSO4/6, GUEST_ECN on
#: legacy virtio; we add the host-side TSO, MRG_RXBUF, STATUS, MAC and MTU).
DEVICE_FEATURES = (
    NetFeature.CSUM
    | NetFeature.GUEST_CSUM
    | NetFeature.MTU
    | NetFeature.MAC
    | NetFeature.GUEST_TSO4
    | NetFeature.GUEST_TSO6
    | NetFeature.GUEST_ECN
    | NetFeature.HOST_TSO4
    | NetFeature.HOST_TSO6
    | NetFeature.HOST_ECN
    | NetFeature.MRG_RXBUF
    | NetFeature.STATUS
)

_NEEDS_CSUM = int(NetHdrFlag.NEEDS_CSUM)
_DRIVER_FLAGS = _NEEDS_CSUM  # §5.1.6.2: the driver sets only NEEDS_CSUM
_DEVICE_FLAGS = _NEEDS_CSUM | int(NetHdrFlag.DATA_VALID)  # §5.1.6.4
_GSO_ECN = int(NetHdrGso.ECN)


class FrameError(RemoteProtocolError):
    """A frame or header the peer sent breaks the rules; ``reason`` names the counter."""


@dataclass(frozen=True, slots=True)
class Offloads:
    """Offloads one receiver accepts (maps to ``TUN_F_*`` on a TAP)."""

    csum: bool = False
    tso4: bool = False
    tso6: bool = False
    ecn: bool = False

    def accepts(self, gso_type: int, flags: int) -> bool:
        """Can a receiver with these offloads take a packet with this header as is?"""
        base = gso_type & ~_GSO_ECN
        if base == NetHdrGso.TCPV4 and not self.tso4:
            return False
        if base == NetHdrGso.TCPV6 and not self.tso6:
            return False
        if gso_type & NetHdrGso.ECN and not self.ecn:
            return False
        return not (flags & NetHdrFlag.NEEDS_CSUM and not self.csum)


def guest_offloads(features: int) -> Offloads:
    """What the driver (card) can receive: GUEST_CSUM, GUEST_TSO4/6, GUEST_ECN."""
    return Offloads(
        csum=bool(features & NetFeature.GUEST_CSUM),
        tso4=bool(features & NetFeature.GUEST_TSO4),
        tso6=bool(features & NetFeature.GUEST_TSO6),
        ecn=bool(features & NetFeature.GUEST_ECN),
    )


def host_offloads(features: int) -> Offloads:
    """What the device (host) can receive from the driver: CSUM, HOST_TSO4/6, HOST_ECN."""
    return Offloads(
        csum=bool(features & NetFeature.CSUM),
        tso4=bool(features & NetFeature.HOST_TSO4),
        tso6=bool(features & NetFeature.HOST_TSO6),
        ecn=bool(features & NetFeature.HOST_ECN),
    )


def check_header(
    hdr: tuple[int, int, int, int, int, int, int],
    frame_len: int,
    accepts: Offloads,
    *,
    mtu: int = 1500,
    from_driver: bool = True,
) -> None:
    """Check a parsed header (``NET_HDR.unpack``) against what the receiver accepts.

    ``from_driver``: the header came from the driver's transmitq (§5.1.6.2:
    the driver must not set DATA_VALID or RSC_INFO); otherwise it came from
    the device's receiveq (§5.1.6.4; DATA_VALID allowed). A frame without GSO
    is at most ``mtu`` + Ethernet header + VLAN tag; a GSO frame at most
    :data:`MAX_FRAME` with a non-zero ``gso_size``.

    Raises:
        FrameError: the header is malformed or asks for an offload that was
            not negotiated (``reason`` is the counter name).
    """
    flags, gso_type, _hdr_len, gso_size, csum_start, csum_offset, _nb = hdr
    if frame_len < ETH_HLEN:
        raise FrameError(f"frame of {frame_len} B has no Ethernet header", reason="runt")
    # Plain ints: ``~`` on an IntFlag complements within its members only.
    allowed = _DRIVER_FLAGS if from_driver else _DEVICE_FLAGS
    if flags & ~allowed:
        raise FrameError(f"header flags {flags:#x} not allowed", reason="bad_header")
    if flags & NetHdrFlag.NEEDS_CSUM:
        if not accepts.csum:
            raise FrameError("partial checksum without CSUM negotiated", reason="offload")
        if csum_start + csum_offset + 2 > frame_len:
            raise FrameError(
                f"checksum at {csum_start}+{csum_offset} outside a {frame_len} B frame",
                reason="bad_header",
            )
    if gso_type == NetHdrGso.NONE:
        if frame_len > mtu + ETH_HLEN + 4:
            raise FrameError(f"{frame_len} B frame over MTU {mtu}, no GSO", reason="oversize")
        return
    base = gso_type & ~_GSO_ECN
    if base not in (NetHdrGso.TCPV4, NetHdrGso.TCPV6):
        raise FrameError(f"gso_type {gso_type:#x} not supported", reason="bad_header")
    if not accepts.accepts(gso_type, flags & ~_NEEDS_CSUM):
        raise FrameError(f"gso_type {gso_type:#x} not negotiated", reason="offload")
    if gso_size == 0:
        raise FrameError("GSO frame with gso_size 0", reason="bad_header")
    if frame_len > MAX_FRAME:
        raise FrameError(f"GSO frame of {frame_len} B over {MAX_FRAME}", reason="oversize")


def segments_checksum(
    segments: Sequence[bytes | bytearray | memoryview], csum_start: int, csum_offset: int
) -> bytes:
    """The finished partial checksum of a frame held in ``segments`` (their
    concatenation), as the 2 bytes to store at ``csum_start + csum_offset``.

    What a NIC does for NEEDS_CSUM (Linux ``skb_checksum_help``): the field
    holds the pseudo-header sum the sender seeded and the one's-complement sum
    runs from ``csum_start`` to the end of the frame. Reads the segments where
    they are (ring buffers), without gathering them.

    Raises:
        LocalProtocolError: the offsets are outside the frame (check the header first).
    """
    end = 0
    for seg in segments:
        end += len(memoryview(seg))
    where = csum_start + csum_offset
    if csum_start >= end or where + 2 > end:
        raise LocalProtocolError(f"checksum at {csum_start}+{csum_offset} outside {end} B")
    # The one's-complement sum of 16-bit words is their sum modulo 0xFFFF (2**16
    # is 1 modulo 0xFFFF), so a run of bytes read as one little-endian integer
    # sums its (little-endian) words in C; a run that starts at an odd offset
    # from csum_start is shifted by one byte. Byte order: the sum of
    # little-endian words, complemented and stored little-endian, is the
    # network-order checksum.
    total = 0
    pos = 0
    for seg in segments:
        mv = memoryview(seg)
        n = len(mv)
        if pos + n > csum_start:
            rel = pos - csum_start  # where this run starts, from csum_start
            part = mv[-rel:] if rel < 0 else mv
            value = int.from_bytes(part, "little")
            total += value << 8 if rel > 0 and rel & 1 else value
        pos += n
    # 0 is sent as 0xFFFF (the same value in one's complement; UDP reserves 0
    # for "no checksum", Linux CSUM_MANGLED_0). A sum that is 0 modulo 0xFFFF
    # (0 or 0xFFFF folded) complements to 0 and is sent as 0xFFFF too.
    csum = (~(total % 0xFFFF) & 0xFFFF) or 0xFFFF
    return csum.to_bytes(2, "little")


def splice_segments(
    segments: Sequence[memoryview], where: int, data: bytes
) -> list[memoryview | bytes]:
    """``segments`` with the bytes at ``where`` (in their concatenation) replaced
    by ``data``, as pieces to join: one copy of the frame, not two.

    Raises:
        LocalProtocolError: ``where + len(data)`` is beyond the segments.
    """
    out: list[memoryview | bytes] = []
    pos = 0
    lo, hi = where, where + len(data)
    for seg in segments:
        n = len(seg)
        a, b = pos, pos + n
        if b <= lo or a >= hi:
            out.append(seg)
        else:
            if a < lo:
                out.append(seg[: lo - a])
            if a <= lo:
                out.append(data)
            if b > hi:
                out.append(seg[hi - a :])
        pos = b
    if hi > pos:
        raise LocalProtocolError(f"{len(data)} B at {where} outside {pos} B")
    return out


def complete_checksum(frame: memoryview, csum_start: int, csum_offset: int) -> None:
    """Finish a partial checksum in place (what a NIC does for NEEDS_CSUM; see
    :func:`segments_checksum`). For a receiver that did not negotiate GUEST_CSUM.

    Raises:
        LocalProtocolError: the offsets are outside the frame (check the header first).
    """
    where = csum_start + csum_offset
    frame[where : where + 2] = segments_checksum((frame,), csum_start, csum_offset)


# --- config space --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NetConfigValues:
    """The fields of ``struct virtio_net_config`` we use."""

    mac: bytes
    status: int
    max_virtqueue_pairs: int
    mtu: int

    @property
    def link_up(self) -> bool:
        return bool(self.status & NetStatus.LINK_UP)


def build_config(mac: bytes, *, link_up: bool = True, mtu: int = 1500) -> bytes:
    """The 12-byte config space (one queue pair)."""
    if len(mac) != 6:
        raise LocalProtocolError(f"MAC of {len(mac)} bytes")
    status = NetStatus.LINK_UP if link_up else 0
    return NET_CONFIG_STRUCT.pack(mac, int(status), 1, mtu)


def parse_config(raw: bytes | memoryview) -> NetConfigValues:
    """Parse a config space the host wrote.

    Raises:
        RemoteProtocolError: shorter than 12 bytes.
    """
    if len(raw) < NET_CONFIG_STRUCT.size:
        raise RemoteProtocolError(
            f"net config space of {len(raw)} B, need {NET_CONFIG_STRUCT.size}", reason="config"
        )
    mac, status, pairs, mtu = NET_CONFIG_STRUCT.unpack_from(raw)
    return NetConfigValues(bytes(mac), status, pairs, mtu)


# --- Ethernet addresses -----------------------------------------------------------


def format_mac(mac: bytes | memoryview) -> str:
    return ":".join(f"{b:02x}" for b in bytes(mac))


def parse_mac(text: str) -> bytes:
    """``aa:bb:cc:dd:ee:ff`` -> 6 bytes.

    Raises:
        LocalProtocolError: not six colon-separated hex octets.
    """
    parts = text.split(":")
    try:
        if len(parts) != 6 or any(len(p) != 2 for p in parts):
            raise ValueError(text)
        return bytes(int(p, 16) for p in parts)
    except ValueError as e:
        raise LocalProtocolError(f"bad MAC address {text!r}") from e


def is_multicast(mac: bytes | memoryview) -> bool:
    """Group bit set (broadcast included)."""
    return bool(mac[0] & 1)


def random_mac(seed: bytes) -> bytes:
    """A locally administered unicast MAC derived from ``seed`` (stable per card/device)."""
    h = bytearray(hashlib.sha256(seed).digest()[:6])
    h[0] = (h[0] & 0xFC) | 0x02
    return bytes(h)
