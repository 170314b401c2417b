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

Extensions to the Linux protocol (both sides of this project implement them;
a Linux-faithful peer still works, it just polls):

- *Status acknowledgement.* The card clears ``host_ack``, writes ``status``
  and rings c2h; the host applies it, publishes the (possibly refused) status,
  sets ``host_ack = 1`` and rings the device's ``h2c_vdev_db``. This makes a
  FEATURES_OK refusal observable; Linux's host never refused anything.
- The host rings ``h2c_vdev_db`` after clearing ``used_address_updated``, and
  the card rings ``c2h_vdev_db`` after setting ``guest_ack``, so neither side
  has to poll (both still re-check periodically as Linux does).

Threading: everything here runs on the host's event loop thread.
:meth:`Vop.on_doorbell` is synchronous and cheap; a daemon that learns about
doorbells on another thread must use ``loop.call_soon_threadsafe``.

Must not import ``transport`` (the platform is the :class:`HostPlatform`
protocol) or ``mic_card``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

from mic_host.backends import Backend
from mic_host.endpoint import EndpointState, QueueEndpoint
from virtio.constants import (
    MIC_DP_SIZE,
    MIC_MAGIC,
    MIC_MAX_DESC_BLK_SIZE,
    DeviceType,
    MicConfigChange,
)
from virtio.devpage import (
    BOOT_H2C_CONFIG_DB,
    C2H_DOORBELLS,
    H2C_DOORBELLS,
    MAX_QUEUE_SIZE,
    TRANSPORT_FEATURES,
    EntryView,
    s8,
    vring_info_offset,
)
from virtio.errors import (
    BrokenResourceError,
    LocalProtocolError,
    MicError,
    MicTimeoutError,
    RemoteProtocolError,
    ResourceError,
)
from virtio.layouts import (
    FIRST_ENTRY_OFFSET,
    MAX_FEATURE_LEN,
    MAX_NUM_VQ,
    BootParam,
    DeviceEntry,
    MicDeviceCtrl,
    MicVringInfo,
    VqConfig,
    entry_size,
    field_offset,
)
from virtio.memory import FirstFitAllocator, Memory
from virtio.split import DeviceQueue, SplitLayout
from virtio.status import DeviceStatusMachine, DevState

__all__ = [
    "HOST_TRANSPORT_FEATURES",
    "MAX_QUEUE_SIZE",
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

log = logging.getLogger(__name__)

#: Transport features every VOP device offers on top of its backend's.
HOST_TRANSPORT_FEATURES = TRANSPORT_FEATURES
_PAGE = 4096


class HostPlatform(Protocol):
    """What VOP needs from the PCIe emulation (``transport``), host side."""

    @property
    def host_ram(self) -> memoryview:
        """The host RAM region, writable; the device page lives at offset 0."""

    @property
    def host_ram_bus(self) -> int:
        """Card-physical address at which ``host_ram`` appears (SMPT base)."""

    @property
    def card_view(self) -> Memory:
        """Card-physical addresses as the host reaches them (aperture + host RAM)."""

    def ring_card(self, db: int) -> None:
        """Ring host->card doorbell ``db`` (0..15)."""


# --------------------------------------------------------------------------
# host RAM allocator


class HostRamAllocator(FirstFitAllocator):
    """Page-aligned blocks of the host RAM window (offsets ``[start, end)``).

    Linux's host allocates each vring with ``__get_free_pages``; here the
    host RAM region is one buffer, so rings are carved out of it.
    """

    def __init__(self, start: int, end: int, page: int = _PAGE) -> None:
        super().__init__(start, end, granule=page, what="host RAM")


def vring_alloc_size(num: int) -> int:
    """Bytes the host allocates per vring: PAGE_ALIGN(vring_size + info)."""
    return -(-(vring_info_offset(num) + int(MicVringInfo.sizeof())) // _PAGE) * _PAGE


# --------------------------------------------------------------------------
# device page

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


# --------------------------------------------------------------------------
# devices


class VopDeviceState(Enum):
    ACTIVE = "active"
    REMOVING = "removing"
    REMOVED = "removed"
    ZOMBIE = "zombie"  # the card never acknowledged removal; slot and rings held until reset


#: offset of ``magic`` in ``struct _mic_vring_info`` (after ``avail_idx`` and padding)
_INFO_MAGIC = field_offset(MicVringInfo, "magic")


@dataclass(slots=True)
class _Vring:
    offset: int  # in host RAM
    num: int
    bus: int  # card-physical address of desc (vqconfig.address)
    default_used: int  # card-physical address of the contiguous used ring
    info: int  # in host RAM: this vring's _mic_vring_info (computed once, read per flush)


class VopDevice:
    """One virtio device of a card: its entry, rings, status machine and queues.

    Implements :class:`mic_host.backends.BackendContext` for its backend and
    :class:`mic_host.endpoint.EndpointOwner` for its endpoints.
    """

    def __init__(
        self,
        vop: Vop,
        backend: Backend,
        view: EntryView,
        vrings: list[_Vring],
        c2h_db: int,
    ) -> None:
        self._vop = vop
        self.backend = backend
        self.name = backend.name
        self.device_type = int(backend.device_type)
        self.view = view
        self.vrings = vrings
        self.c2h_db = c2h_db
        self.offered = int(backend.features()) | HOST_TRANSPORT_FEATURES
        self.machine = DeviceStatusMachine(self.offered)
        self.endpoints = [QueueEndpoint(self, i, v.num) for i, v in enumerate(vrings)]
        self.state = VopDeviceState.ACTIVE
        self._used = [v.default_used for v in vrings]
        self._resetting = False
        self._config_lock = asyncio.Lock()
        self._ctrl_event = asyncio.Event()
        self._bad_db_logged = False
        self.log = logging.getLogger(f"{__name__}.{self.name}")
        self.task: asyncio.Task[None] | None = None
        self.doorbells = 0
        self.card_interrupts = 0
        self.config_interrupts = 0
        self.errors = 0
        self.resets = 0
        self.last_error = ""

    # -- BackendContext ------------------------------------------------------
    @property
    def queues(self) -> Sequence[QueueEndpoint]:
        return self.endpoints

    @property
    def features(self) -> int:
        return self.machine.features

    async def update_config(self, config: bytes) -> None:
        """Write a new config space; if the card is using the device, run the
        config-change handshake (``config_change = 2``, config doorbell,
        ``guest_ack``) as ``MIC_VIRTIO_CONFIG_CHANGE`` does.

        Raises:
            LocalProtocolError: wrong config length, or the device was removed.
            MicTimeoutError: the card did not set ``guest_ack`` in time (the
                flags are cleared again; unlike Linux this is reported).
        """
        if self.state is not VopDeviceState.ACTIVE:
            raise LocalProtocolError(f"device {self.name} is {self.state.value}")
        async with self._config_lock:
            self.view.config = bytes(config)
            if self._vop.page.h2c_config_db < 0 or self.machine.status == 0:
                return  # nobody listening: the card reads the new config at probe
            await self._config_handshake(MicConfigChange.CONFIG_CHANGE, self._vop.config_timeout)

    # -- EndpointOwner -------------------------------------------------------
    def _interrupt(self) -> None:
        db = self.view.ctrl("h2c_vdev_db")
        if db < 0:
            return
        if db >= H2C_DOORBELLS:
            if not self._bad_db_logged:
                self.log.error("card chose h2c_vdev_db %d, outside 0..15: not rung", db)
                self._bad_db_logged = True
            return
        self.card_interrupts += 1
        self._vop._ring(db)

    def _ring_error(self, index: int, exc: MicError) -> None:
        self._device_error(f"queue {index}: {exc}")

    def _published(self, index: int, next_avail: int) -> None:
        off = self.vrings[index].info
        self._vop.host_ram[off : off + 2] = (next_avail & 0xFFFF).to_bytes(2, "little")

    # -- card doorbell -------------------------------------------------------
    def _on_doorbell(self) -> None:
        """The card rang this device's c2h doorbell. Never raises for card faults."""
        self.doorbells += 1
        self._ctrl_event.set()
        if self.state is not VopDeviceState.ACTIVE or self._resetting:
            return
        v = self.view
        if v.ctrl("vdev_reset"):
            self._resetting = True
            self._vop._spawn(self._vdev_reset(), f"{self.name}-reset")
            return
        try:
            self._check_status()
            self._check_used_address()
        except MicError as e:
            # RemoteProtocolError/RingError from the card's values, or e.g. a
            # MemoryFault zeroing a used ring the card pointed outside its
            # memory. Only this device pays for it.
            self._device_error(str(e))
        if v.ctrl("host_ack") == 0:
            v.set_ctrl("host_ack", 1)  # status write applied (see module docstring)
            self._interrupt()
        for ep in self.endpoints:
            ep.notify()

    def _check_status(self) -> None:
        m = self.machine
        value = self.view.status
        if value == m.status:
            return
        was_live = m.live
        m.write_acks(self.view.guest_acks)
        try:
            m.write_status(value)
        finally:
            self.view.status = m.status  # publish: refusals and NEEDS_RESET are visible
        if value == 0:
            self._stop_queues(EndpointState.IDLE, "driver reset the device")
        elif m.state is DevState.FAILED:
            self._stop_queues(EndpointState.IDLE, "driver set FAILED")
            self.log.warning("card gave up on %s (FAILED): %s", self.name, m.reason or "-")
        elif m.live and not was_live:
            self._start_queues()

    def _check_used_address(self) -> None:
        v = self.view
        if not v.ctrl("used_address_updated"):
            return
        try:
            if self.machine.live:
                raise RemoteProtocolError(
                    "card moved the used ring after DRIVER_OK", reason="used-address"
                )
            new: list[int] = []
            for i, vr in enumerate(self.vrings):
                addr = v.vq_used_address(i)
                layout = SplitLayout(vr.num, vr.bus, vr.bus + 16 * vr.num, addr)
                if addr % 4:
                    raise RemoteProtocolError(
                        f"used ring {i} at {addr:#x} not 4-byte aligned", reason="used-address"
                    )
                if addr != vr.default_used and self._vop._in_host_ram(addr, layout.used_bytes):
                    # The trick moves the used ring into *card* RAM; pointing it
                    # into host RAM would make the host scribble over its own
                    # device page or another device's rings.
                    raise RemoteProtocolError(
                        f"used ring {i} at {addr:#x} lies in host RAM", reason="used-address"
                    )
                try:
                    self._vop.platform.card_view.view(addr, layout.used_bytes, True)
                except MicError as e:
                    raise RemoteProtocolError(
                        f"used ring {i} at {addr:#x} unreachable: {e}", reason="used-address"
                    ) from e
                new.append(addr)
            self._used = new
        finally:
            # vop_virtio_init_post: clear the flag so the card stops waiting
            v.set_ctrl("used_address_updated", 0)
            self._interrupt()

    def _start_queues(self) -> None:
        """DRIVER_OK: build a DeviceQueue per vring over the card view (may raise RingError)."""
        mem = self._vop.platform.card_view
        for i, (vr, ep) in enumerate(zip(self.vrings, self.endpoints, strict=True)):
            layout = SplitLayout(vr.num, vr.bus, vr.bus + 16 * vr.num, self._used[i])
            q = DeviceQueue(mem, layout, self.machine.features, max_size=MAX_QUEUE_SIZE)
            used = mem.view(layout.used, layout.used_bytes, True)
            used[:] = bytes(len(used))
            q.activate()
            ep.attach(q)
        self.log.info(
            "%s live: features %#x, queues %s, used rings %s",
            self.name,
            self.machine.features,
            [v.num for v in self.vrings],
            [
                "host" if u == v.default_used else "card"
                for u, v in zip(self._used, self.vrings, strict=True)
            ],
        )

    def _stop_queues(self, state: EndpointState, reason: str) -> None:
        for ep in self.endpoints:
            ep.detach(state, reason)

    def _device_error(self, reason: str) -> None:
        """A card fault on this device: DEVICE_NEEDS_RESET + config interrupt."""
        self.errors += 1
        self.last_error = reason
        self.log.error("device %s needs reset: %s", self.name, reason)
        self.machine.device_error(reason)
        self.view.status = self.machine.status
        self._stop_queues(EndpointState.BROKEN, reason)
        self._vop._spawn(self._notify_needs_reset(), f"{self.name}-needs-reset")

    async def _notify_needs_reset(self) -> None:
        if self._vop.page.h2c_config_db < 0:
            return
        async with self._config_lock:
            if self.state is not VopDeviceState.ACTIVE:
                return
            try:
                await self._config_handshake(
                    MicConfigChange.CONFIG_CHANGE, self._vop.config_timeout
                )
            except MicTimeoutError as e:
                self.log.warning("card did not acknowledge NEEDS_RESET of %s: %s", self.name, e)

    async def _config_handshake(self, kind: MicConfigChange, limit: float) -> None:
        """Set ``config_change``, ring the config doorbell, wait for ``guest_ack``.

        Caller holds ``_config_lock``. Clears both fields whatever happens.

        Raises:
            MicTimeoutError: no ``guest_ack`` within ``limit`` seconds.
        """
        v = self.view
        v.set_ctrl("guest_ack", 0)
        v.set_ctrl("config_change", int(kind))
        db = self._vop.page.h2c_config_db
        try:
            if 0 <= db < H2C_DOORBELLS:
                self.config_interrupts += 1
                self._vop._ring(db)
            try:
                async with asyncio.timeout(limit):
                    while not v.ctrl("guest_ack"):
                        self._ctrl_event.clear()
                        # The card rings c2h after guest_ack; re-check every
                        # 100 ms anyway for a card that does not (Linux polls).
                        try:
                            async with asyncio.timeout(0.1):
                                await self._ctrl_event.wait()
                        except TimeoutError:
                            pass
            except TimeoutError as e:
                raise MicTimeoutError(
                    f"{self.name}: card did not acknowledge config change {kind.name} "
                    f"within {limit} s"
                ) from e
        finally:
            v.set_ctrl("config_change", 0)
            v.set_ctrl("guest_ack", 0)

    # -- resets ----------------------------------------------------------------
    async def _drain(self) -> None:
        try:
            async with asyncio.timeout(self._vop.drain_timeout):
                for ep in self.endpoints:
                    await ep.drain()
        except TimeoutError:
            self.log.warning(
                "%s: backend still holds stale requests after %s s; resetting anyway",
                self.name,
                self._vop.drain_timeout,
            )

    def _zero_rings(self) -> None:
        """Zero each host-RAM vring and ``info.avail_idx`` (the magic stays).

        Linux zeroes the vringh indices and ``avail_idx`` on reset, and the
        ring core's ``reset()`` does not clear ``used.idx`` in memory, so this
        must. A used ring the card moved into card RAM is left alone: the card
        may already have freed that memory, and it zeroes a used ring itself
        whenever it allocates one.
        """
        ram = self._vop.host_ram
        for vr in self.vrings:
            ram[vr.offset : vr.info + 2] = bytes(vr.info + 2 - vr.offset)

    def _forget_used_rings(self) -> None:
        self._used = [v.default_used for v in self.vrings]
        for i, vr in enumerate(self.vrings):
            self.view.set_vq_used_address(i, vr.default_used)

    async def _vdev_reset(self) -> None:
        """The card asked for a reset (``vdev_reset = 1``): Linux ``vop_virtio_device_reset``."""
        try:
            self.resets += 1
            self._stop_queues(EndpointState.IDLE, "device reset by the card")
            await self._drain()  # in-flight copies finish before we acknowledge
            self._zero_rings()
            self.machine.write_status(0)
            self.view.status = 0
            self._forget_used_rings()
            v = self.view
            v.set_ctrl("used_address_updated", 0)
            v.set_ctrl("vdev_reset", 0)
            v.set_ctrl("host_ack", 1)
            self.log.info("%s reset by the card", self.name)
        finally:
            self._resetting = False
        self._interrupt()

    async def _hard_reset(self) -> None:
        """The card is gone (crash/reset): fail everything, forget the card's state."""
        self.resets += 1
        self._stop_queues(EndpointState.IDLE, "card reset")
        await self._drain()
        self._zero_rings()
        self.machine.write_status(0)
        self._used = [v.default_used for v in self.vrings]
        self._resetting = False

    # -- removal ---------------------------------------------------------------
    async def _remove(self, limit: float) -> None:
        async with self._config_lock:
            self.state = VopDeviceState.REMOVING
            self._stop_queues(EndpointState.CLOSED, "device removed")
            await self._drain()
            if self.task is not None:
                self.task.cancel()
                await asyncio.gather(self.task, return_exceptions=True)
            listening = 0 <= self._vop.page.h2c_config_db < H2C_DOORBELLS
            try:
                if listening:
                    await self._config_handshake(MicConfigChange.DEV_REMOVE, limit)
            except MicTimeoutError:
                self.state = VopDeviceState.ZOMBIE
                raise
            finally:
                await self._close_backend()
            self.state = VopDeviceState.REMOVED

    async def _close_backend(self) -> None:
        try:
            await self.backend.aclose()
        except (OSError, MicError) as e:
            self.log.warning("closing backend %s: %s", self.name, e)

    # -- stats -----------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """A JSON-ready snapshot of this device."""
        return {
            "name": self.name,
            "type": self.device_type,
            "state": self.state.value,
            "status": self.machine.status,
            "dev_state": self.machine.state.value,
            "offered": self.offered,
            "features": self.machine.features,
            "slot": self.view.offset,
            "c2h_db": self.c2h_db,
            "h2c_db": self.view.ctrl("h2c_vdev_db"),
            "doorbells": self.doorbells,
            "card_interrupts": self.card_interrupts,
            "config_interrupts": self.config_interrupts,
            "errors": self.errors,
            "resets": self.resets,
            "last_error": self.last_error,
            "queues": [ep.stats() for ep in self.endpoints],
        }


# --------------------------------------------------------------------------
# per card


class Vop:
    """The VOP layer of one card: device page, devices, backends, doorbells.

    Use as ``async with Vop(platform) as vop:``; it owns every backend task
    and the handshake tasks and cancels them in :meth:`aclose`.
    """

    def __init__(
        self,
        platform: HostPlatform,
        *,
        c2h_doorbells: Sequence[int] = range(C2H_DOORBELLS),
        config_timeout: float = 10.0,
        remove_timeout: float = 15.0,
        drain_timeout: float = 5.0,
    ) -> None:
        """``c2h_doorbells``: card->host doorbells VOP may assign to devices.

        Raises:
            LocalProtocolError: host RAM too small, or bad doorbell numbers.
        """
        if not c2h_doorbells or any(not 0 <= d < C2H_DOORBELLS for d in c2h_doorbells):
            raise LocalProtocolError(f"c2h doorbells {list(c2h_doorbells)} outside 0..3")
        self.platform = platform
        self.host_ram = platform.host_ram
        if len(self.host_ram) < 2 * _PAGE:
            raise LocalProtocolError("host RAM must hold the device page and at least one ring")
        self.page = DevicePage(self.host_ram[:MIC_DP_SIZE])
        self.alloc = HostRamAllocator(_PAGE, len(self.host_ram) // _PAGE * _PAGE)
        self.config_timeout = config_timeout
        self.remove_timeout = remove_timeout
        self.drain_timeout = drain_timeout
        self._c2h = list(c2h_doorbells)
        self._devices: dict[str, VopDevice] = {}
        self._zombies: list[VopDevice] = []
        self._removing: dict[str, VopDevice] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.unknown_doorbells = 0
        self.ring_failures = 0

    async def __aenter__(self) -> Vop:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _in_host_ram(self, addr: int, length: int) -> bool:
        base = self.platform.host_ram_bus
        return addr < base + len(self.host_ram) and addr + length > base

    # -- tasks and doorbells -------------------------------------------------
    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        if self._closed:
            coro.close()
            return
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("VOP task %s failed: %r", task.get_name(), exc, exc_info=exc)

    def _ring(self, db: int) -> None:
        try:
            self.platform.ring_card(db)
        except (BrokenResourceError, MicError, OSError) as e:
            self.ring_failures += 1
            log.warning("ringing card doorbell %d failed: %s", db, e)

    def on_doorbell(self, db: int) -> None:
        """The card rang card->host doorbell ``db``: serve every device on it.

        Synchronous; call it on the event loop thread (from another thread:
        ``loop.call_soon_threadsafe(vop.on_doorbell, db)``). Never raises for
        anything the card did.
        """
        hit = False
        for dev in list(self._devices.values()):
            if dev.c2h_db == db:
                hit = True
                dev._on_doorbell()
        for dev in (*self._removing.values(), *self._zombies):
            if dev.c2h_db == db:
                dev._ctrl_event.set()
        if not hit:
            self.unknown_doorbells += 1

    # -- devices -----------------------------------------------------------------
    @property
    def devices(self) -> dict[str, VopDevice]:
        return dict(self._devices)

    def device(self, name: str) -> VopDevice:
        """Raises: LocalProtocolError: no such device."""
        try:
            return self._devices[name]
        except KeyError:
            raise LocalProtocolError(f"no device {name!r}") from None

    def _pick_c2h(self) -> int:
        load = dict.fromkeys(self._c2h, 0)
        for dev in (*self._devices.values(), *self._zombies):
            if dev.c2h_db in load:
                load[dev.c2h_db] += 1
        return min(self._c2h, key=lambda d: (load[d], d))

    def add_device(self, backend: Backend) -> VopDevice:
        """Put ``backend``'s device on the page, start its backend, tell the card.

        Allocates and zeroes the vrings in host RAM (legacy contiguous layout,
        4096-aligned used ring, ``_mic_vring_info`` after it), writes the entry
        with ``type`` last, and rings the card's config doorbell if it listens
        (hot add). Must be called with a running loop.

        Raises:
            LocalProtocolError: duplicate name, bad queue sizes or config size.
            ResourceError: no room on the device page or in host RAM.
        """
        if self._closed:
            raise LocalProtocolError("VOP is closed")
        name = backend.name
        if name in self._devices:
            raise LocalProtocolError(f"device {name!r} already exists")
        sizes = [int(n) for n in backend.queue_sizes()]
        if not 1 <= len(sizes) <= MAX_NUM_VQ:
            raise LocalProtocolError(f"{name}: {len(sizes)} queues, VOP allows 1..{MAX_NUM_VQ}")
        for n in sizes:
            if n <= 0 or n & (n - 1) or n > MAX_QUEUE_SIZE:
                raise LocalProtocolError(
                    f"{name}: queue size {n} not a power of two <= {MAX_QUEUE_SIZE}"
                )
        config = bytes(backend.config_bytes())
        dtype = int(backend.device_type)
        if not 0 < dtype < 128:
            raise LocalProtocolError(f"{name}: device type {dtype} outside 1..127")
        features = int(backend.features()) | HOST_TRANSPORT_FEATURES
        vrings: list[_Vring] = []
        try:
            for i, n in enumerate(sizes):
                size = vring_alloc_size(n)
                off = self.alloc.alloc(size)
                self.host_ram[off : off + size] = bytes(size)
                info = off + vring_info_offset(n)
                magic = info + _INFO_MAGIC
                self.host_ram[magic : magic + 4] = ((MIC_MAGIC + dtype + i) & 0xFFFFFFFF).to_bytes(
                    4, "little"
                )
                bus = self.platform.host_ram_bus + off
                vrings.append(_Vring(off, n, bus, SplitLayout.contiguous(bus, n).used, info))
            c2h = self._pick_c2h()
            entry = DeviceEntry(
                type=dtype,
                num_vq=len(sizes),
                feature_len=MAX_FEATURE_LEN,
                config_len=len(config),
                vqconfigs=tuple(VqConfig(v.bus, v.default_used, v.num) for v in vrings),
                config=config,
                host_features=features,
                c2h_vdev_db=c2h,
                h2c_vdev_db=-1,
            )
            view = self.page.add(entry)
        except (LocalProtocolError, ResourceError):
            for v in vrings:
                self.alloc.free(v.offset)
            raise
        dev = VopDevice(self, backend, view, vrings, c2h)
        self._devices[name] = dev
        dev.task = asyncio.get_running_loop().create_task(self._run_backend(dev), name=name)
        self._tasks.add(dev.task)
        dev.task.add_done_callback(self._task_done)
        log.info("added %s (type %d) at slot %#x, c2h db %d", name, dtype, view.offset, c2h)
        db = self.page.h2c_config_db
        if 0 <= db < H2C_DOORBELLS:
            self._ring(db)  # hot add: the card rescans the page
        return dev

    async def _run_backend(self, dev: VopDevice) -> None:
        try:
            await dev.backend.run(dev)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a plug-in's bug must not take the daemon down
            dev.errors += 1
            dev.last_error = f"backend crashed: {e!r}"
            dev.log.exception("backend %s crashed", dev.name)

    async def remove_device(self, name: str, *, ack_timeout: float | None = None) -> None:
        """Hot-remove ``name``: stop its backend, fail in-flight requests, run the
        DEV_REMOVE handshake (``config_change = 1``, wait ``guest_ack``), free
        the rings and mark the slot ``type = -1``.

        Raises:
            LocalProtocolError: no such device.
            MicTimeoutError: the card did not acknowledge; the device is gone
                from the host's list, but its slot and rings stay reserved
                (the card may still use them) until :meth:`reset_all`.
        """
        dev = self.device(name)
        del self._devices[name]
        self._removing[name] = dev
        try:
            await dev._remove(self.remove_timeout if ack_timeout is None else ack_timeout)
        except MicTimeoutError:
            self._zombies.append(dev)
            log.error("card did not acknowledge removal of %s; slot kept until reset", name)
            raise
        finally:
            del self._removing[name]
        self._release(dev)
        log.info("removed %s", name)

    def _release(self, dev: VopDevice) -> None:
        self.page.remove(dev.view)
        for v in dev.vrings:
            self.alloc.free(v.offset)

    async def reset_all(self) -> None:
        """The card crashed or was reset: reset every device, fail in-flight I/O,
        free what unacknowledged removals held, and rewrite the device page so
        the booting card finds every device fresh (status 0, no doorbells).
        """
        for z in self._zombies:
            self._release(z)
        self._zombies.clear()
        devs = list(self._devices.values())
        await asyncio.gather(*(d._hard_reset() for d in devs))
        configs = [d.view.config for d in devs]
        self.page.reset()
        for d, config in zip(devs, configs, strict=True):
            entry = DeviceEntry(
                type=d.device_type,
                num_vq=len(d.vrings),
                feature_len=MAX_FEATURE_LEN,
                config_len=len(config),
                vqconfigs=tuple(VqConfig(v.bus, v.default_used, v.num) for v in d.vrings),
                config=config,
                host_features=d.offered,
                c2h_vdev_db=d.c2h_db,
                h2c_vdev_db=-1,
            )
            d.view = self.page.add(entry)
        log.info("device page rewritten after card reset (%d devices)", len(devs))

    def stats(self) -> dict[str, Any]:
        """Per device, per queue counters as plain dicts (JSON-ready)."""
        return {
            "h2c_config_db": self.page.h2c_config_db,
            "device_page_free": self.page.free_bytes,
            "host_ram_free": self.alloc.free_bytes,
            "unknown_doorbells": self.unknown_doorbells,
            "ring_failures": self.ring_failures,
            "devices": {name: d.stats() for name, d in self._devices.items()},
            "zombies": [d.name for d in self._zombies],
        }

    async def aclose(self) -> None:
        """Stop every backend and handshake task and close the backends."""
        if self._closed:
            return
        self._closed = True
        for dev in self._devices.values():
            dev._stop_queues(EndpointState.CLOSED, "VOP closed")
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for dev in (*self._devices.values(), *self._zombies):
            await dev._close_backend()
