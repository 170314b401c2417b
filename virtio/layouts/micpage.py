"""The MIC device page (Linux ``include/uapi/linux/mic_common.h``, v4-v5.9).

Owns the construct declarations of the boot parameters, device entries
(``desc | vqconfig[num_vq] | host features | guest acks | config | pad8 | ctrl``)
and the per-vring info block; the Linux offset helpers (``mic_desc_size``...);
the entry dimension rules; and the page's parse boundary: :class:`BootParam`
and :class:`DeviceEntry` values, :func:`parse_bootparam`,
:func:`iter_device_page` and :func:`build_device_page`, which either succeed
or raise :class:`~virtio.errors.RemoteProtocolError` (``reason="device-page"``)
for what the peer wrote and :class:`~virtio.errors.LocalProtocolError` for bad
local values. The handshakes on the page's ctrl block are
:mod:`virtio.devpage`'s.

Imports ``construct``, ``virtio.constants`` and ``virtio.errors`` only; must
not import the sibling layout modules, asyncio, the OS or ``transport``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

from construct import (
    Array,
    Bytes,
    Check,
    Const,
    ConstructError,
    Int8sl,
    Int8ul,
    Int16ul,
    Int32ul,
    Int64ul,
    Padding,
    Struct,
    this,
)

from virtio.constants import (
    MIC_DP_SIZE,
    MIC_MAGIC,
    MIC_MAX_DESC_BLK_SIZE,
    DeviceType,
)
from virtio.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
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


# --- MIC device page (include/uapi/linux/mic_common.h, v4-v5.9) ---------------
# Every struct there is __attribute__((aligned(8))), so sizeof() rounds up to 8:
# the trailing Padding reproduces that.

#: ``struct mic_bootparam`` (v4-v5.9): 24 bytes at offset 0 of the device page.
MicBootparam = Struct(
    "magic" / Const(MIC_MAGIC, Int32ul),
    "h2c_config_db" / Int8sl,  # chosen by the card, -1 = none
    "node_id" / Int8ul,
    "h2c_scif_db" / Int8ul,
    "c2h_scif_db" / Int8ul,
    "scif_host_dma_addr" / Int64ul,
    "scif_card_dma_addr" / Int64ul,
)

#: ``struct mic_device_desc``: 5 bytes of fields, sizeof 8 (``__le64 config[0]``
#: plus aligned(8)).
MicDeviceDesc = Struct(
    "type" / Int8sl,  # virtio device ID; 0 ends the list, -1 is a removed slot
    "num_vq" / Int8ul,
    "feature_len" / Int8ul,
    "config_len" / Int8ul,
    "status" / Int8ul,
    Padding(3),
)

#: ``struct mic_vqconfig``: 18 bytes of fields, sizeof 24.
MicVqconfig = Struct(
    "address" / Int64ul,  # desc + avail, in host RAM
    "used_address" / Int64ul,  # the card's used ring ("must_be_zero" in the NXP patch)
    "num" / Int16ul,
    Padding(6),
)

#: ``struct mic_device_ctrl``: 15 bytes of fields, sizeof 16.
MicDeviceCtrl = Struct(
    "vdev" / Int64ul,  # card-private pointer
    "config_change" / Int8ul,  # MicConfigChange
    "vdev_reset" / Int8ul,
    "guest_ack" / Int8ul,
    "host_ack" / Int8ul,
    "used_address_updated" / Int8ul,
    "c2h_vdev_db" / Int8sl,  # chosen by the host, -1 = none
    "h2c_vdev_db" / Int8sl,  # chosen by the card, -1 = none
    Padding(1),
)

#: ``struct _mic_vring_info`` (natural alignment: u16, 2 pad, le32): 8 bytes,
#: placed right after each vring; ``magic`` = MIC_MAGIC + type + vq index.
MicVringInfo = Struct(
    "avail_idx" / Int16ul,
    Padding(2),
    "magic" / Int32ul,
)

#: Tag of every RemoteProtocolError raised for a malformed device page.
DEVICE_PAGE_REASON = "device-page"
#: Entries start right after the boot parameters (Linux: ``sizeof(struct mic_bootparam)``).
FIRST_ENTRY_OFFSET: int = MicBootparam.sizeof()
#: MIC-VOP limits. Linux: MIC_MAX_VRINGS = 4 and feature_len 4 (mpssd); we allow
#: 8 queues and 64 feature bits (so VERSION_1, bit 32, can be offered).
MAX_NUM_VQ = 8
MAX_FEATURE_LEN = 8

_DESC_SIZE: int = MicDeviceDesc.sizeof()
_VQCONFIG_SIZE: int = MicVqconfig.sizeof()
_CTRL_SIZE: int = MicDeviceCtrl.sizeof()


def _align8(n: int) -> int:
    return (n + 7) & ~7


def mic_desc_size(num_vq: int, feature_len: int, config_len: int) -> int:
    """Linux ``mic_desc_size()``: desc + vqconfigs + both feature bitmaps + config."""
    return _DESC_SIZE + num_vq * _VQCONFIG_SIZE + 2 * feature_len + config_len


def mic_aligned_desc_size(num_vq: int, feature_len: int, config_len: int) -> int:
    """Linux ``mic_aligned_desc_size()``: :func:`mic_desc_size` rounded up to 8.

    This "descriptor block" is what Linux bounds by MIC_MAX_DESC_BLK_SIZE (256).
    """
    return _align8(mic_desc_size(num_vq, feature_len, config_len))


def mic_total_desc_size(num_vq: int, feature_len: int, config_len: int) -> int:
    """Linux ``mic_total_desc_size()``: the aligned block plus the ctrl (16 B)."""
    return mic_aligned_desc_size(num_vq, feature_len, config_len) + _CTRL_SIZE


#: The size of a whole device-page entry (same as :func:`mic_total_desc_size`).
entry_size = mic_total_desc_size


def mic_vq_config(index: int = 0) -> int:
    """Offset of ``vqconfig[index]`` from the entry start (Linux ``mic_vq_config() + index``)."""
    return _DESC_SIZE + index * _VQCONFIG_SIZE


def mic_vq_features(num_vq: int) -> int:
    """Offset of the host (offered) feature bitmap (Linux ``mic_vq_features()``)."""
    return mic_vq_config(num_vq)


def mic_guest_acks(num_vq: int, feature_len: int) -> int:
    """Offset of the guest (acked) feature bitmap: right after the host bitmap."""
    return mic_vq_features(num_vq) + feature_len


def mic_vq_configspace(num_vq: int, feature_len: int) -> int:
    """Offset of the device config space (Linux ``mic_vq_configspace()``)."""
    return mic_vq_features(num_vq) + 2 * feature_len


def mic_device_ctrl(num_vq: int, feature_len: int, config_len: int) -> int:
    """Offset of ``struct mic_device_ctrl`` (Linux: ``(void *)d + mic_aligned_desc_size(d)``)."""
    return mic_aligned_desc_size(num_vq, feature_len, config_len)


def _dims_problem(num_vq: int, feature_len: int, config_len: int) -> str | None:
    """Why these entry dimensions are not acceptable, or None if they are."""
    if not 1 <= num_vq <= MAX_NUM_VQ:
        return f"num_vq {num_vq} outside 1..{MAX_NUM_VQ}"
    if feature_len > MAX_FEATURE_LEN:
        return f"feature_len {feature_len} > {MAX_FEATURE_LEN}"
    block = mic_aligned_desc_size(num_vq, feature_len, config_len)
    if block > MIC_MAX_DESC_BLK_SIZE:
        # Linux vop_vringh.c MIC_VIRTIO_ADD_DEVICE: mic_aligned_desc_size > 256 -> -EINVAL
        return f"descriptor block of {block} B > {MIC_MAX_DESC_BLK_SIZE} B"
    return None


def _desc_dims_ok(ctx: Any) -> bool:
    d = ctx.desc
    return _dims_problem(d.num_vq, d.feature_len, d.config_len) is None


def _pad_to_8(ctx: Any) -> int:
    d = ctx.desc
    return -mic_desc_size(d.num_vq, d.feature_len, d.config_len) % 8


#: One whole device-page entry, ``mic_total_desc_size()`` bytes.
MicDeviceEntry = Struct(
    "desc" / MicDeviceDesc,
    Check(_desc_dims_ok),
    "vqconfigs" / Array(this.desc.num_vq, MicVqconfig),
    "host_features" / Bytes(this.desc.feature_len),
    "guest_acks" / Bytes(this.desc.feature_len),
    "config" / Bytes(this.desc.config_len),
    Padding(_pad_to_8),
    "ctrl" / MicDeviceCtrl,
)


def _remote(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(message, reason=DEVICE_PAGE_REASON)


@dataclass(frozen=True, slots=True)
class BootParam:
    """``struct mic_bootparam`` as a value (the magic is implied)."""

    h2c_config_db: int = -1
    node_id: int = 0
    h2c_scif_db: int = 0
    c2h_scif_db: int = 0
    scif_host_dma_addr: int = 0
    scif_card_dma_addr: int = 0

    def build(self) -> bytes:
        """The 24 bytes of the boot parameters, magic included.

        Raises:
            LocalProtocolError: a field does not fit its C type.
        """
        try:
            data: bytes = MicBootparam.build(
                {
                    "h2c_config_db": self.h2c_config_db,
                    "node_id": self.node_id,
                    "h2c_scif_db": self.h2c_scif_db,
                    "c2h_scif_db": self.c2h_scif_db,
                    "scif_host_dma_addr": self.scif_host_dma_addr,
                    "scif_card_dma_addr": self.scif_card_dma_addr,
                }
            )
        except ConstructError as e:
            raise LocalProtocolError(f"cannot build boot parameters: {e}") from e
        return data


def parse_bootparam(buf: bytes | bytearray | memoryview) -> BootParam:
    """Parse the boot parameters at offset 0 of a device page.

    Raises:
        RemoteProtocolError: ``buf`` is shorter than 24 bytes or the magic is
            not 0xc0ffee00 (``reason="device-page"``).
    """
    raw = bytes(buf[:FIRST_ENTRY_OFFSET])
    try:
        c = MicBootparam.parse(raw)
    except ConstructError as e:
        raise _remote(f"bad boot parameters (want magic {MIC_MAGIC:#x}): {e}") from e
    return BootParam(
        h2c_config_db=c.h2c_config_db,
        node_id=c.node_id,
        h2c_scif_db=c.h2c_scif_db,
        c2h_scif_db=c.c2h_scif_db,
        scif_host_dma_addr=c.scif_host_dma_addr,
        scif_card_dma_addr=c.scif_card_dma_addr,
    )


class VqConfig(NamedTuple):
    """``struct mic_vqconfig`` as a value."""

    address: int
    used_address: int
    num: int


@dataclass(frozen=True, slots=True)
class DeviceEntry:
    """One device-page entry: descriptor, vqconfigs, feature bitmaps, config, ctrl.

    ``host_features`` and ``guest_acks`` are the little-endian bitmaps of
    ``feature_len`` bytes as integers (bit *n* is bit ``n % 8`` of byte ``n // 8``).
    ``num_vq`` and ``config_len`` must agree with ``vqconfigs`` and ``config``.
    ``type`` is the raw s8 (a :class:`~virtio.constants.DeviceType` value, -1 for
    a removed slot, or an ID we have no driver for).

    Raises:
        LocalProtocolError: (on construction) inconsistent or out-of-range values.
    """

    type: int
    num_vq: int
    feature_len: int
    config_len: int
    vqconfigs: tuple[VqConfig, ...]
    config: bytes
    status: int = 0
    host_features: int = 0
    guest_acks: int = 0
    # struct mic_device_ctrl
    vdev: int = 0
    config_change: int = 0
    vdev_reset: int = 0
    guest_ack: int = 0
    host_ack: int = 0
    used_address_updated: int = 0
    c2h_vdev_db: int = -1
    h2c_vdev_db: int = -1

    def __post_init__(self) -> None:
        try:
            vqs = tuple(VqConfig(*v) for v in self.vqconfigs)
        except TypeError as e:
            raise LocalProtocolError(f"vqconfigs must be (address, used_address, num): {e}") from e
        object.__setattr__(self, "vqconfigs", vqs)
        object.__setattr__(self, "config", bytes(self.config))
        if len(vqs) != self.num_vq:
            raise LocalProtocolError(f"num_vq {self.num_vq} but {len(vqs)} vqconfigs")
        if len(self.config) != self.config_len:
            raise LocalProtocolError(
                f"config_len {self.config_len} but {len(self.config)} config bytes"
            )
        if self.feature_len < 0:
            raise LocalProtocolError(f"feature_len {self.feature_len} < 0")
        problem = _dims_problem(self.num_vq, self.feature_len, self.config_len)
        if problem is not None:
            raise LocalProtocolError(problem)
        limit = 1 << (8 * self.feature_len)
        for name, bits in (("host_features", self.host_features), ("guest_acks", self.guest_acks)):
            if not 0 <= bits < limit:
                raise LocalProtocolError(
                    f"{name} {bits:#x} does not fit {self.feature_len} feature bytes"
                )

    @property
    def removed(self) -> bool:
        """True for a hot-removed, reusable slot (``type == -1``)."""
        return self.type == DeviceType.REMOVED

    @property
    def size(self) -> int:
        """Bytes this entry takes on the page (:func:`entry_size`)."""
        return entry_size(self.num_vq, self.feature_len, self.config_len)

    @property
    def ctrl_offset(self) -> int:
        """Offset of the ctrl block from the entry start (:func:`mic_device_ctrl`)."""
        return mic_device_ctrl(self.num_vq, self.feature_len, self.config_len)

    def build(self) -> bytes:
        """The entry's bytes, :attr:`size` long.

        Raises:
            LocalProtocolError: a field does not fit its C type.
        """
        try:
            data: bytes = MicDeviceEntry.build(
                {
                    "desc": {
                        "type": self.type,
                        "num_vq": self.num_vq,
                        "feature_len": self.feature_len,
                        "config_len": self.config_len,
                        "status": self.status,
                    },
                    "vqconfigs": [v._asdict() for v in self.vqconfigs],
                    "host_features": self.host_features.to_bytes(self.feature_len, "little"),
                    "guest_acks": self.guest_acks.to_bytes(self.feature_len, "little"),
                    "config": self.config,
                    "ctrl": {
                        "vdev": self.vdev,
                        "config_change": self.config_change,
                        "vdev_reset": self.vdev_reset,
                        "guest_ack": self.guest_ack,
                        "host_ack": self.host_ack,
                        "used_address_updated": self.used_address_updated,
                        "c2h_vdev_db": self.c2h_vdev_db,
                        "h2c_vdev_db": self.h2c_vdev_db,
                    },
                }
            )
        except ConstructError as e:
            raise LocalProtocolError(f"cannot build device entry: {e}") from e
        return data

    @classmethod
    def parse(cls, buf: bytes | bytearray | memoryview, offset: int = 0) -> DeviceEntry:
        """Parse the entry at ``offset``; it must lie entirely inside ``buf``.

        The bytes are copied once before parsing, so a peer changing them
        meanwhile cannot make the checks and the values disagree.

        Raises:
            RemoteProtocolError: the entry is malformed (num_vq 0 or > 8,
                feature_len > 8, descriptor block > 256 B) or runs past
                ``buf`` (``reason="device-page"``).
        """
        if not 0 <= offset <= len(buf) - _DESC_SIZE:
            raise _remote(f"device entry at {offset:#x} runs past the {len(buf)} B page")
        desc = MicDeviceDesc.parse(bytes(buf[offset : offset + _DESC_SIZE]))
        problem = _dims_problem(desc.num_vq, desc.feature_len, desc.config_len)
        if problem is not None:
            raise _remote(f"device entry at {offset:#x} (type {desc.type}): {problem}")
        end = offset + entry_size(desc.num_vq, desc.feature_len, desc.config_len)
        if end > len(buf):
            raise _remote(
                f"device entry at {offset:#x} (type {desc.type}) ends at {end:#x},"
                f" past the {len(buf)} B page"
            )
        try:
            c = MicDeviceEntry.parse(bytes(buf[offset:end]))
        except ConstructError as e:
            raise _remote(f"malformed device entry at {offset:#x}: {e}") from e
        d, ctrl = c.desc, c.ctrl
        try:
            return cls(
                type=d.type,
                num_vq=d.num_vq,
                feature_len=d.feature_len,
                config_len=d.config_len,
                vqconfigs=tuple(VqConfig(v.address, v.used_address, v.num) for v in c.vqconfigs),
                config=c.config,
                status=d.status,
                host_features=int.from_bytes(c.host_features, "little"),
                guest_acks=int.from_bytes(c.guest_acks, "little"),
                vdev=ctrl.vdev,
                config_change=ctrl.config_change,
                vdev_reset=ctrl.vdev_reset,
                guest_ack=ctrl.guest_ack,
                host_ack=ctrl.host_ack,
                used_address_updated=ctrl.used_address_updated,
                c2h_vdev_db=ctrl.c2h_vdev_db,
                h2c_vdev_db=ctrl.h2c_vdev_db,
            )
        except LocalProtocolError as e:  # pragma: no cover - the checks above make it unreachable
            raise _remote(f"malformed device entry at {offset:#x}: {e}") from e


def iter_device_page(buf: bytes | bytearray | memoryview) -> Iterator[tuple[int, DeviceEntry]]:
    """Walk the entries of a device page, as the Linux card's ``vop_scan_devices``.

    Checks the boot parameters, then yields ``(offset, entry)`` for each entry
    from offset 24 on, removed slots (``entry.removed``) included, and stops at
    ``type == 0`` or at the end of the page (4096 B, or ``len(buf)`` if shorter).
    The page is copied once at the start, so the walk sees one snapshot.

    Raises:
        RemoteProtocolError: bad magic, or an entry that is malformed or runs
            past the page (``reason="device-page"``).
    """
    page = bytes(buf[:MIC_DP_SIZE])
    parse_bootparam(page)
    offset = FIRST_ENTRY_OFFSET
    while offset < len(page):
        if page[offset] == DeviceType.END:
            return
        entry = DeviceEntry.parse(page, offset)
        yield offset, entry
        offset += entry.size


def build_device_page(boot: BootParam, entries: Iterable[DeviceEntry]) -> bytes:
    """A whole 4096-byte device page: boot parameters, entries, zeros after them.

    Raises:
        LocalProtocolError: the entries do not fit the page, or a value does
            not fit its C type.
    """
    page = bytearray(MIC_DP_SIZE)
    page[:FIRST_ENTRY_OFFSET] = boot.build()
    offset = FIRST_ENTRY_OFFSET
    for entry in entries:
        end = offset + entry.size
        if end > MIC_DP_SIZE:
            raise LocalProtocolError(f"device entries need {end} B, the page has {MIC_DP_SIZE}")
        page[offset:end] = entry.build()
        offset = end
    return bytes(page)
