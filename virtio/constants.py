"""Wire values of virtio 1.x and the MIC device page, as IntEnum/IntFlag.

Sources: virtio spec 1.2 (content.tex, split-ring.tex, packed-ring.tex,
device-types/{blk,net,console}), Linux include/uapi/linux/virtio_*.h and
include/uapi/linux/mic_common.h. Pure data: imports nothing from the project.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

__all__ = [
    "BlkFeature",
    "BlkReqType",
    "BlkStatus",
    "ConsoleEvent",
    "ConsoleFeature",
    "DescFlag",
    "DeviceStatus",
    "DeviceType",
    "Feature",
    "MIC_MAGIC",
    "MIC_DP_SIZE",
    "MIC_MAX_VRINGS",
    "MIC_MAX_DESC_BLK_SIZE",
    "MIC_VIRTIO_RING_ALIGN",
    "MIC_VRING_ENTRIES_MAX",
    "MicConfigChange",
    "NetFeature",
    "NetHdrFlag",
    "NetHdrGso",
    "NetStatus",
    "PackedDescFlag",
    "PackedEventFlag",
    "RingFlag",
    "VRING_SIZE_MAX",
    "SECTOR_SIZE",
]

#: Largest split-ring size the spec allows (2.7: "Queue Size ... maximum 32768").
VRING_SIZE_MAX = 32768

# --- MIC (include/uapi/linux/mic_common.h) ---------------------------------
MIC_MAGIC = 0xC0FFEE00
MIC_DP_SIZE = 4096
MIC_MAX_DESC_BLK_SIZE = 256
MIC_VIRTIO_RING_ALIGN = 4096
#: Linux limits (MIC_MAX_VRINGS 4, MIC_VRING_ENTRIES 128); MIC-VOP enforces its
#: own limits in the VOP layer and keeps these for the faithful mode.
MIC_MAX_VRINGS = 4
MIC_VRING_ENTRIES_MAX = 128


class MicConfigChange(IntEnum):
    """``mic_device_ctrl.config_change`` values (drivers/misc/mic/common/mic_dev.h)."""

    NONE = 0
    DEV_REMOVE = 1
    CONFIG_CHANGE = 2


class DeviceType(IntEnum):
    """Virtio device IDs (spec 5)."""

    END = 0
    NET = 1
    BLOCK = 2
    CONSOLE = 3
    REMOVED = -1  # MIC: a hot-removed, reusable device-page slot (type == -1)


class DeviceStatus(IntFlag):
    """Device status field bits (spec 2.1)."""

    RESET = 0
    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 64
    FAILED = 128


class Feature(IntFlag):
    """Transport-level feature bits (spec 6), as 64-bit masks."""

    NOTIFY_ON_EMPTY = 1 << 24
    ANY_LAYOUT = 1 << 27
    INDIRECT_DESC = 1 << 28
    EVENT_IDX = 1 << 29
    VERSION_1 = 1 << 32
    ACCESS_PLATFORM = 1 << 33
    RING_PACKED = 1 << 34
    IN_ORDER = 1 << 35
    NOTIFICATION_DATA = 1 << 38
    RING_RESET = 1 << 40


class DescFlag(IntFlag):
    """Split descriptor flags (spec 2.7.5)."""

    NEXT = 1
    WRITE = 2
    INDIRECT = 4


class RingFlag(IntFlag):
    """``avail.flags`` / ``used.flags`` (spec 2.7.7, 2.7.10)."""

    NO_INTERRUPT = 1  # avail.flags: driver does not want used-buffer interrupts
    NO_NOTIFY = 1  # used.flags: device does not want available-buffer kicks


class PackedDescFlag(IntFlag):
    """Packed descriptor flags (spec 2.8)."""

    NEXT = 1
    WRITE = 2
    INDIRECT = 4
    AVAIL = 1 << 7
    USED = 1 << 15


class PackedEventFlag(IntEnum):
    """Packed ring event-suppression flags (spec 2.8.10)."""

    ENABLE = 0
    DISABLE = 1
    DESC = 2


# --- virtio-blk (spec 5.2) ---------------------------------------------------
SECTOR_SIZE = 512


class BlkFeature(IntFlag):
    SIZE_MAX = 1 << 1
    SEG_MAX = 1 << 2
    GEOMETRY = 1 << 4
    RO = 1 << 5
    BLK_SIZE = 1 << 6
    FLUSH = 1 << 9
    TOPOLOGY = 1 << 10
    CONFIG_WCE = 1 << 11
    MQ = 1 << 12
    DISCARD = 1 << 13
    WRITE_ZEROES = 1 << 14


class BlkReqType(IntEnum):
    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    DISCARD = 11
    WRITE_ZEROES = 13


class BlkStatus(IntEnum):
    OK = 0
    IOERR = 1
    UNSUPP = 2


# --- virtio-net (spec 5.1) ---------------------------------------------------
class NetFeature(IntFlag):
    CSUM = 1 << 0
    GUEST_CSUM = 1 << 1
    MTU = 1 << 3
    MAC = 1 << 5
    GUEST_TSO4 = 1 << 7
    GUEST_TSO6 = 1 << 8
    GUEST_ECN = 1 << 9
    GUEST_UFO = 1 << 10
    HOST_TSO4 = 1 << 11
    HOST_TSO6 = 1 << 12
    HOST_ECN = 1 << 13
    HOST_UFO = 1 << 14
    MRG_RXBUF = 1 << 15
    STATUS = 1 << 16
    CTRL_VQ = 1 << 17
    MQ = 1 << 22


class NetHdrFlag(IntFlag):
    NEEDS_CSUM = 1
    DATA_VALID = 2
    RSC_INFO = 4


class NetHdrGso(IntEnum):
    NONE = 0
    TCPV4 = 1
    UDP = 3
    TCPV6 = 4
    ECN = 0x80


class NetStatus(IntFlag):
    LINK_UP = 1
    ANNOUNCE = 2


# --- virtio-console (spec 5.3) -----------------------------------------------
class ConsoleFeature(IntFlag):
    SIZE = 1 << 0
    MULTIPORT = 1 << 1
    EMERG_WRITE = 1 << 2


class ConsoleEvent(IntEnum):
    DEVICE_READY = 0
    DEVICE_ADD = 1
    DEVICE_REMOVE = 2
    PORT_READY = 3
    CONSOLE_PORT = 4
    RESIZE = 5
    PORT_OPEN = 6
    PORT_NAME = 7
