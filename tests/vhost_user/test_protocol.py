"""The vhost-user codec: construct declarations vs struct twins, and every refusal."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from transport.vhost_user import GuestMemory, MemRegion, Message, Request
from transport.vhost_user.protocol import (
    CONFIG_HDR,
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER,
    MEM_REGION,
    U64,
    VRING_ADDR,
    VRING_NOFD,
    VRING_STATE,
    ConfigLayout,
    HeaderLayout,
    MemoryTableLayout,
    MemRegionLayout,
    VringAddrLayout,
    VringStateLayout,
    check_fds,
    decode_config,
    decode_mem_table,
    decode_u64,
    decode_vring_addr,
    decode_vring_state,
    encode,
    encode_mem_table,
    parse_header,
)
from virtio.errors import LocalProtocolError, RemoteProtocolError
from virtio.memory import MemoryFault

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)


@given(u32, u32, u32)
def test_header_twin(request: int, flags: int, size: int) -> None:
    built = HeaderLayout.build({"request": request, "flags": flags, "size": size})
    assert built == HEADER.pack(request, flags, size)


@given(u32, u32)
def test_vring_state_twin(index: int, num: int) -> None:
    assert VringStateLayout.build({"index": index, "num": num}) == VRING_STATE.pack(index, num)


@given(u32, u32, u64, u64, u64, u64)
def test_vring_addr_twin(i: int, f: int, d: int, u: int, a: int, lg: int) -> None:
    value = {
        "index": i,
        "flags": f,
        "desc_user_addr": d,
        "used_user_addr": u,
        "avail_user_addr": a,
        "log_guest_addr": lg,
    }
    raw = VRING_ADDR.pack(i, f, d, u, a, lg)
    assert VringAddrLayout.build(value) == raw
    msg = Message(Request.SET_VRING_ADDR, 1, raw)
    got = decode_vring_addr(msg)
    assert (got.desc, got.used, got.avail) == (d, u, a)


@given(
    st.lists(
        st.tuples(u64, st.integers(1, 2**32), u64, st.integers(0, 2**32)), min_size=1, max_size=8
    )
)
def test_mem_table_twin(regions: list[tuple[int, int, int, int]]) -> None:
    regs = [MemRegion(g % 2**48, n, u % 2**48, o) for g, n, u, o in regions]
    raw = encode_mem_table(regs)
    value = {
        "nregions": len(regs),
        "regions": [
            {
                "guest_phys_addr": r.guest_phys_addr,
                "memory_size": r.memory_size,
                "userspace_addr": r.userspace_addr,
                "mmap_offset": r.mmap_offset,
            }
            for r in regs
        ],
    }
    assert MemoryTableLayout.build(value) == raw
    assert MemRegionLayout.sizeof() == MEM_REGION.size == 32
    assert decode_mem_table(Message(Request.SET_MEM_TABLE, 1, raw, [0] * len(regs))) == regs


def test_config_twin() -> None:
    raw = CONFIG_HDR.pack(4, 3, 0) + b"abc"
    assert ConfigLayout.build({"offset": 4, "size": 3, "flags": 0, "payload": b"abc"}) == raw
    assert decode_config(Message(Request.SET_CONFIG, 1, raw), with_payload=True) == (
        4,
        3,
        0,
        b"abc",
    )


def test_encode_and_parse_header() -> None:
    raw = encode(Request.GET_FEATURES, U64.pack(5), reply=True)
    assert parse_header(raw[:12], expect_reply=True) == (Request.GET_FEATURES, 1 | FLAG_REPLY, 8)
    raw = encode(Request.SET_OWNER, need_reply=True)
    assert parse_header(raw) == (Request.SET_OWNER, 1 | FLAG_NEED_REPLY, 0)
    with pytest.raises(LocalProtocolError):
        encode(Request.SET_CONFIG, bytes(5000))


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"\1\0\0\0", "truncated"),
        (HEADER.pack(1, 0, 0), "version 0"),
        (HEADER.pack(1, 1 | FLAG_REPLY, 0), "a reply out of turn"),
        (HEADER.pack(2, 1, 100000), "exceeds"),
        (HEADER.pack(99, 1, 100000), "request 99"),
    ],
)
def test_bad_headers(raw: bytes, words: str) -> None:
    with pytest.raises(RemoteProtocolError, match=words):
        parse_header(raw)


@pytest.mark.parametrize(
    ("request_", "payload", "nfds", "ok"),
    [
        (Request.SET_MEM_TABLE, encode_mem_table([MemRegion(0, 4096, 0, 0)]), 1, True),
        (Request.SET_MEM_TABLE, encode_mem_table([MemRegion(0, 4096, 0, 0)]), 0, False),
        (Request.SET_MEM_TABLE, encode_mem_table([MemRegion(0, 4096, 0, 0)]), 2, False),
        (Request.SET_VRING_KICK, U64.pack(0), 1, True),
        (Request.SET_VRING_KICK, U64.pack(0), 0, False),
        (Request.SET_VRING_KICK, U64.pack(VRING_NOFD), 0, True),
        (Request.SET_VRING_CALL, U64.pack(VRING_NOFD), 1, False),
        (Request.GET_FEATURES, b"", 1, False),
        (Request.SET_INFLIGHT_FD, b"", 0, False),
    ],
)
def test_fd_counts(request_: int, payload: bytes, nfds: int, ok: bool) -> None:
    msg = Message(request_, 1, payload, [-1] * nfds)
    if ok:
        check_fds(msg)
    else:
        with pytest.raises(RemoteProtocolError, match="file descriptors"):
            check_fds(msg)


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        (struct.pack("=I4x", 0), "0 regions"),
        (struct.pack("=I4x", 9), "9 regions"),
        (struct.pack("=I4x", 2) + MEM_REGION.pack(0, 1, 0, 0), "expected 72"),
        (encode_mem_table([MemRegion(0, 1, 0, 0)])[:-1], "expected 40"),
        (b"\1\0", "expected 8"),
        (struct.pack("=I4x", 1) + MEM_REGION.pack(0, 0, 0, 0), "zero-sized"),
        (struct.pack("=I4x", 1) + MEM_REGION.pack(2**64 - 4096, 8192, 0, 0), "overflows"),
    ],
)
def test_bad_memory_tables(payload: bytes, words: str) -> None:
    with pytest.raises(RemoteProtocolError, match=words):
        decode_mem_table(Message(Request.SET_MEM_TABLE, 1, payload))


def test_payload_sizes_are_exact() -> None:
    for decode, size in ((decode_u64, 8), (decode_vring_state, 8), (decode_vring_addr, 40)):
        for n in (0, size - 1, size + 1):
            with pytest.raises(RemoteProtocolError, match=f"expected {size} B"):
                decode(Message(Request.SET_VRING_NUM, 1, bytes(n)))  # type: ignore[operator]
    with pytest.raises(RemoteProtocolError, match="config size"):
        decode_config(
            Message(Request.GET_CONFIG, 1, CONFIG_HDR.pack(0, 1000, 0)), with_payload=False
        )


def _memfd(size: int) -> int:
    fd = os.memfd_create("vu-test")
    os.ftruncate(fd, size)
    return fd


def test_guest_memory_checks_every_access() -> None:
    fds = [_memfd(3 * 4096), _memfd(4096)]
    try:
        regions = [
            MemRegion(0x10000, 8192, 0x7F0000000000, 4096),  # mmap_offset into the fd
            MemRegion(0x40000, 4096, 0x7F0000100000, 0),
        ]
        mem = GuestMemory.map(regions, fds)
        mem.view(0x10000, 8192, True)[:4] = b"abcd"
        assert os.pread(fds[0], 4, 4096) == b"abcd"  # shared with the front-end's fd
        assert bytes(mem.view(0x40000, 4)) == bytes(4)
        for addr, n in ((0x10000, 8193), (0xFFFF, 2), (0x12000, 1), (0x30000, 1), (0x40FFF, 2)):
            with pytest.raises(MemoryFault):
                mem.view(addr, n)
        assert mem.uva_to_gpa(0x7F0000000010, 16, "ring") == 0x10010
        with pytest.raises(RemoteProtocolError, match="outside the mapped regions"):
            mem.uva_to_gpa(0x7F0000001FF0, 32, "ring")  # crosses the region's end
        mem.close()
    finally:
        for fd in fds:
            os.close(fd)


@pytest.mark.parametrize(
    ("regions", "words"),
    [
        ([MemRegion(0, 8192, 0, 0), MemRegion(4096, 4096, 1 << 30, 0)], "overlap in guest"),
        ([MemRegion(0, 4096, 0, 0), MemRegion(1 << 30, 4096, 2048, 0)], "overlap in user"),
        ([MemRegion(0, 0, 0, 0), MemRegion(1 << 30, 4096, 1 << 30, 0)], "zero-sized"),
        ([MemRegion(0, 4096, 0, 8192), MemRegion(1 << 30, 4096, 1 << 30, 0)], "needs 12288 B"),
    ],
)
def test_guest_memory_refuses_bad_tables(regions: list[MemRegion], words: str) -> None:
    fds = [_memfd(8192), _memfd(8192)]
    try:
        with pytest.raises(RemoteProtocolError, match=words):
            GuestMemory.map(regions, fds)
    finally:
        for fd in fds:
            os.close(fd)


def test_guest_memory_refuses_a_non_memory_fd() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(RemoteProtocolError, match="not a memory file"):
            GuestMemory.map([MemRegion(0, 4096, 0, 0)], [r])
    finally:
        os.close(r)
        os.close(w)
