"""The request/response layouts: construct declarations vs their struct twins."""

from __future__ import annotations

import pytest
from construct import ConstError

from mic_card.accel.wire import (
    ALG_NAMES,
    REQ_SIZE,
    REQ_STRUCT,
    RESP_OFF,
    RESP_SIZE,
    RESP_STRUCT,
    QueueGeometry,
    ReqHeader,
    RespHeader,
    alg_by_name,
)

REQ = {
    "op": 3, "alg": 19, "alg2": 0, "level": 6, "flags": 5, "key_len": 32, "iv_len": 12,
    "tag_len": 16, "stream_id": 0xDEAD,
    "src_addr": 0x1_0000_C000, "src_len": 4096, "dst_len": 4112, "dst_addr": 0x1_0001_0000,
    "aad_addr": 0x1_0002_0000, "aad_len": 20, "key": bytes(range(64)), "iv": bytes(range(16)),
}  # fmt: skip


def test_sizes() -> None:
    assert ReqHeader.sizeof() == REQ_SIZE == 136
    assert RespHeader.sizeof() == RESP_SIZE == 32


def test_request_struct_matches_construct() -> None:
    built = ReqHeader.build(REQ)
    packed = REQ_STRUCT.pack(
        1, REQ["op"], REQ["alg"], REQ["alg2"], REQ["level"], REQ["flags"], REQ["key_len"],
        REQ["iv_len"], REQ["tag_len"], REQ["stream_id"], REQ["src_addr"], REQ["src_len"],
        REQ["dst_len"], REQ["dst_addr"], REQ["aad_addr"], REQ["aad_len"], REQ["key"], REQ["iv"],
    )  # fmt: skip
    assert built == packed
    parsed = ReqHeader.parse(packed)
    for k, v in REQ.items():
        assert parsed[k] == v
    # golden bytes of the first 16 bytes
    assert packed[:16].hex() == "01031300060520" + "0c" + "10000000" + "adde0000"


def test_request_version_is_checked() -> None:
    bad = b"\x02" + ReqHeader.build(REQ)[1:]
    with pytest.raises(ConstError):
        ReqHeader.parse(bad)


def test_response_struct_matches_construct() -> None:
    d = {"status": 1, "consumed": 100, "produced": 200, "engine_us": 7, "detail": 0xABCDEF}
    assert RespHeader.build(d) == RESP_STRUCT.pack(1, 100, 200, 7, 0xABCDEF)


def test_geometry_is_disjoint_per_pasid() -> None:
    a, b = QueueGeometry(1, 1 << 20), QueueGeometry(2, 1 << 20)
    assert a.base + a.region_size <= b.base
    assert a.layout.desc == a.base + 4096
    assert a.slot_addr(0) >= a.layout.used + a.layout.used_bytes
    assert a.slot_addr(a.slots - 1) + RESP_OFF + RESP_SIZE <= a.heap_addr
    assert a.region_size % 4096 == 0


def test_alg_names_round_trip() -> None:
    for alg, name in ALG_NAMES.items():
        assert alg_by_name(name) is alg
    with pytest.raises(KeyError, match="known"):
        alg_by_name("rot13")


def test_shared_wire_module_is_core() -> None:
    """``virtio.accel`` is shared by host and card: no asyncio, no other layer."""
    from tests.virtio.test_layering import FORBIDDEN_PACKAGES, imported_by

    mods = imported_by("virtio.accel")
    assert "asyncio" not in mods
    assert not {m for m in mods if m.split(".")[0] in FORBIDDEN_PACKAGES}
