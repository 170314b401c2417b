"""Frames on scatter lists: the virtio-net header, copies between scatter lists, TAP offloads.

Small helpers every net backend module uses (the device core, the TAP
backend, the switch and its uplink): reading the 12-byte header that may span
descriptors, copying a frame from one scatter list into another in one pass,
setting ``num_buffers`` (§5.1.6.4), and the constants they share.

Bottom of ``mic_host.backends.net``: imports nothing of the package.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from transport.tap import Tap
from virtio.net import NET_HDR, NET_HDR_SIZE, NUM_BUFFERS, NUM_BUFFERS_OFFSET, Offloads
from virtio.split import Chain, gather_segments, scatter_segments

__all__ = [
    "IOV_MAX",
    "MAC_HDR",
    "NO_OFFLOADS",
    "VLAN",
    "address_of",
    "read_hdr",
    "scatter",
    "set_num_buffers",
    "set_tap_offloads",
]

VLAN = 4
MAC_HDR = NET_HDR_SIZE + 12  # header + destination + source MAC
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
NO_OFFLOADS = Offloads()


def read_hdr(views: Sequence[memoryview]) -> tuple[int, int, int, int, int, int, int]:
    """The 12-byte header at the start of a scatter list (it may span descriptors)."""
    v0 = views[0]
    if len(v0) >= NET_HDR_SIZE:
        hdr: tuple[int, int, int, int, int, int, int] = NET_HDR.unpack_from(v0)
        return hdr
    buf = bytearray(NET_HDR_SIZE)
    gather_segments(views, memoryview(buf))
    hdr = NET_HDR.unpack_from(buf)
    return hdr


def scatter(src: Sequence[memoryview], dst: Sequence[memoryview], total: int) -> int:
    """Copy ``total`` bytes from one scatter list into another in one pass (no
    joins); returns bytes copied (fewer when either list ends first)."""
    if len(src) == 1:
        return scatter_segments(dst, src[0][:total])
    di = doff = done = 0
    nd = len(dst)
    for seg in src:
        sn = min(len(seg), total - done)
        soff = 0
        while soff < sn:
            if di == nd:
                return done
            d = dst[di]
            take = min(sn - soff, len(d) - doff)
            d[doff : doff + take] = seg[soff : soff + take]
            soff += take
            done += take
            doff += take
            if doff == len(d):
                di += 1
                doff = 0
        if done == total:
            break
    return done


def set_num_buffers(chain: Chain, n: int) -> None:
    """§5.1.6.4: the device sets ``num_buffers`` in the first buffer's header
    (a TAP's read does not write it)."""
    w0 = chain.writable[0]
    if len(w0) >= NET_HDR_SIZE:
        NUM_BUFFERS.pack_into(w0, NUM_BUFFERS_OFFSET, n)
    else:
        chain.write(NUM_BUFFERS.pack(n), NUM_BUFFERS_OFFSET)


def address_of(cidr: str | None) -> str | None:
    return cidr.split("/", 1)[0] if cidr else None


def set_tap_offloads(tap: Tap, o: Offloads) -> None:
    tap.set_offloads(csum=o.csum, tso4=o.tso4, tso6=o.tso6, ecn=o.ecn)
