"""virtio-blk's sans-IO part (virtio/blk.py): the request header, segments, status, config."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtio import blk as B
from virtio import layouts as L
from virtio.constants import BlkReqType, BlkStatus
from virtio.errors import RemoteProtocolError

ROOT = Path(__file__).resolve().parents[2]


def test_header_twin_matches_construct_golden_bytes() -> None:
    golden = bytes.fromhex("0d000000000000000807060504030201")
    assert L.BlkReqHeader.build({"type": 13, "sector": 0x0102030405060708}) == golden
    assert B.REQ_HEADER.pack(13, 0x0102030405060708) == golden
    assert B.REQ_HEADER_SIZE == L.BlkReqHeader.sizeof() == 16
    assert L.field_offset(L.BlkReqHeader, "sector") == 8


@given(
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**64 - 1),
)
def test_header_reserved_word_is_ignored_on_receipt(rtype: int, reserved: int, sector: int) -> None:
    raw = b"".join(
        (rtype.to_bytes(4, "little"), reserved.to_bytes(4, "little"), sector.to_bytes(8, "little"))
    )
    assert B.REQ_HEADER.unpack(raw) == (rtype, sector)
    parsed = L.BlkReqHeader.parse(raw)
    assert (parsed.type, parsed.sector) == (rtype, sector)


def test_segment_twin_matches_construct_golden_bytes() -> None:
    golden = bytes.fromhex("09000000000000000700000001000000")
    assert L.BlkDiscardWriteZeroes.build({"sector": 9, "num_sectors": 7, "flags": 1}) == golden
    assert B.SEGMENT.pack(9, 7, 1) == golden
    assert B.SEGMENT_SIZE == 16


def test_build_segments_one_per_range() -> None:
    raw = B.build_segments([(0, 8), (100, 3)], B.WRITE_ZEROES_FLAG_UNMAP)
    assert len(raw) == 2 * B.SEGMENT_SIZE
    assert [B.SEGMENT.unpack_from(raw, i * 16) for i in range(2)] == [(0, 8, 1), (100, 3, 1)]
    assert B.build_segments([]) == b""


@pytest.mark.parametrize(
    ("rtype", "flags", "ok"),
    [
        (BlkReqType.WRITE_ZEROES, 0, True),
        (BlkReqType.WRITE_ZEROES, B.WRITE_ZEROES_FLAG_UNMAP, True),
        (BlkReqType.WRITE_ZEROES, 2, False),  # reserved bit
        (BlkReqType.WRITE_ZEROES, 0x80000001, False),
        (BlkReqType.DISCARD, 0, True),
        (BlkReqType.DISCARD, B.WRITE_ZEROES_FLAG_UNMAP, False),  # unmap only on WRITE_ZEROES
        (BlkReqType.DISCARD, 4, False),
    ],
)
def test_segment_flags(rtype: int, flags: int, ok: bool) -> None:
    assert B.segment_flags_ok(rtype, flags) is ok


def test_status_names() -> None:
    assert [B.status_name(s) for s in BlkStatus] == ["OK", "IOERR", "UNSUPP"]
    assert B.status_name(7) == "7"
    assert B.STATUS_SIZE == 1
    assert B.ID_BYTES == 20


def test_config_parses_or_raises_the_remote_error() -> None:
    raw = bytearray(L.BlkConfig.sizeof())
    raw[0:8] = (1234).to_bytes(8, "little")
    assert B.parse_config(raw).capacity == 1234
    with pytest.raises(RemoteProtocolError, match="does not parse") as ei:
        B.parse_config(raw[:-1])
    assert ei.value.reason == "config"


@pytest.mark.parametrize(
    "path",
    [
        "mic_host/backends/block.py",
        "mic_card/drivers/block.py",
        "mic_host/backends/console.py",
        "mic_card/drivers/console.py",
    ],
)
def test_no_wire_struct_declared_outside_virtio(path: str) -> None:
    """The blk/console formats are declared in virtio only: no ``struct.Struct``
    and no construct layout in the backends and drivers that speak them."""
    tree = ast.parse((ROOT / path).read_text())
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "struct"
        ):
            pytest.fail(f"{path}:{node.lineno}: a struct format outside virtio")
        if isinstance(node, ast.ImportFrom) and node.module == "construct":
            pytest.fail(f"{path}:{node.lineno}: imports construct")
