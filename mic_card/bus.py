"""The card's virtio bus: discovers devices on the host's device page and binds drivers.

Follows Linux ``drivers/misc/mic/vop/vop_main.c`` (``vop_scan_devices``,
``vop_add_device``, ``vop_find_vqs``, ``vop_reset``) and the virtio core's
probe sequence (virtio 1.2 §3.1.1), with the protocol extensions documented in
:mod:`mic_host.vop` (status writes acknowledged through ``host_ack``, doorbells
instead of polling, polling kept as a fallback).

Everything the host wrote is parsed with :mod:`virtio.layouts` and either
succeeds or raises :class:`~virtio.errors.RemoteProtocolError`: a malformed
entry is logged and skipped (or, when its size cannot be trusted, ends the
walk), a device that fails its handshake is logged and left unbound; the bus
itself never falls over.

Must not import ``transport`` (the platform is the :class:`CardPlatform`
protocol) or ``mic_host``. Runs on the card's event loop thread: call
:meth:`VirtioBus.on_doorbell` there.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar, Protocol

from mic_card.endpoint import DriverEndpoint, Request
from virtio.constants import (
    MIC_DP_SIZE,
    MIC_MAGIC,
    MIC_VIRTIO_RING_ALIGN,
    DeviceStatus,
    DeviceType,
    Feature,
    MicConfigChange,
)
from virtio.devpage import (
    BOOT_H2C_CONFIG_DB,
    C2H_DOORBELLS,
    H2C_DOORBELLS,
    MAX_QUEUE_SIZE,
    TRANSPORT_FEATURES,
    EntryView,
    vring_info_offset,
)
from virtio.errors import (
    BrokenResourceError,
    ClosedResourceError,
    LocalProtocolError,
    MicError,
    MicTimeoutError,
    RemoteProtocolError,
    ResourceError,
)
from virtio.layouts import (
    DeviceEntry,
    MicVringInfo,
    field_offset,
    iter_device_page,
    parse_bootparam,
)
from virtio.memory import FirstFitAllocator, Memory
from virtio.split import DESC_SIZE, DriverQueue, SplitLayout

__all__ = [
    "CARD_TRANSPORT_FEATURES",
    "CardDevice",
    "CardPlatform",
    "CardRamAllocator",
    "Driver",
    "VirtioBus",
]

log = logging.getLogger(__name__)

#: Transport features the card's virtio core supports.
CARD_TRANSPORT_FEATURES = TRANSPORT_FEATURES
_POLL = 0.05  # fallback re-check period while waiting for a handshake


class CardPlatform(Protocol):
    """What the bus needs from the PCIe emulation (``transport``), card side."""

    @property
    def mem(self) -> Memory:
        """Card-physical memory: card RAM and host RAM through SMPT windows."""

    @property
    def dp_address(self) -> int:
        """Card-physical address of the device page (from SPAD14/15)."""

    def card_ram_alloc(self, size: int, align: int) -> int:
        """Allocate card RAM; returns its card-physical address."""

    def card_ram_free(self, addr: int) -> None:
        """Free what :meth:`card_ram_alloc` returned."""

    def ring_host(self, db: int) -> None:
        """Ring card->host doorbell ``db`` (0..3)."""


class CardRamAllocator(FirstFitAllocator):
    """First-fit allocator over card-physical ``[start, end)`` (a card process's heap),
    in 64 B granules (the X100 DMA granule)."""

    GRANULE = 64

    def __init__(self, start: int, end: int) -> None:
        """Raises: LocalProtocolError: an empty or misaligned range."""
        if end <= start:
            raise LocalProtocolError(f"bad card RAM range [{start:#x}, {end:#x})")
        super().__init__(start, end, granule=self.GRANULE, what="card RAM")


class Driver(Protocol):
    """A card virtio driver bound to one :class:`CardDevice`.

    Constructed with the live device (queues set up, DRIVER_OK written).
    ``FEATURES`` are the device-specific bits it supports; a driver whose acks
    depend on the device may instead define a classmethod
    ``supported_features(dev: CardDevice) -> int`` (called before FEATURES_OK,
    config space and ``dev.bus.params`` readable; it may raise
    RemoteProtocolError).
    """

    FEATURES: ClassVar[int]

    def config_changed(self) -> None:
        """The host changed the config space (``config_change = 2``)."""

    def detach(self, exc: BrokenResourceError) -> None:
        """The device is going away (removed, reset, NEEDS_RESET): stop, fail waiters."""


DriverFactory = Callable[["CardDevice"], Driver]


def _default_drivers() -> dict[int, Any]:
    mod = importlib.import_module("mic_card.drivers")
    drivers: dict[int, Any] = mod.DRIVERS
    return drivers


# --------------------------------------------------------------------------
# a device


def _ident(entry: DeviceEntry) -> tuple[int, ...]:
    """What identifies an entry across rescans (not the fields the card itself writes)."""
    dims = (entry.type, entry.num_vq, entry.feature_len, entry.config_len)
    return dims + tuple(x for v in entry.vqconfigs for x in (v.address, v.num))


class CardDevice:
    """One device the bus found: entry accessors, handshakes, queues, bound driver.

    Drivers use :attr:`endpoints`, :attr:`features`, :meth:`read_config`,
    :meth:`alloc`/:meth:`free` (card RAM) and :attr:`mem`.
    """

    def __init__(self, bus: VirtioBus, offset: int, entry: DeviceEntry) -> None:
        self.bus = bus
        self.offset = offset
        self.type = entry.type
        self.num_vq = entry.num_vq
        self.feature_len = entry.feature_len
        self.config_len = entry.config_len
        self.queue_sizes = [v.num for v in entry.vqconfigs]
        self.name = ""
        self.state = "probing"
        self.features = 0
        self.offered = entry.host_features
        self.h2c_db = -1
        self.c2h_db = -1
        self.endpoints: list[DriverEndpoint] = []
        self.driver: Driver | None = None
        self.used_in_card = False
        self.error = ""
        self._allocs: list[int] = []
        self._event = asyncio.Event()
        #: live accessors to the entry (dimensions from our validated parse)
        self.view = EntryView(bus._dp, offset, entry.num_vq, entry.feature_len, entry.config_len)
        self._mv = self.view.raw

    # -- accessors (offsets from the parsed dimensions) ---------------------------
    @property
    def mem(self) -> Memory:
        return self.bus.platform.mem

    @property
    def status(self) -> int:
        return self.view.status

    @status.setter
    def status(self, value: int) -> None:
        self.view.status = value

    @property
    def entry_type(self) -> int:
        return self.view.device_type

    def ctrl(self, name: str) -> int:
        return self.view.ctrl(name)

    def set_ctrl(self, name: str, value: int) -> None:
        self.view.set_ctrl(name, value)

    def host_features(self) -> int:
        return self.view.host_features

    def _write_acks(self, acks: int) -> None:
        self.view.guest_acks = acks

    def read_config(self) -> bytes:
        """The device's config space as it is now (one copy)."""
        return self.view.config

    def alloc(self, size: int, align: int = 64) -> int:
        """Card RAM for buffers (card-physical address)."""
        return self.bus.platform.card_ram_alloc(size, align)

    def free(self, addr: int) -> None:
        self.bus.platform.card_ram_free(addr)

    # -- doorbells and waits ----------------------------------------------------------
    def _notify_host(self) -> None:
        if 0 <= self.c2h_db < C2H_DOORBELLS:
            self.bus._ring(self.c2h_db)

    def _on_interrupt(self) -> None:
        self._event.set()
        for ep in self.endpoints:
            ep.on_interrupt()

    async def _wait(self, pred: Callable[[], bool], what: str) -> None:
        timeout = self.bus.timeout
        try:
            async with asyncio.timeout(timeout):
                while not pred():
                    self._event.clear()
                    try:
                        async with asyncio.timeout(_POLL):
                            await self._event.wait()
                    except TimeoutError:
                        pass
        except TimeoutError as e:
            raise MicTimeoutError(
                f"{self.name or self.offset}: host did not {what} in {timeout} s"
            ) from e

    async def _set_status(self, value: int) -> int:
        """Write ``status`` and wait for the host to apply it; return the status re-read."""
        self.set_ctrl("host_ack", 0)
        self.status = value
        self._notify_host()
        await self._wait(lambda: self.ctrl("host_ack") == 1, f"acknowledge status {value:#x}")
        return self.status

    async def vdev_reset(self) -> None:
        """Linux ``vop_reset``: ``host_ack = 0``, ``vdev_reset = 1``, ring, wait ``host_ack``.

        Raises:
            MicTimeoutError: the host did not acknowledge.
        """
        self.set_ctrl("host_ack", 0)
        self.set_ctrl("vdev_reset", 1)
        self._notify_host()
        await self._wait(lambda: self.ctrl("host_ack") == 1, "acknowledge the reset")
        self.status = 0
        self.features = 0

    # -- probe ------------------------------------------------------------------------
    async def _probe(self, supported: int) -> None:
        """Status ACK -> DRIVER -> acks -> FEATURES_OK -> queues -> DRIVER_OK.

        Raises:
            RemoteProtocolError: refused features, bad vring, NEEDS_RESET.
            MicTimeoutError: the host did not answer a handshake.
            ResourceError: out of card RAM.
        """
        bus = self.bus
        c2h = self.ctrl("c2h_vdev_db")
        if not 0 <= c2h < C2H_DOORBELLS:
            raise RemoteProtocolError(f"c2h_vdev_db {c2h} outside 0..3", reason="device-page")
        self.c2h_db = c2h
        self.h2c_db = bus._pick_h2c()
        self.set_ctrl("h2c_vdev_db", self.h2c_db)
        if self.status != 0:  # left over from an earlier boot: start clean
            await self.vdev_reset()
        S = DeviceStatus
        st = await self._set_status(S.ACKNOWLEDGE)
        st = await self._set_status(S.ACKNOWLEDGE | S.DRIVER)
        self.offered = self.host_features()
        acks = (self.offered & supported) | bus.extra_acks
        self._write_acks(acks)
        st = await self._set_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK)
        if not st & S.FEATURES_OK:
            raise RemoteProtocolError(
                f"host refused features {acks:#x} (offered {self.offered:#x})", reason="features"
            )
        self.features = acks
        self._setup_queues()
        if self.used_in_card:
            self.set_ctrl("used_address_updated", 1)
            self._notify_host()
            await self._wait(
                lambda: self.ctrl("used_address_updated") == 0, "take the card's used rings"
            )
        st = await self._set_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK)
        if st & S.DEVICE_NEEDS_RESET or not st & S.DRIVER_OK:
            raise RemoteProtocolError(f"host did not accept DRIVER_OK (status {st:#x})")
        self.state = "live"

    def _setup_queues(self) -> None:
        bus = self.bus
        mem = self.mem
        imax = bus.indirect_max if self.features & Feature.INDIRECT_DESC else 0
        for i in range(self.num_vq):
            addr = self.view.vq_address(i)
            num = self.view.vq_num(i)
            if num <= 0 or num & (num - 1) or num > MAX_QUEUE_SIZE:
                raise RemoteProtocolError(f"vq {i}: size {num} not a power of two <= 256")
            info = addr + vring_info_offset(num)
            try:
                magic = int.from_bytes(
                    mem.view(info + field_offset(MicVringInfo, "magic"), 4), "little"
                )
            except MicError as e:
                raise RemoteProtocolError(f"vq {i}: vring at {addr:#x} unreachable: {e}") from e
            want = (MIC_MAGIC + self.type + i) & 0xFFFFFFFF
            if magic != want:
                raise RemoteProtocolError(
                    f"vq {i}: vring magic {magic:#x}, want {want:#x}", reason="vring-magic"
                )
            layout = SplitLayout.contiguous(addr, num, MIC_VIRTIO_RING_ALIGN)
            if self.used_in_card:
                used = self._alloc(layout.used_bytes, 4096)
                mem.view(used, layout.used_bytes, True)[:] = bytes(layout.used_bytes)
                layout = SplitLayout(num, layout.desc, layout.avail, used)
                self.view.set_vq_used_address(i, used)
            n_ind = min(imax, num)
            area = self._alloc(num * n_ind * DESC_SIZE, 64) if n_ind > 1 else None
            try:
                q: DriverQueue[Request] = DriverQueue(
                    mem,
                    layout,
                    self.features,
                    indirect_area=area,
                    indirect_max=n_ind if area is not None else 0,
                )
            except LocalProtocolError as e:
                raise RemoteProtocolError(f"vq {i}: host gave an unusable ring: {e}") from e
            self.endpoints.append(
                DriverEndpoint(q, self._notify_host, i, indirect_max=n_ind if area else 0)
            )

    def _alloc(self, size: int, align: int) -> int:
        addr = self.bus.platform.card_ram_alloc(size, align)
        self._allocs.append(addr)
        return addr

    def _unbind(self, exc: BrokenResourceError, state: str) -> None:
        """Fail everything outstanding and detach the driver (host state untouched)."""
        self.state = state
        for ep in self.endpoints:
            ep.fail(exc)
        if self.driver is not None:
            self.driver.detach(exc)

    def _release(self) -> None:
        """Free the card RAM this device holds (after the host stopped using it)."""
        self.endpoints = []
        for addr in self._allocs:
            self.bus.platform.card_ram_free(addr)
        self._allocs.clear()

    def info(self) -> dict[str, Any]:
        """A plain-dict description (JSON-ready)."""
        return {
            "name": self.name,
            "type": self.type,
            "offset": self.offset,
            "state": self.state,
            "status": self.status,
            "offered": self.offered,
            "features": self.features,
            "queue_sizes": list(self.queue_sizes),
            "h2c_db": self.h2c_db,
            "c2h_db": self.c2h_db,
            "used_in_card": self.used_in_card,
            "driver": type(self.driver).__name__ if self.driver is not None else None,
            "driver_info": _driver_info(self.driver),
            "error": self.error,
            "queues": [ep.stats() for ep in self.endpoints],
        }


def _driver_info(driver: Driver | None) -> dict[str, Any] | None:
    """The driver's own ``info()`` (net: mode, namespace, counters), when it has one."""
    info = getattr(driver, "info", None)
    if not callable(info):
        return None
    try:
        result = info()
    except MicError as e:
        return {"error": str(e)}
    return result if isinstance(result, dict) else None


# --------------------------------------------------------------------------
# the bus


_PREFIX = {int(DeviceType.BLOCK): "vd", int(DeviceType.CONSOLE): "hvc", int(DeviceType.NET): "eth"}


class VirtioBus:
    """The card's view of the device page: scan, probe, bind, hot add/remove, reset.

    Use as ``async with VirtioBus(platform) as bus:``. Options:
    ``used_in_card`` moves every used ring into card RAM (the Linux used-ring
    trick); ``h2c_doorbells`` are the host->card doorbells the card may pick;
    ``timeout`` bounds every handshake (Linux: 10 s); ``drivers`` maps a
    device type to a driver factory (default :data:`mic_card.drivers.DRIVERS`);
    ``extra_acks`` is a fault-injection hook (bits acked beyond the offer).
    """

    def __init__(
        self,
        platform: CardPlatform,
        *,
        used_in_card: bool = False,
        h2c_doorbells: Sequence[int] = range(H2C_DOORBELLS),
        timeout: float = 10.0,
        drivers: dict[int, Any] | None = None,
        indirect_max: int = 8,
        extra_acks: int = 0,
    ) -> None:
        if not h2c_doorbells or any(not 0 <= d < H2C_DOORBELLS for d in h2c_doorbells):
            raise LocalProtocolError(f"h2c doorbells {list(h2c_doorbells)} outside 0..15")
        self.platform = platform
        self.used_in_card = used_in_card
        self.timeout = timeout
        self.indirect_max = indirect_max
        self.extra_acks = extra_acks
        self._h2c = list(h2c_doorbells)
        self._drivers = drivers
        self._dp: memoryview = memoryview(b"")
        self.config_db = -1
        self._by_offset: dict[int, CardDevice] = {}
        self._failed: dict[int, tuple[int, ...]] = {}  # offset -> identity that failed
        self._scan_lock = asyncio.Lock()
        self._config_event = asyncio.Event()
        self._changed = asyncio.Event()  # set (and replaced) whenever a device binds or goes
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.scans = 0
        self.scan_errors = 0
        #: Boot parameters drivers read (the card OS sets them; ``params["net"]``).
        self.params: dict[str, Any] = {}

    async def __aenter__(self) -> VirtioBus:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- start/stop -------------------------------------------------------------------
    async def start(self) -> None:
        """Check the boot parameters, pick the config doorbell, probe every device.

        Raises:
            RemoteProtocolError: the device page is unreachable or its magic is wrong.
        """
        mem = self.platform.mem
        try:
            self._dp = mem.view(self.platform.dp_address, MIC_DP_SIZE, True)
        except MicError as e:
            raise RemoteProtocolError(f"device page unreachable: {e}", reason="device-page") from e
        parse_bootparam(self._dp)
        self.config_db = self._h2c[0]
        self._dp[BOOT_H2C_CONFIG_DB] = self.config_db & 0xFF
        await self.rescan()
        self._task = asyncio.get_running_loop().create_task(self._config_loop(), name="virtio-bus")

    async def aclose(self) -> None:
        """Stop listening, fail every outstanding request, free card RAM."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._dp:
            self._dp[BOOT_H2C_CONFIG_DB] = 0xFF  # no longer listening
        for dev in list(self._by_offset.values()):
            dev._unbind(BrokenResourceError("virtio bus closed"), "closed")
            dev._release()
        self._by_offset.clear()

    def fail_all(self, exc: BrokenResourceError) -> None:
        """The host is gone: fail every outstanding request and detach every driver.

        Card RAM is not freed (the host might still be reading it); the process
        is about to end anyway.
        """
        for dev in list(self._by_offset.values()):
            if dev.state == "live":
                dev._unbind(exc, "failed")

    # -- doorbells ----------------------------------------------------------------------
    def _ring(self, db: int) -> None:
        try:
            self.platform.ring_host(db)
        except (MicError, OSError) as e:
            log.warning("ringing host doorbell %d failed: %s", db, e)

    def on_doorbell(self, db: int) -> None:
        """Host->card doorbell ``db`` fired. Synchronous; call on the card's loop thread."""
        if db == self.config_db:
            self._config_event.set()
        for dev in list(self._by_offset.values()):
            if dev.h2c_db == db:
                dev._on_interrupt()

    def _pick_h2c(self) -> int:
        choices = [d for d in self._h2c if d != self.config_db] or self._h2c
        load = dict.fromkeys(choices, 0)
        for dev in self._by_offset.values():
            if dev.h2c_db in load:
                load[dev.h2c_db] += 1
        return min(choices, key=lambda d: (load[d], d))

    async def _config_loop(self) -> None:
        while True:
            await self._config_event.wait()
            self._config_event.clear()
            try:
                await self.rescan()
            except MicError as e:  # the page itself is bad: log, keep listening
                self.scan_errors += 1
                log.error("device page rescan failed: %s", e)

    # -- scanning ---------------------------------------------------------------------
    def _walk(self) -> Iterator[tuple[int, DeviceEntry]]:
        """(offset, entry) per entry of a snapshot; logs and stops at a bad one.

        Raises:
            RemoteProtocolError: the boot parameters are bad (nothing to walk).
        """
        parse_bootparam(self._dp)
        try:
            yield from iter_device_page(self._dp)
        except RemoteProtocolError as e:
            # Its size cannot be trusted, so nothing after it can be found.
            self.scan_errors += 1
            log.error("skipping the rest of the device page: %s", e)

    async def rescan(self) -> None:
        """Walk the page: probe new devices, handle removal and config changes.

        Raises:
            RemoteProtocolError: the boot parameters are bad.
        """
        async with self._scan_lock:
            self.scans += 1
            seen: set[int] = set()
            for offset, entry in self._walk():
                seen.add(offset)
                dev = self._by_offset.get(offset)
                if dev is not None:
                    if entry.type != dev.type:  # host reused/removed it behind our back
                        self._drop(dev, "removed by the host")
                    elif entry.config_change == MicConfigChange.DEV_REMOVE:
                        self._remove(dev)
                    elif (
                        entry.config_change == MicConfigChange.CONFIG_CHANGE and not entry.guest_ack
                    ):
                        self._config_change(dev)
                    continue
                if entry.removed:
                    self._failed.pop(offset, None)
                    continue
                if entry.config_change == MicConfigChange.DEV_REMOVE:
                    # never bound here: just acknowledge (vop_scan_devices does the same)
                    self._ack_unbound_remove(offset, entry)
                    continue
                ident = _ident(entry)
                if self._failed.get(offset) == ident:
                    continue
                await self._probe(offset, entry, ident)
            for offset in [o for o in self._by_offset if o not in seen]:
                self._drop(self._by_offset[offset], "entry vanished from the page")

    def _ack_unbound_remove(self, offset: int, entry: DeviceEntry) -> None:
        if entry.guest_ack:
            return
        view = EntryView(self._dp, offset, entry.num_vq, entry.feature_len, entry.config_len)
        view.set_ctrl("h2c_vdev_db", -1)
        view.set_ctrl("guest_ack", 1)
        c2h = entry.c2h_vdev_db
        if 0 <= c2h < C2H_DOORBELLS:
            self._ring(c2h)

    def _driver_for(self, dtype: int) -> Any:
        drivers = self._drivers if self._drivers is not None else _default_drivers()
        return drivers.get(dtype)

    async def _probe(
        self, offset: int, entry: DeviceEntry, ident: tuple[int, ...], name: str = ""
    ) -> CardDevice | None:
        factory = self._driver_for(entry.type)
        if factory is None:
            log.error("device at %#x: no driver for type %d; skipped", offset, entry.type)
            self._failed[offset] = ident
            return None
        dev = CardDevice(self, offset, entry)
        dev.used_in_card = self.used_in_card
        dev.name = name or self._new_name(entry.type)
        self._by_offset[offset] = dev
        try:
            # A driver whose acks depend on the device (config space, boot
            # parameters: virtio-net's mode) says so with supported_features(dev).
            pick = getattr(factory, "supported_features", None)
            own = pick(dev) if pick is not None else getattr(factory, "FEATURES", 0)
            supported = int(own) | CARD_TRANSPORT_FEATURES
            await dev._probe(supported)
            dev.driver = factory(dev)
        except (RemoteProtocolError, MicTimeoutError, ResourceError) as e:
            dev.error = str(e)
            log.error("probe of %s (type %d at %#x) failed: %s", dev.name, dev.type, offset, e)
            dev._unbind(BrokenResourceError(str(e)), "failed")
            if not isinstance(e, MicTimeoutError):
                dev.status = dev.status | DeviceStatus.FAILED
                dev._notify_host()
            dev._release()
            del self._by_offset[offset]
            self._failed[offset] = ident
            return None
        log.info("%s: type %d bound to %s", dev.name, dev.type, type(dev.driver).__name__)
        self._signal()
        return dev

    def _signal(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _new_name(self, dtype: int) -> str:
        taken = {d.name for d in self._by_offset.values()}
        prefix = _PREFIX.get(dtype, f"virtio{dtype}-")
        i = 0
        while True:
            name = f"{prefix}{chr(ord('a') + i)}" if prefix == "vd" and i < 26 else f"{prefix}{i}"
            if name not in taken:
                return name
            i += 1

    # -- config change, removal, reset ----------------------------------------------------
    def _config_change(self, dev: CardDevice) -> None:
        if dev.status & DeviceStatus.DEVICE_NEEDS_RESET and dev.state == "live":
            log.error("%s: host set DEVICE_NEEDS_RESET; requests failed until reset", dev.name)
            dev._unbind(BrokenResourceError(f"{dev.name} needs reset"), "needs_reset")
        elif dev.driver is not None and dev.state == "live":
            dev.driver.config_changed()
        dev.set_ctrl("guest_ack", 1)
        dev._notify_host()

    def _remove(self, dev: CardDevice) -> None:
        """DEV_REMOVE (Linux ``_vop_remove_device``): unbind, h2c -1, guest_ack, type -1."""
        dev._unbind(BrokenResourceError(f"{dev.name} was removed"), "removed")
        dev.set_ctrl("h2c_vdev_db", -1)
        dev._release()
        del self._by_offset[dev.offset]
        dev.set_ctrl("guest_ack", 1)
        dev.view.device_type = DeviceType.REMOVED
        dev._notify_host()
        self._signal()
        log.info("%s removed by the host", dev.name)

    def _drop(self, dev: CardDevice, why: str) -> None:
        dev._unbind(BrokenResourceError(f"{dev.name}: {why}"), "removed")
        dev._release()
        del self._by_offset[dev.offset]
        self._signal()
        log.warning("%s dropped: %s", dev.name, why)

    async def reset_device(self, name: str) -> CardDevice | None:
        """Reset ``name`` (vdev reset handshake) and probe it again under the same name.

        Returns the new device, or None if the re-probe failed (logged).

        Raises:
            LocalProtocolError: no such device.
            MicTimeoutError: the host did not acknowledge the reset (the
                device stays unbound).
        """
        async with self._scan_lock:
            dev = self.device(name)
            dev._unbind(BrokenResourceError(f"{name} is being reset"), "resetting")
            try:
                await dev.vdev_reset()
            finally:
                dev._release()
                del self._by_offset[dev.offset]
            entry = DeviceEntry.parse(bytes(self._dp), dev.offset)
            return await self._probe(dev.offset, entry, _ident(entry), name=name)

    # -- queries -------------------------------------------------------------------------
    def device(self, name: str) -> CardDevice:
        """Raises: LocalProtocolError: no device of that name."""
        for dev in self._by_offset.values():
            if dev.name == name:
                return dev
        raise LocalProtocolError(f"no device {name!r}")

    async def wait_device(self, name: str) -> CardDevice:
        """Wait until a device called ``name`` is bound (e.g. after a hot add).

        Bound it with ``asyncio.timeout``.
        """
        while True:
            for dev in self._by_offset.values():
                if dev.name == name and dev.driver is not None:
                    return dev
            await self._changed.wait()

    def driver(self, name: str) -> Any:
        """The driver bound to ``name`` (e.g. a BlockDevice).

        Raises:
            LocalProtocolError: no such device.
            ClosedResourceError: no driver bound (probe failed or device down).
        """
        dev = self.device(name)
        if dev.driver is None:
            raise ClosedResourceError(f"{name} has no driver bound ({dev.state})")
        return dev.driver

    def devices(self) -> list[dict[str, Any]]:
        """Every bound device as a plain dict (name, type, features, queue sizes, status...)."""
        return [d.info() for d in sorted(self._by_offset.values(), key=lambda d: d.offset)]
