"""Every binary layout of MIC-VOP, declared once with ``construct``.

This package owns the wire formats: the split and packed virtqueue structures
(virtio 1.2 §2.7, §2.8), the request headers and config spaces of virtio-blk,
virtio-net and virtio-console (§5.1-5.3), and the MIC device page of Linux
``include/uapi/linux/mic_common.h`` (v4-v5.9): boot parameters, device entries
(``desc | vqconfig[num_vq] | host features | guest acks | config | pad8 | ctrl``)
and the per-vring info block. Everything is little-endian.

One module per family, none importing another::

    vring     split and packed ring structures, vring arithmetic, field_offset
    devices   virtio-blk, virtio-net and virtio-console headers and config spaces
    micpage   the MIC device page: structures, Linux offset helpers, its parse boundary

This ``__init__`` only re-exports: ``from virtio.layouts import ...`` is the
public path. It must not import asyncio, the OS, or ``transport``: it turns
bytes into values and values into bytes, nothing else.

Rules kept here (STYLE.md §3, §4):

- ``Const`` for magics, ``Padding`` for reserved bytes, ``Check`` for the
  invariants of the device page; every size is tested against the C/spec size.
- Bytes written by the peer are parsed by the ``parse_*``/``iter_*`` helpers and
  :meth:`DeviceEntry.parse`, which either succeed or raise
  :class:`~virtio.errors.RemoteProtocolError` (``reason="device-page"``), the
  ``construct`` error chained with ``from``. Building from bad local values
  raises :class:`~virtio.errors.LocalProtocolError`.
- The per-descriptor hot path does not use ``construct`` (about 10 us a parse):
  the ``*_STRUCT`` objects (and the twins in :mod:`virtio.blk`,
  :mod:`virtio.console`, :mod:`virtio.net`) are precompiled
  :class:`struct.Struct` twins whose formats are tested against the
  ``construct`` declarations.
"""

from virtio.layouts.devices import (
    BlkConfig,
    BlkDiscardWriteZeroes,
    BlkReqHeader,
    ConsoleConfig,
    ConsoleControl,
    ConsoleResize,
    NetConfig,
    NetHdr,
    NetHdrLegacy,
)
from virtio.layouts.micpage import (
    DEVICE_PAGE_REASON,
    FIRST_ENTRY_OFFSET,
    MAX_FEATURE_LEN,
    MAX_NUM_VQ,
    BootParam,
    DeviceEntry,
    MicBootparam,
    MicDeviceCtrl,
    MicDeviceDesc,
    MicDeviceEntry,
    MicVqconfig,
    MicVringInfo,
    VqConfig,
    build_device_page,
    entry_size,
    iter_device_page,
    mic_aligned_desc_size,
    mic_desc_size,
    mic_device_ctrl,
    mic_guest_acks,
    mic_total_desc_size,
    mic_vq_config,
    mic_vq_configspace,
    mic_vq_features,
    parse_bootparam,
)
from virtio.layouts.vring import (
    PACKED_DESC_BODY_STRUCT,
    PACKED_DESC_STRUCT,
    PACKED_EVENT_STRUCT,
    PACKED_USED_STRUCT,
    SPLIT_DESC_STRUCT,
    USED_ELEM_STRUCT,
    PackedDesc,
    PackedEvent,
    SplitDesc,
    UsedElem,
    field_offset,
    split_avail,
    split_used,
    vring_offsets,
    vring_size,
)

__all__ = [
    # helpers
    "field_offset",
    # split ring (spec 2.7)
    "SplitDesc",
    "UsedElem",
    "split_avail",
    "split_used",
    "vring_size",
    "vring_offsets",
    "SPLIT_DESC_STRUCT",
    "USED_ELEM_STRUCT",
    # packed ring (spec 2.8)
    "PackedDesc",
    "PackedEvent",
    "PACKED_DESC_STRUCT",
    "PACKED_EVENT_STRUCT",
    "PACKED_DESC_BODY_STRUCT",
    "PACKED_USED_STRUCT",
    # virtio-blk (spec 5.2)
    "BlkReqHeader",
    "BlkDiscardWriteZeroes",
    "BlkConfig",
    # virtio-net (spec 5.1)
    "NetHdrLegacy",
    "NetHdr",
    "NetConfig",
    # virtio-console (spec 5.3)
    "ConsoleConfig",
    "ConsoleControl",
    "ConsoleResize",
    # MIC device page (mic_common.h)
    "MicBootparam",
    "MicDeviceDesc",
    "MicVqconfig",
    "MicDeviceCtrl",
    "MicVringInfo",
    "MicDeviceEntry",
    "DEVICE_PAGE_REASON",
    "FIRST_ENTRY_OFFSET",
    "MAX_NUM_VQ",
    "MAX_FEATURE_LEN",
    "mic_desc_size",
    "mic_aligned_desc_size",
    "mic_total_desc_size",
    "mic_vq_config",
    "mic_vq_features",
    "mic_guest_acks",
    "mic_vq_configspace",
    "mic_device_ctrl",
    "entry_size",
    "BootParam",
    "parse_bootparam",
    "VqConfig",
    "DeviceEntry",
    "iter_device_page",
    "build_device_page",
]
