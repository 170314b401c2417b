"""virtio-net's sans-IO part (virtio/net.py): header checks, offloads, checksums, config."""

from __future__ import annotations

import contextlib
import itertools
import os
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtio import layouts as L
from virtio import net as N
from virtio.constants import NetFeature, NetHdrFlag, NetHdrGso
from virtio.errors import LocalProtocolError, RemoteProtocolError

ALL = N.Offloads(csum=True, tso4=True, tso6=True, ecn=True)
NONE = N.Offloads()


def hdr(
    flags: int = 0, gso: int = 0, hdr_len: int = 0, gso_size: int = 0, start: int = 0, off: int = 0
) -> tuple[int, int, int, int, int, int, int]:
    return N.NET_HDR.unpack(N.NET_HDR.pack(flags, gso, hdr_len, gso_size, start, off, 1))


def test_config_round_trip_matches_construct() -> None:
    raw = N.build_config(b"\x02\x00\x00\x00\x00\x01", link_up=True, mtu=9000)
    parsed = L.NetConfig.parse(raw)
    assert parsed.mac == b"\x02\x00\x00\x00\x00\x01"
    assert parsed.mtu == 9000
    assert parsed.status == 1
    assert parsed.max_virtqueue_pairs == 1
    values = N.parse_config(raw)
    assert values.link_up
    assert values.mtu == 9000
    assert not N.parse_config(N.build_config(b"\x02" * 6, link_up=False)).link_up


def test_config_rejects_short_space_and_bad_mac() -> None:
    with pytest.raises(RemoteProtocolError):
        N.parse_config(b"\x00" * 11)
    with pytest.raises(LocalProtocolError):
        N.build_config(b"\x00" * 5)


def test_offloads_follow_the_feature_bits() -> None:
    f = NetFeature.GUEST_CSUM | NetFeature.GUEST_TSO4 | NetFeature.HOST_TSO6
    assert N.guest_offloads(f) == N.Offloads(csum=True, tso4=True)
    assert N.host_offloads(f) == N.Offloads(tso6=True)
    assert N.host_offloads(N.DEVICE_FEATURES) == ALL
    assert N.guest_offloads(N.DEVICE_FEATURES) == ALL


def test_good_headers_pass() -> None:
    N.check_header(hdr(), 60, NONE)
    N.check_header(hdr(), 1514, NONE)
    N.check_header(hdr(NetHdrFlag.NEEDS_CSUM, 0, 0, 0, 34, 16), 100, ALL)
    N.check_header(hdr(NetHdrFlag.NEEDS_CSUM, NetHdrGso.TCPV4, 54, 1448, 34, 16), 65000, ALL)
    N.check_header(hdr(NetHdrFlag.DATA_VALID), 100, NONE, from_driver=False)


@pytest.mark.parametrize(
    ("header", "length", "accepts", "reason"),
    [
        (hdr(), 13, ALL, "runt"),
        (hdr(), 1519, ALL, "oversize"),
        (hdr(NetHdrFlag.DATA_VALID), 100, ALL, "bad_header"),  # driver must not set it
        (hdr(0x80), 100, ALL, "bad_header"),
        (hdr(NetHdrFlag.NEEDS_CSUM, 0, 0, 0, 90, 16), 100, ALL, "bad_header"),
        (hdr(NetHdrFlag.NEEDS_CSUM, 0, 0, 0, 34, 16), 100, NONE, "offload"),
        (hdr(0, NetHdrGso.TCPV4, 54, 1448), 9000, NONE, "offload"),
        (hdr(0, NetHdrGso.TCPV6, 54, 1448), 9000, N.Offloads(csum=True, tso4=True), "offload"),
        (hdr(0, NetHdrGso.TCPV4 | NetHdrGso.ECN, 54, 1448), 9000, N.Offloads(tso4=True), "offload"),
        (hdr(0, NetHdrGso.UDP, 42, 1400), 9000, ALL, "bad_header"),
        (hdr(0, 7, 42, 1400), 9000, ALL, "bad_header"),
        (hdr(0, NetHdrGso.TCPV4, 54, 0), 9000, ALL, "bad_header"),
        (hdr(0, NetHdrGso.TCPV4, 54, 1448), N.MAX_FRAME + 1, ALL, "oversize"),
    ],
)
def test_bad_headers_name_their_counter(
    header: tuple[int, int, int, int, int, int, int], length: int, accepts: N.Offloads, reason: str
) -> None:
    with pytest.raises(N.FrameError) as info:
        N.check_header(header, length, accepts)
    assert info.value.reason == reason


@given(st.binary(min_size=12, max_size=12), st.integers(0, 70000))
def test_any_header_bytes_pass_or_raise_frame_error(raw: bytes, length: int) -> None:
    with contextlib.suppress(N.FrameError):
        N.check_header(N.NET_HDR.unpack(raw), length, ALL, from_driver=False)


def _reference_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f">{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return (~total & 0xFFFF) or 0xFFFF


@pytest.mark.parametrize("length", [60, 61, 1514, 65000, 65001])
def test_complete_checksum_matches_the_rfc1071_sum(length: int) -> None:
    frame = bytearray(os.urandom(length))
    original = bytes(frame)
    start, off = 34, 16
    expected = _reference_checksum(bytes(frame[start:]))
    N.complete_checksum(memoryview(frame), start, off)
    assert int.from_bytes(frame[start + off : start + off + 2], "big") == expected
    # A receiver verifies: the finished segment plus the seed sums to 0xffff.
    seed = int.from_bytes(bytes(original[start + off : start + off + 2]), "big")
    check = (~_reference_checksum(bytes(frame[start:])) & 0xFFFF) + seed
    assert (check & 0xFFFF) + (check >> 16) == 0xFFFF


@given(
    st.binary(min_size=2, max_size=400),
    st.data(),
)
def test_segments_checksum_sums_scattered_frames_in_place(
    frame: bytes, data: st.DataObject
) -> None:
    # Any cut of the frame into segments (odd and even boundaries, empty ones)
    # gives the checksum of the whole; the segments are only read.
    start = data.draw(st.integers(0, len(frame) - 2))
    off = data.draw(st.integers(0, len(frame) - start - 2))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(frame)), max_size=6)))
    bounds = [0, *cuts, len(frame)]
    segs = [memoryview(frame)[a:b] for a, b in itertools.pairwise(bounds)]
    got = N.segments_checksum(segs, start, off)
    assert int.from_bytes(got, "big") == _reference_checksum(frame[start:])
    pieces = N.splice_segments(segs, start + off, got)
    spliced = b"".join(pieces)
    assert spliced == frame[: start + off] + got + frame[start + off + 2 :]
    whole = bytearray(frame)
    N.complete_checksum(memoryview(whole), start, off)
    assert bytes(whole) == spliced


def test_segments_checksum_of_zeros_is_sent_as_ffff() -> None:
    assert N.segments_checksum([bytes(10), bytes(7)], 0, 4) == b"\xff\xff"
    with pytest.raises(LocalProtocolError):
        N.segments_checksum([bytes(10), bytes(7)], 10, 6)
    with pytest.raises(LocalProtocolError):
        N.splice_segments([memoryview(bytes(4))], 3, b"ab")


def test_complete_checksum_refuses_offsets_outside_the_frame() -> None:
    with pytest.raises(LocalProtocolError):
        N.complete_checksum(memoryview(bytearray(40)), 34, 16)


def test_mac_helpers() -> None:
    mac = N.parse_mac("02:AB:cd:00:11:ff")
    assert N.format_mac(mac) == "02:ab:cd:00:11:ff"
    assert not N.is_multicast(mac)
    assert N.is_multicast(N.BROADCAST)
    for bad in ("02:ab", "zz:00:00:00:00:00", "0200:00:00:00:00:00", ""):
        with pytest.raises(LocalProtocolError):
            N.parse_mac(bad)
    a, b = N.random_mac(b"mic0/net0"), N.random_mac(b"mic1/net0")
    assert a != b
    assert a == N.random_mac(b"mic0/net0")
    assert a[0] & 0x02
    assert not a[0] & 0x01
