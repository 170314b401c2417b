"""Live accessors to the MIC device page, shared by the host (VOP) and the card (bus).

Owns the byte offsets inside one device-page entry and the vring info block,
derived from the construct declarations in :mod:`virtio.layouts`, and an
:class:`EntryView` that reads and writes an entry in place (shared memory:
every read is a fresh load, every write one store). The dimensions of an
entry always come from the caller's own record (the host's table, or the
card's validated parse), never from the page itself, which the peer can
write. Sans-IO: works on a memoryview; imports no asyncio, OS or transport.
"""

from __future__ import annotations

from enum import IntEnum

from virtio.constants import MIC_VIRTIO_RING_ALIGN, Feature
from virtio.errors import LocalProtocolError
from virtio.layouts import (
    DeviceEntry,
    MicBootparam,
    MicDeviceDesc,
    MicVqconfig,
    MicVringInfo,
    entry_size,
    field_offset,
    mic_device_ctrl,
    mic_guest_acks,
    mic_vq_config,
    mic_vq_configspace,
    mic_vq_features,
    vring_size,
)
from virtio.packed.layout import PackedLayout

__all__ = [
    "C2H_DOORBELLS",
    "H2C_DOORBELLS",
    "MAX_QUEUE_SIZE",
    "TRANSPORT_FEATURES",
    "BOOT_H2C_CONFIG_DB",
    "VQ_USED",
    "Ctrl",
    "EntryView",
    "s8",
    "vring_info_offset",
    "vring_alloc_size",
    "VRING_PAGE",
    "RING_PACKED",
    "packed_vring",
]


#: Transport features of the VOP platform (both sides support them; the host
#: offers them on every device on top of its backend's).
TRANSPORT_FEATURES = int(Feature.VERSION_1 | Feature.EVENT_IDX | Feature.INDIRECT_DESC)
#: VIRTIO_F_RING_PACKED (bit 34). Not a transport feature the host offers on
#: every device: it offers it on a device configured with ``ring = "packed"``;
#: the card's core takes it whenever it is offered.
RING_PACKED = int(Feature.RING_PACKED)
#: Largest virtqueue VOP allocates (Linux MIC_VRING_ENTRIES: 128; we allow 256).
MAX_QUEUE_SIZE = 256
#: X100 doorbells: host->card (the card picks h2c_config_db / h2c_vdev_db among
#: them) and card->host (the host picks c2h_vdev_db). -1 in the page means none.
H2C_DOORBELLS = 16
C2H_DOORBELLS = 4


def s8(v: int) -> int:
    """A device-page byte as the signed char Linux declares (doorbells: -1 = none)."""
    return v - 256 if v > 127 else v


_DESC_STATUS = field_offset(MicDeviceDesc, "status")
_VQ_ADDRESS = field_offset(MicVqconfig, "address")
VQ_USED = field_offset(MicVqconfig, "used_address")
_VQ_NUM = field_offset(MicVqconfig, "num")


class Ctrl(IntEnum):
    """The fields of ``struct mic_device_ctrl``; the value is the field's offset.

    The handshakes (:mod:`virtio.handshake`) name fields by this enum, never by
    string; ``tests/virtio/test_handshake.py`` checks every offset against the
    construct declaration :data:`virtio.layouts.MicDeviceCtrl`.
    """

    VDEV = 0  # u64: the card's virtio_device pointer (Linux debug aid; unused here)
    CONFIG_CHANGE = 8
    VDEV_RESET = 9
    GUEST_ACK = 10
    HOST_ACK = 11
    USED_ADDRESS_UPDATED = 12
    C2H_VDEV_DB = 13  # s8, picked by the host; -1 = none
    H2C_VDEV_DB = 14  # s8, picked by the card; -1 = none


# Plain ints for the accessors: on Python 3.11 an enum attribute lookup costs
# more than the byte load it names, and doorbell handlers read ctrl fields.
_VDEV = int(Ctrl.VDEV)
_SIGNED_CTRL = frozenset({int(Ctrl.C2H_VDEV_DB), int(Ctrl.H2C_VDEV_DB)})
BOOT_H2C_CONFIG_DB = field_offset(MicBootparam, "h2c_config_db")


def vring_info_offset(num: int) -> int:
    """Offset of ``_mic_vring_info`` in a vring block (Linux: round_up(vring_size, 4))."""
    return (vring_size(num, MIC_VIRTIO_RING_ALIGN) + 3) & ~3


#: The host allocates vring blocks in whole pages.
VRING_PAGE = 4096
_VRING_INFO_SIZE = int(MicVringInfo.sizeof())


def vring_alloc_size(num: int) -> int:
    """Host RAM one vring of ``num`` entries takes: PAGE_ALIGN(vring_size + info)
    (Linux ``vop_vringh``'s allocation), for VOP and the config checks alike."""
    return -(-(vring_info_offset(num) + _VRING_INFO_SIZE) // VRING_PAGE) * VRING_PAGE


def packed_vring(address: int, num: int) -> PackedLayout:
    """Where a packed ring lives in the vring block the host allocated at ``address``.

    With VIRTIO_F_RING_PACKED negotiated, ``vqconfig.address`` is the
    descriptor ring (16 * ``num`` B), followed by the driver event area and
    the device event area (4 B each): :meth:`PackedLayout.contiguous`. This
    is smaller than the split ring the block was sized for, so the block and
    its ``_mic_vring_info`` (at :func:`vring_info_offset`) stay as they are.
    A packed ring has no used ring: the device writes used descriptors in
    place, so ``used_address`` keeps the host's value and the card may not
    move it (the used-ring handshake is refused).
    """
    return PackedLayout.contiguous(address, num)


class EntryView:
    """Live accessors to one device-page entry whose dimensions the caller knows.

    The dimensions (and so every offset) come from the caller's own record of
    the entry (the host's table, the card's validated parse), never from the
    page, which the peer can write.
    """

    __slots__ = ("_ctrl", "_mv", "config_len", "feature_len", "num_vq", "offset", "size")

    def __init__(
        self, page: memoryview, offset: int, num_vq: int, feature_len: int, config_len: int
    ) -> None:
        self.offset = offset
        self.num_vq = num_vq
        self.feature_len = feature_len
        self.config_len = config_len
        self.size = entry_size(num_vq, feature_len, config_len)
        self._mv = page[offset : offset + self.size]
        self._ctrl = mic_device_ctrl(num_vq, feature_len, config_len)

    def _u8(self, off: int) -> int:
        return int(self._mv[off])

    def _int(self, off: int, n: int) -> int:
        return int.from_bytes(self._mv[off : off + n], "little")

    def _put(self, off: int, n: int, value: int) -> None:
        self._mv[off : off + n] = value.to_bytes(n, "little")

    @property
    def device_type(self) -> int:
        """The entry's ``type`` byte (s8): virtio ID, -1 removed."""
        return s8(self._u8(0))

    @device_type.setter
    def device_type(self, value: int) -> None:
        self._mv[0] = value & 0xFF

    @property
    def status(self) -> int:
        return self._u8(_DESC_STATUS)

    @status.setter
    def status(self, value: int) -> None:
        self._mv[_DESC_STATUS] = value & 0xFF

    @property
    def host_features(self) -> int:
        return self._int(mic_vq_features(self.num_vq), self.feature_len)

    @property
    def guest_acks(self) -> int:
        return self._int(mic_guest_acks(self.num_vq, self.feature_len), self.feature_len)

    @guest_acks.setter
    def guest_acks(self, value: int) -> None:
        self._put(mic_guest_acks(self.num_vq, self.feature_len), self.feature_len, value)

    @property
    def config(self) -> bytes:
        off = mic_vq_configspace(self.num_vq, self.feature_len)
        return bytes(self._mv[off : off + self.config_len])

    @config.setter
    def config(self, data: bytes) -> None:
        if len(data) != self.config_len:
            raise LocalProtocolError(f"config of {len(data)} B, the device has {self.config_len}")
        off = mic_vq_configspace(self.num_vq, self.feature_len)
        self._mv[off : off + self.config_len] = data

    def vq_address(self, i: int) -> int:
        return self._int(mic_vq_config(i) + _VQ_ADDRESS, 8)

    def vq_num(self, i: int) -> int:
        return self._int(mic_vq_config(i) + _VQ_NUM, 2)

    def vq_used_address(self, i: int) -> int:
        return self._int(mic_vq_config(i) + VQ_USED, 8)

    def set_vq_used_address(self, i: int, addr: int) -> None:
        self._put(mic_vq_config(i) + VQ_USED, 8, addr)

    def ctrl(self, field: Ctrl) -> int:
        """One ctrl field as it is now (doorbells as s8: -1 = none)."""
        if field == _VDEV:
            return self._int(self._ctrl, 8)
        v: int = self._mv[self._ctrl + field]
        return v - 256 if v > 127 and field in _SIGNED_CTRL else v

    def set_ctrl(self, field: Ctrl, value: int) -> None:
        """Store one ctrl field (one byte store; ``vdev`` eight)."""
        if field == _VDEV:
            self._put(self._ctrl, 8, value)
        else:
            self._mv[self._ctrl + field] = value & 0xFF

    @property
    def raw(self) -> memoryview:
        """The entry's bytes (live)."""
        return self._mv

    def snapshot(self) -> DeviceEntry:
        """Parse the entry as it is now.

        Raises:
            RemoteProtocolError: the card corrupted it.
        """
        return DeviceEntry.parse(self._mv)
