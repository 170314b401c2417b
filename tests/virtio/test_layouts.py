"""virtio.layouts: sizes against the C/spec sizes, golden bytes, the MIC device page."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtio import blk as B
from virtio import console as C
from virtio import layouts as L
from virtio import net as N
from virtio.constants import (
    MIC_DP_SIZE,
    MIC_MAGIC,
    VRING_SIZE_MAX,
    BlkReqType,
    ConsoleEvent,
    DescFlag,
    DeviceStatus,
    DeviceType,
    Feature,
    PackedDescFlag,
)
from virtio.errors import LocalProtocolError, RemoteProtocolError

# --- sizes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layout", "size"),
    [
        (L.SplitDesc, 16),
        (L.UsedElem, 8),
        (L.split_avail(8), 6 + 16),
        (L.split_used(8), 6 + 64),
        (L.PackedDesc, 16),
        (L.PackedEvent, 4),
        (L.BlkReqHeader, 16),
        (L.BlkDiscardWriteZeroes, 16),
        (L.BlkConfig, 60),
        (L.NetHdrLegacy, 10),
        (L.NetHdr, 12),
        (L.NetConfig, 12),
        (L.ConsoleConfig, 12),
        (L.ConsoleControl, 8),
        (L.ConsoleResize, 4),
        (L.MicBootparam, 24),
        (L.MicDeviceDesc, 8),
        (L.MicVqconfig, 24),
        (L.MicDeviceCtrl, 16),
        (L.MicVringInfo, 8),
    ],
)
def test_sizeof(layout: Any, size: int) -> None:
    assert layout.sizeof() == size


@pytest.mark.parametrize(
    ("twin", "layout"),
    [
        (L.SPLIT_DESC_STRUCT, L.SplitDesc),
        (L.USED_ELEM_STRUCT, L.UsedElem),
        (L.PACKED_DESC_STRUCT, L.PackedDesc),
        (L.PACKED_EVENT_STRUCT, L.PackedEvent),
        (N.NET_HDR, L.NetHdr),
        (B.SEGMENT, L.BlkDiscardWriteZeroes),
        (C.CONTROL, L.ConsoleControl),
        (C.RESIZE, L.ConsoleResize),
    ],
)
def test_hot_path_structs_match_construct(twin: struct.Struct, layout: Any) -> None:
    assert twin.size == layout.sizeof()
    values = tuple(range(1, len(layout.subcons) + 1))
    data = twin.pack(*values)
    parsed = layout.parse(data)
    assert tuple(parsed[sub.name] for sub in layout.subcons) == values
    assert layout.build(parsed) == data


def test_field_offsets_follow_c_layout() -> None:
    assert L.field_offset(L.SplitDesc, "flags") == 12
    assert L.field_offset(L.MicDeviceDesc, "status") == 4
    assert L.field_offset(L.MicVqconfig, "num") == 16
    assert L.field_offset(L.MicDeviceCtrl, "config_change") == 8
    assert L.field_offset(L.MicDeviceCtrl, "used_address_updated") == 12
    assert L.field_offset(L.MicDeviceCtrl, "h2c_vdev_db") == 14
    assert L.field_offset(L.MicVringInfo, "magic") == 4
    assert L.field_offset(L.BlkConfig, "blk_size") == 20
    assert L.field_offset(L.BlkConfig, "num_queues") == 34
    assert L.field_offset(L.BlkConfig, "write_zeroes_may_unmap") == 56
    with pytest.raises(LocalProtocolError):
        L.field_offset(L.SplitDesc, "nope")


# --- golden bytes ----------------------------------------------------------------

GOLDEN: list[tuple[str, Any, bytes, dict[str, Any]]] = [
    (
        "split-desc",
        L.SplitDesc,
        struct.pack("<QIHH", 0x1122334455667788, 4096, DescFlag.NEXT | DescFlag.WRITE, 7),
        {"addr": 0x1122334455667788, "len": 4096, "flags": 3, "next": 7},
    ),
    (
        "used-elem",
        L.UsedElem,
        struct.pack("<II", 5, 0xDEADBEEF),
        {"id": 5, "len": 0xDEADBEEF},
    ),
    (
        "avail-4",
        L.split_avail(4),
        struct.pack("<HH4HH", 1, 0xFFFF, 0, 3, 2, 1, 9),
        {"flags": 1, "idx": 0xFFFF, "ring": [0, 3, 2, 1], "used_event": 9},
    ),
    (
        "used-2",
        L.split_used(2),
        struct.pack("<HHIIIIH", 0, 2, 1, 10, 0, 20, 3),
        {
            "flags": 0,
            "idx": 2,
            "ring": [{"id": 1, "len": 10}, {"id": 0, "len": 20}],
            "avail_event": 3,
        },
    ),
    (
        "packed-desc",
        L.PackedDesc,
        struct.pack("<QIHH", 0xABC000, 512, 9, PackedDescFlag.AVAIL | PackedDescFlag.WRITE),
        {"addr": 0xABC000, "len": 512, "id": 9, "flags": 0x82},
    ),
    (
        "packed-event",
        L.PackedEvent,
        struct.pack("<HH", 0x8000 | 17, 2),
        {"off_wrap": 0x8011, "flags": 2},
    ),
    (
        "blk-header",
        L.BlkReqHeader,
        struct.pack("<IIQ", BlkReqType.OUT, 0, 0x123456789A),
        {"type": 1, "sector": 0x123456789A},
    ),
    (
        "blk-discard",
        L.BlkDiscardWriteZeroes,
        struct.pack("<QII", 2048, 64, 1),
        {"sector": 2048, "num_sectors": 64, "flags": 1},
    ),
    (
        "blk-config",
        L.BlkConfig,
        struct.pack(
            "<QIIHBBIBBHIBxHIIIIIB3x",
            2**33 + 5,
            65536,
            126,
            1024,
            16,
            63,
            4096,
            3,
            1,
            8,
            4096 * 64,
            1,
            4,
            0xFFFF,
            254,
            8,
            0x3FFFFF,
            16,
            1,
        ),
        {
            "capacity": 2**33 + 5,
            "size_max": 65536,
            "seg_max": 126,
            "geometry": {"cylinders": 1024, "heads": 16, "sectors": 63},
            "blk_size": 4096,
            "topology": {
                "physical_block_exp": 3,
                "alignment_offset": 1,
                "min_io_size": 8,
                "opt_io_size": 4096 * 64,
            },
            "writeback": 1,
            "num_queues": 4,
            "max_discard_sectors": 0xFFFF,
            "max_discard_seg": 254,
            "discard_sector_alignment": 8,
            "max_write_zeroes_sectors": 0x3FFFFF,
            "max_write_zeroes_seg": 16,
            "write_zeroes_may_unmap": 1,
        },
    ),
    (
        "net-hdr-legacy",
        L.NetHdrLegacy,
        struct.pack("<BBHHHH", 1, 1, 54, 1448, 34, 16),
        {
            "flags": 1,
            "gso_type": 1,
            "hdr_len": 54,
            "gso_size": 1448,
            "csum_start": 34,
            "csum_offset": 16,
        },
    ),
    (
        "net-hdr",
        L.NetHdr,
        struct.pack("<BBHHHHH", 2, 0x84, 1, 2, 3, 4, 5),
        {
            "flags": 2,
            "gso_type": 0x84,
            "hdr_len": 1,
            "gso_size": 2,
            "csum_start": 3,
            "csum_offset": 4,
            "num_buffers": 5,
        },
    ),
    (
        "net-config",
        L.NetConfig,
        struct.pack("<6sHHH", bytes.fromhex("525400123456"), 1, 4, 9000),
        {"mac": bytes.fromhex("525400123456"), "status": 1, "max_virtqueue_pairs": 4, "mtu": 9000},
    ),
    (
        "console-config",
        L.ConsoleConfig,
        struct.pack("<HHII", 80, 25, 31, 0x41),
        {"cols": 80, "rows": 25, "max_nr_ports": 31, "emerg_wr": 0x41},
    ),
    (
        "console-control",
        L.ConsoleControl,
        struct.pack("<IHH", 3, ConsoleEvent.PORT_OPEN, 1),
        {"id": 3, "event": 6, "value": 1},
    ),
    (
        "console-resize",
        L.ConsoleResize,
        struct.pack("<HH", 50, 132),
        {"rows": 50, "cols": 132},
    ),
    (
        "bootparam",
        L.MicBootparam,
        struct.pack("<IbBBBQQ", MIC_MAGIC, -1, 2, 7, 9, 0x1000, 0x2000),
        {
            "h2c_config_db": -1,
            "node_id": 2,
            "h2c_scif_db": 7,
            "c2h_scif_db": 9,
            "scif_host_dma_addr": 0x1000,
            "scif_card_dma_addr": 0x2000,
        },
    ),
    (
        "device-desc",
        L.MicDeviceDesc,
        struct.pack("<bBBBB3x", DeviceType.CONSOLE, 2, 4, 12, DeviceStatus.DRIVER_OK),
        {"type": 3, "num_vq": 2, "feature_len": 4, "config_len": 12, "status": 4},
    ),
    (
        "vqconfig",
        L.MicVqconfig,
        struct.pack("<QQH6x", 0x80_0000_1000, 0x4000_0000, 128),
        {"address": 0x80_0000_1000, "used_address": 0x4000_0000, "num": 128},
    ),
    (
        "device-ctrl",
        L.MicDeviceCtrl,
        struct.pack("<QBBBBBbbx", 0xFFFF_8800_0000_0000, 2, 1, 1, 0, 1, 3, -1),
        {
            "vdev": 0xFFFF_8800_0000_0000,
            "config_change": 2,
            "vdev_reset": 1,
            "guest_ack": 1,
            "host_ack": 0,
            "used_address_updated": 1,
            "c2h_vdev_db": 3,
            "h2c_vdev_db": -1,
        },
    ),
    (
        "vring-info",
        L.MicVringInfo,
        struct.pack("<H2xI", 300, MIC_MAGIC + 3 + 1),
        {"avail_idx": 300, "magic": MIC_MAGIC + 4},
    ),
]


def _assert_fields(parsed: Any, expected: dict[str, Any]) -> None:
    for name, value in expected.items():
        if isinstance(value, dict):
            _assert_fields(parsed[name], value)
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            assert len(parsed[name]) == len(value)
            for got, want in zip(parsed[name], value, strict=True):
                _assert_fields(got, want)
        else:
            assert parsed[name] == value, name


@pytest.mark.parametrize(
    ("layout", "data", "fields"),
    [pytest.param(layout, data, fields, id=name) for name, layout, data, fields in GOLDEN],
)
def test_golden_round_trip(layout: Any, data: bytes, fields: dict[str, Any]) -> None:
    assert len(data) == layout.sizeof()
    parsed = layout.parse(data)
    _assert_fields(parsed, fields)
    assert layout.build(parsed) == data
    assert layout.build(fields) == data


def test_bootparam_magic_is_const() -> None:
    bad = struct.pack("<IbBBBQQ", MIC_MAGIC ^ 1, -1, 0, 0, 0, 0, 0)
    with pytest.raises(RemoteProtocolError) as info:
        L.parse_bootparam(bad)
    assert info.value.reason == "device-page"
    assert info.value.__cause__ is not None
    with pytest.raises(RemoteProtocolError):
        L.parse_bootparam(b"\x00\xee\xff\xc0")


def test_bootparam_value_round_trip() -> None:
    boot = L.BootParam(h2c_config_db=5, node_id=1, scif_host_dma_addr=0xABC)
    data = boot.build()
    assert data == struct.pack("<IbBBBQQ", MIC_MAGIC, 5, 1, 0, 0, 0xABC, 0)
    assert L.parse_bootparam(data) == boot
    with pytest.raises(LocalProtocolError):
        L.BootParam(node_id=256).build()


# --- legacy vring layout ---------------------------------------------------------


@pytest.mark.parametrize("num", [1, 3, 128, 256, 32768])
def test_vring_arithmetic_matches_the_construct_layouts(num: int) -> None:
    _, avail, used = L.vring_offsets(num, 4096)
    assert avail == L.SplitDesc.sizeof() * num
    assert used == (avail + L.split_avail(num).sizeof() + 4095) & ~4095
    assert L.vring_size(num, 4096) == used + L.split_used(num).sizeof()


def test_vring_size_matches_linux() -> None:
    # desc 2048 + avail 6+256 = 2310 -> used at 4096, + 6+1024 = 5126
    assert L.vring_size(128, 4096) == 5126
    assert L.vring_offsets(128, 4096) == (0, 2048, 4096)
    # Linux vring_size(256, 4096): 4096 + 518 -> 8192, + 6 + 2048
    assert L.vring_size(256, 4096) == 8192 + 2054
    # tiny alignment packs the used ring right after avail (rounded to 4)
    assert L.vring_offsets(4, 4) == (0, 64, 64 + 16)
    assert L.vring_size(4, 4) == 80 + 6 + 32


@pytest.mark.parametrize(("num", "align"), [(0, 4096), (32769, 4096), (8, 0), (8, 3000)])
def test_vring_size_rejects_bad_arguments(num: int, align: int) -> None:
    with pytest.raises(LocalProtocolError):
        L.vring_size(num, align)


@pytest.mark.parametrize("size", [0, VRING_SIZE_MAX + 1])
def test_split_ring_rejects_bad_size(size: int) -> None:
    with pytest.raises(LocalProtocolError):
        L.split_avail(size)
    with pytest.raises(LocalProtocolError):
        L.split_used(size)


# --- device page -----------------------------------------------------------------

CONSOLE_FEATURES = 0x1  # VIRTIO_CONSOLE_F_SIZE
CONSOLE_CONFIG = struct.pack("<HHII", 80, 25, 1, 0)


def _console_entry() -> L.DeviceEntry:
    return L.DeviceEntry(
        type=DeviceType.CONSOLE,
        num_vq=2,
        feature_len=4,
        config_len=12,
        vqconfigs=((0x1000, 0, 128), (0x3000, 0, 128)),
        config=CONSOLE_CONFIG,
        host_features=CONSOLE_FEATURES,
        c2h_vdev_db=2,
    )


def _block_entry() -> L.DeviceEntry:
    config = L.BlkConfig.build(
        {
            "capacity": 2048,
            "size_max": 0,
            "seg_max": 126,
            "geometry": {"cylinders": 0, "heads": 0, "sectors": 0},
            "blk_size": 512,
            "topology": {
                "physical_block_exp": 0,
                "alignment_offset": 0,
                "min_io_size": 0,
                "opt_io_size": 0,
            },
            "writeback": 0,
            "num_queues": 1,
            "max_discard_sectors": 0,
            "max_discard_seg": 0,
            "discard_sector_alignment": 0,
            "max_write_zeroes_sectors": 0,
            "max_write_zeroes_seg": 0,
            "write_zeroes_may_unmap": 0,
        }
    )
    return L.DeviceEntry(
        type=DeviceType.BLOCK,
        num_vq=1,
        feature_len=8,
        config_len=60,
        vqconfigs=((0x5000, 0x9000, 128),),
        config=config,
        status=DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER,
        host_features=int(Feature.VERSION_1) | (1 << 2),
        guest_acks=int(Feature.VERSION_1),
    )


def test_entry_offsets_match_linux_helpers() -> None:
    # console, 2 vqs, feature_len 4, config_len 12: 8 + 48 + 4 + 4 + 12 = 76
    assert L.mic_desc_size(2, 4, 12) == 76
    assert L.mic_aligned_desc_size(2, 4, 12) == 80
    assert L.mic_device_ctrl(2, 4, 12) == 80
    assert L.mic_total_desc_size(2, 4, 12) == 96
    assert L.entry_size(2, 4, 12) == 96
    assert L.mic_vq_config() == 8
    assert L.mic_vq_config(1) == 32
    assert L.mic_vq_features(2) == 56
    assert L.mic_guest_acks(2, 4) == 60
    assert L.mic_vq_configspace(2, 4) == 64
    # block, 1 vq, feature_len 8, config_len 60: 8 + 24 + 16 + 60 = 108 -> 112 + 16
    assert L.entry_size(1, 8, 60) == 128


def test_device_page_parsed_at_linux_offsets() -> None:
    console, block = _console_entry(), _block_entry()
    boot = L.BootParam(h2c_config_db=1, node_id=1)
    page = L.build_device_page(boot, [console, block])
    assert len(page) == MIC_DP_SIZE

    # bootparam at 0
    assert struct.unpack_from("<IbBBBQQ", page, 0) == (MIC_MAGIC, 1, 1, 0, 0, 0, 0)
    # console entry at 24
    c = 24
    assert struct.unpack_from("<bBBBB", page, c) == (3, 2, 4, 12, 0)
    assert page[c + 5 : c + 8] == b"\0\0\0"
    assert struct.unpack_from("<QQH", page, c + 8) == (0x1000, 0, 128)
    assert struct.unpack_from("<QQH", page, c + 32) == (0x3000, 0, 128)
    assert struct.unpack_from("<II", page, c + 56) == (CONSOLE_FEATURES, 0)
    assert page[c + 64 : c + 76] == CONSOLE_CONFIG
    assert page[c + 76 : c + 80] == b"\0" * 4  # pad to 8
    assert struct.unpack_from("<QBBBBBbb", page, c + 80) == (0, 0, 0, 0, 0, 0, 2, -1)
    # block entry right after: 24 + 96 = 120
    b = c + 96
    assert struct.unpack_from("<bBBBB", page, b) == (2, 1, 8, 60, 3)
    assert struct.unpack_from("<QQH", page, b + 8) == (0x5000, 0x9000, 128)
    assert struct.unpack_from("<QQ", page, b + 32) == ((1 << 32) | 4, 1 << 32)
    assert page[b + 48 : b + 108] == block.config
    assert struct.unpack_from("<Q", page, b + 48)[0] == 2048  # capacity
    assert struct.unpack_from("<QBBBBBbb", page, b + 112) == (0, 0, 0, 0, 0, 0, -1, -1)
    # end of list
    assert page[b + 128] == 0

    entries = list(L.iter_device_page(page))
    assert [off for off, _ in entries] == [24, 120]
    assert entries[0][1] == console
    assert entries[1][1] == block
    assert entries[0][1].ctrl_offset == 80
    assert not entries[0][1].removed
    assert L.parse_bootparam(page) == boot


def test_entry_build_golden() -> None:
    data = _console_entry().build()
    expected = (
        struct.pack("<bBBBB3x", 3, 2, 4, 12, 0)
        + struct.pack("<QQH6x", 0x1000, 0, 128)
        + struct.pack("<QQH6x", 0x3000, 0, 128)
        + struct.pack("<II", 1, 0)
        + CONSOLE_CONFIG
        + bytes(4)
        + struct.pack("<QBBBBBbbx", 0, 0, 0, 0, 0, 0, 2, -1)
    )
    assert data == expected
    assert L.DeviceEntry.parse(expected) == _console_entry()
    assert L.DeviceEntry.parse(b"xx" + expected, 2) == _console_entry()


def test_removed_slot_is_yielded_and_skipped_by_its_size() -> None:
    removed = L.DeviceEntry(
        type=DeviceType.REMOVED,
        num_vq=1,
        feature_len=4,
        config_len=0,
        vqconfigs=((0, 0, 0),),
        config=b"",
    )
    page = L.build_device_page(L.BootParam(), [removed, _console_entry()])
    entries = list(L.iter_device_page(page))
    assert [off for off, _ in entries] == [24, 24 + removed.size]
    assert entries[0][1].removed
    assert entries[1][1].type == DeviceType.CONSOLE


def test_empty_and_full_pages() -> None:
    assert list(L.iter_device_page(L.build_device_page(L.BootParam(), []))) == []
    # 42 console entries of 96 B fill 24 + 4032 = 4056 B; the walk stops at type 0 after
    page = L.build_device_page(L.BootParam(), [_console_entry()] * 42)
    assert len(list(L.iter_device_page(page))) == 42
    with pytest.raises(LocalProtocolError):
        L.build_device_page(L.BootParam(), [_console_entry()] * 43)


def _page_with_desc(type_: int, num_vq: int, feature_len: int, config_len: int) -> bytes:
    page = bytearray(L.build_device_page(L.BootParam(), []))
    struct.pack_into("<bBBB", page, 24, type_, num_vq, feature_len, config_len)
    return bytes(page)


@pytest.mark.parametrize(
    ("num_vq", "feature_len", "config_len", "why"),
    [
        (0, 4, 0, "num_vq"),
        (9, 4, 0, "num_vq"),
        (1, 9, 0, "feature_len"),
        (8, 8, 48, "descriptor block"),  # 8 + 192 + 16 + 48 = 264 > 256
        (1, 0, 255, "descriptor block"),  # 8 + 24 + 255 -> 288
    ],
)
def test_malformed_entries_raise_remote_error(
    num_vq: int, feature_len: int, config_len: int, why: str
) -> None:
    page = _page_with_desc(DeviceType.NET, num_vq, feature_len, config_len)
    with pytest.raises(RemoteProtocolError, match=why) as info:
        list(L.iter_device_page(page))
    assert info.value.reason == "device-page"


def test_removed_slot_with_bad_dimensions_is_rejected() -> None:
    with pytest.raises(RemoteProtocolError, match="num_vq"):
        list(L.iter_device_page(_page_with_desc(-1, 0, 0, 0)))


def test_entry_running_past_the_page() -> None:
    # 42 console entries end at 24 + 42*96 = 4056; a 43rd would end at 4152
    page = bytearray(L.build_device_page(L.BootParam(), [_console_entry()] * 42))
    page[4056:4096] = _console_entry().build()[:40]
    with pytest.raises(RemoteProtocolError, match="past") as info:
        list(L.iter_device_page(bytes(page)))
    assert info.value.reason == "device-page"
    # fewer than 8 bytes left for the descriptor itself
    page[4056:4096] = bytes(40)
    page[4090] = DeviceType.NET
    with pytest.raises(RemoteProtocolError, match="past"):
        L.DeviceEntry.parse(bytes(page), 4090)
    # a page cut short in the middle of an entry
    short = L.build_device_page(L.BootParam(), [_console_entry()])[: 24 + 50]
    with pytest.raises(RemoteProtocolError, match="past"):
        list(L.iter_device_page(short))
    with pytest.raises(RemoteProtocolError, match="past"):
        L.DeviceEntry.parse(_console_entry().build(), 90)
    with pytest.raises(RemoteProtocolError, match="past"):
        L.DeviceEntry.parse(_console_entry().build(), -1)


def test_walk_ignores_bytes_beyond_the_page() -> None:
    page = L.build_device_page(L.BootParam(), [_console_entry()] * 42)
    # no terminator after the last entry inside the page, garbage beyond it
    full = bytearray(page)
    full[24 + 42 * 96 :] = b"\x03" * (4096 - 24 - 42 * 96)
    with pytest.raises(RemoteProtocolError):
        list(L.iter_device_page(bytes(full)))
    assert len(list(L.iter_device_page(page + b"\xff" * 100))) == 42


def test_iter_device_page_checks_magic() -> None:
    with pytest.raises(RemoteProtocolError, match="magic"):
        list(L.iter_device_page(bytes(MIC_DP_SIZE)))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_vq": 3},  # disagrees with 2 vqconfigs
        {"config_len": 11},  # disagrees with 12 config bytes
        {"host_features": 1 << 32},  # does not fit feature_len 4
        {"guest_acks": -1},
        {"feature_len": -1},
        {"vqconfigs": ((1, 2), (3, 4))},
        {"num_vq": 0, "vqconfigs": ()},  # a device needs a queue
        {"feature_len": 9},
    ],
)
def test_device_entry_rejects_inconsistent_values(kwargs: dict[str, Any]) -> None:
    base: dict[str, Any] = {
        "type": 3,
        "num_vq": 2,
        "feature_len": 4,
        "config_len": 12,
        "vqconfigs": ((1, 0, 8), (2, 0, 8)),
        "config": bytes(12),
    }
    with pytest.raises(LocalProtocolError):
        L.DeviceEntry(**(base | kwargs))


def test_device_entry_build_rejects_out_of_range_field() -> None:
    entry = L.DeviceEntry(
        type=3, num_vq=1, feature_len=4, config_len=0, vqconfigs=((0, 0, 70000),), config=b""
    )
    with pytest.raises(LocalProtocolError):
        entry.build()


# --- fuzz: peer-written bytes parse or raise RemoteProtocolError, nothing else -----

_BOOT = L.BootParam().build()


def _outcome(fn: Callable[[], object]) -> str:
    """ "ok", or the reason of the RemoteProtocolError; any other exception escapes."""
    try:
        fn()
    except RemoteProtocolError as e:
        return e.reason
    return "ok"


def _walk_checked(buf: bytes) -> None:
    for offset, entry in L.iter_device_page(buf):
        assert offset + entry.size <= min(len(buf), MIC_DP_SIZE)
        assert offset % 8 == 0
        assert L.DeviceEntry.parse(buf, offset) == entry
        # padding may hold garbage that build() zeroes; the values survive
        assert L.DeviceEntry.parse(entry.build()) == entry


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    for buf in (data, _BOOT + data):
        assert _outcome(lambda b=buf: _walk_checked(b)) in {"ok", "device-page"}
        assert _outcome(lambda b=buf: L.parse_bootparam(b)) in {"ok", "device-page"}
        assert _outcome(lambda b=buf: L.DeviceEntry.parse(b, 0)) in {"ok", "device-page"}


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, MIC_DP_SIZE - 1), st.integers(0, 255)), min_size=1, max_size=8
    ),
    st.integers(0, 8),
)
def test_fuzz_mutated_device_page(mutations: list[tuple[int, int]], cut: int) -> None:
    page = bytearray(L.build_device_page(L.BootParam(), [_console_entry(), _block_entry()]))
    for where, value in mutations:
        # aim most mutations at the two entries (bytes 24..248), where they matter
        page[24 + where % 224 if where % 2 else where] = value
    buf = bytes(page[: len(page) - cut * 500])
    assert _outcome(lambda: _walk_checked(buf)) in {"ok", "device-page"}


@settings(max_examples=200, deadline=None)
@given(
    type_=st.integers(-128, 127).filter(lambda t: t != 0),
    vqs=st.lists(
        st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.integers(0, 0xFFFF)),
        min_size=1,
        max_size=4,
    ),
    feature_len=st.integers(0, 8),
    config=st.binary(max_size=40),
    data=st.data(),
)
def test_entry_round_trip(
    type_: int,
    vqs: list[tuple[int, int, int]],
    feature_len: int,
    config: bytes,
    data: st.DataObject,
) -> None:
    limit = 1 << (8 * feature_len)
    entry = L.DeviceEntry(
        type=type_,
        num_vq=len(vqs),
        feature_len=feature_len,
        config_len=len(config),
        vqconfigs=tuple(vqs),
        config=config,
        status=data.draw(st.integers(0, 255)),
        host_features=data.draw(st.integers(0, limit - 1)),
        guest_acks=data.draw(st.integers(0, limit - 1)),
        vdev=data.draw(st.integers(0, 2**64 - 1)),
        c2h_vdev_db=data.draw(st.integers(-128, 127)),
    )
    raw = entry.build()
    assert len(raw) == entry.size
    assert L.DeviceEntry.parse(raw) == entry
