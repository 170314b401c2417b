"""The device page and host RAM of one card, as the host lays them out.

Owns where things go in the host RAM window: the 4 KiB device page at
offset 0 (``mic_bootparam`` + entries, :class:`DevicePage`: slot allocation,
reuse of removed slots, ``type`` published last) and the vrings carved out of
the rest (:class:`HostRamAllocator`, :func:`vring_alloc_size`). Follows Linux
``vop_vringh.c`` (``vop_virtio_add_device``) and fixes its slot-reuse bug.

Must not import the rest of :mod:`mic_host.vop`, ``transport`` or ``mic_card``.
"""

from __future__ import annotations

from dataclasses import dataclass

from virtio.constants import MIC_DP_SIZE, MIC_MAX_DESC_BLK_SIZE, DeviceType
from virtio.devpage import (
    BOOT_H2C_CONFIG_DB,
    MAX_QUEUE_SIZE,
    EntryView,
    s8,
    vring_alloc_size,
)
from virtio.errors import LocalProtocolError, ResourceError
from virtio.layouts import (
    FIRST_ENTRY_OFFSET,
    MAX_FEATURE_LEN,
    MAX_NUM_VQ,
    BootParam,
    DeviceEntry,
    MicDeviceCtrl,
    VqConfig,
    entry_size,
)
from virtio.memory import FirstFitAllocator

__all__ = ["PAGE", "DevicePage", "HostRamAllocator", "vring_alloc_size"]

#: Host page size: vrings are page-aligned blocks (Linux ``__get_free_pages``).
PAGE = 4096


class HostRamAllocator(FirstFitAllocator):
    """Page-aligned blocks of the host RAM window (offsets ``[start, end)``).

    Linux's host allocates each vring with ``__get_free_pages``; here the
    host RAM region is one buffer, so rings are carved out of it.
    """

    def __init__(self, start: int, end: int, page: int = PAGE) -> None:
        super().__init__(start, end, granule=page, what="host RAM")


#: Smallest entry (1 vq, no features, no config): what a removed filler needs.
_MIN_ENTRY = entry_size(1, 0, 0)


@dataclass(slots=True)
class _Slot:
    offset: int
    size: int
    free: bool


class DevicePage:
    """The 4 KiB device page at offset 0 of host RAM (``mic_bootparam`` + entries).

    The host keeps its own table of slots (offset, size, free) and never
    re-derives the layout from the page, which the card can write.
    """

    def __init__(self, page: memoryview) -> None:
        if len(page) < MIC_DP_SIZE:
            raise LocalProtocolError(f"device page needs {MIC_DP_SIZE} B, got {len(page)}")
        self._mv = page[:MIC_DP_SIZE]
        self._slots: list[_Slot] = []
        self._end = FIRST_ENTRY_OFFSET
        self.reset()

    def reset(self) -> None:
        """Zero the page and write fresh boot parameters (``h2c_config_db = -1``)."""
        self._mv[:] = bytes(MIC_DP_SIZE)
        self._mv[:FIRST_ENTRY_OFFSET] = BootParam().build()
        self._slots.clear()
        self._end = FIRST_ENTRY_OFFSET

    @property
    def raw(self) -> memoryview:
        return self._mv

    @property
    def h2c_config_db(self) -> int:
        """The doorbell the card listens on for config changes, -1 until it picks one."""
        return s8(int(self._mv[BOOT_H2C_CONFIG_DB]))

    @property
    def free_bytes(self) -> int:
        return MIC_DP_SIZE - self._end + sum(s.size for s in self._slots if s.free)

    def add(self, entry: DeviceEntry) -> EntryView:
        """Place ``entry`` like ``MIC_VIRTIO_ADD_DEVICE`` and publish its ``type`` last.

        Raises:
            LocalProtocolError: the entry breaks a VOP limit (type, num_vq,
                feature_len != 8, queue sizes, descriptor block > 256 B).
            ResourceError: no slot fits.
        """
        if entry.type <= 0:
            raise LocalProtocolError(f"device type {entry.type} cannot be added")
        if not 1 <= entry.num_vq <= MAX_NUM_VQ:
            raise LocalProtocolError(f"num_vq {entry.num_vq} outside 1..{MAX_NUM_VQ}")
        if entry.feature_len != MAX_FEATURE_LEN:
            raise LocalProtocolError(f"feature_len must be {MAX_FEATURE_LEN} (VERSION_1 fits)")
        for vq in entry.vqconfigs:
            n = vq.num
            if n <= 0 or n & (n - 1) or n > MAX_QUEUE_SIZE:
                raise LocalProtocolError(f"queue size {n} not a power of two <= {MAX_QUEUE_SIZE}")
        if entry.size - MicDeviceCtrl.sizeof() > MIC_MAX_DESC_BLK_SIZE:  # pragma: no cover
            raise LocalProtocolError("descriptor block larger than 256 B")
        size = entry.size
        slot = next(
            (s for s in self._slots if s.free and (s.size == size or s.size - size >= _MIN_ENTRY)),
            None,
        )
        if slot is not None:
            rest = slot.size - size
            if rest:
                # Linux reused a removed slot without checking its size. A
                # smaller entry leaves a tail the card's walk must skip: make
                # it a removed (type -1) filler entry of exactly that size.
                filler = DeviceEntry(
                    type=DeviceType.REMOVED,
                    num_vq=1,
                    feature_len=0,
                    config_len=rest - _MIN_ENTRY,
                    vqconfigs=(VqConfig(0, 0, 0),),
                    config=bytes(rest - _MIN_ENTRY),
                )
                at = slot.offset + size
                self._mv[at : at + rest] = filler.build()
                idx = self._slots.index(slot)
                self._slots.insert(idx + 1, _Slot(at, rest, True))
            slot.size = size
            slot.free = False
            offset = slot.offset
        else:
            if self._end + size > MIC_DP_SIZE:
                raise ResourceError(
                    f"device page full: {size} B entry, {MIC_DP_SIZE - self._end} B left"
                )
            offset = self._end
            self._slots.append(_Slot(offset, size, False))
            self._end += size
        data = bytearray(entry.build())
        real_type = data[0]
        data[0] = 0xFF  # -1: not visible yet
        self._mv[offset + 1 : offset + size] = data[1:]
        if offset + size < MIC_DP_SIZE and self._end == offset + size:
            self._mv[offset + size] = 0  # list end stays terminated
        self._mv[offset] = real_type  # publish type last (Linux: smp_wmb before it)
        return EntryView(self._mv, offset, entry.num_vq, entry.feature_len, entry.config_len)

    def remove(self, view: EntryView) -> None:
        """Mark the entry's slot removed (``type = -1``) and reusable."""
        for s in self._slots:
            if s.offset == view.offset and not s.free:
                view.device_type = DeviceType.REMOVED
                s.free = True
                return
        raise LocalProtocolError(f"no live entry at {view.offset:#x}")
