"""The host side of "virtio over PCIe": device page, devices, handshakes, rings.

Follows Linux ``drivers/misc/mic/vop/vop_vringh.c`` and ``samples/mic/mpssd``
(v4-v5.9, see ``shared/reference/notes_mic_vop_abi.md``) and fixes what the
notes list as limitations:

- 64-bit feature bitmaps (``feature_len = 8``, VERSION_1 can be offered), acks
  read and enforced by a :class:`~virtio.status.DeviceStatusMachine`
  (FEATURES_OK is refused for unoffered acks), EVENT_IDX and INDIRECT_DESC.
- Up to 8 queues per device, sizes up to 256, each ring's own size used.
- Device-page slots are reused only where the new entry fits (the rest of a
  bigger removed slot becomes a removed filler entry, so the card's walk stays
  aligned); ``type`` is published last.
- Every card-written value (status, acks, used-ring address, ring contents)
  is validated; a bad one moves only that device to DEVICE_NEEDS_RESET, with
  a config interrupt to the card; the host carries on.
- Handshakes time out with :class:`~virtio.errors.MicTimeoutError` instead of
  reporting success; a vdev reset drains in-flight requests first.

The handshakes themselves (what each side writes, in which order, and our
extensions: ``host_ack`` answers status writes, both sides ring instead of
polling) are one sans-IO protocol shared with the card:
:mod:`virtio.handshake`.

Modules, lowest first (imports point down):

- :mod:`~mic_host.vop.page`: the device page and the host RAM allocator;
- :mod:`~mic_host.vop.device`: one device (:class:`VopDevice`), the asyncio
  adapter of the handshake's host half, and the :class:`DeviceOwner` protocol
  it needs from its owner;
- :mod:`~mic_host.vop.devices`: the set of devices of one card (:class:`Vop`).

Must not import ``transport`` or ``mic_card``.
"""

from mic_host.vop.device import HOST_TRANSPORT_FEATURES, DeviceOwner, VopDevice, VopDeviceState
from mic_host.vop.devices import HostPlatform, Vop
from mic_host.vop.page import DevicePage, HostRamAllocator, vring_alloc_size
from virtio.devpage import MAX_QUEUE_SIZE, EntryView, vring_info_offset

__all__ = [
    "HOST_TRANSPORT_FEATURES",
    "MAX_QUEUE_SIZE",
    "DeviceOwner",
    "DevicePage",
    "EntryView",
    "HostPlatform",
    "HostRamAllocator",
    "Vop",
    "VopDevice",
    "VopDeviceState",
    "vring_alloc_size",
    "vring_info_offset",
]
