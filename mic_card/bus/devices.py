"""The card's virtio bus: discovers devices on the host's device page and binds drivers.

Owns :class:`VirtioBus`: reading the boot parameters, picking the config
doorbell, walking the device page (Linux ``vop_main.c`` ``vop_scan_devices``,
``vop_add_device``), probing and binding a driver per device from the driver
table its caller gives it, answering the host's config changes and hot
removals (through the card half of :mod:`virtio.handshake`, one
:class:`~mic_card.bus.device.CardDevice` each), vdev resets, and the queries
the card OS serves (devices, drivers, waiting for a hot-added device).

Everything the host wrote is parsed with :mod:`virtio.layouts` and either
succeeds or raises :class:`~virtio.errors.RemoteProtocolError`: a malformed
entry is logged and skipped (or, when its size cannot be trusted, ends the
walk), a device that fails its handshake is logged and left unbound; the bus
itself never falls over.

Must not import the drivers (the caller passes ``drivers=``), ``transport``
(the platform is :class:`~mic_card.bus.device.CardPlatform`) or ``mic_host``.
Runs on the card's event loop thread: call :meth:`VirtioBus.on_doorbell` there.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from mic_card.bus.device import CARD_TRANSPORT_FEATURES, CardDevice, CardPlatform, DriverFactory
from mic_card.bus.table import DriverTable
from virtio.constants import MIC_DP_SIZE, DeviceStatus, DeviceType, MicConfigChange
from virtio.devpage import BOOT_H2C_CONFIG_DB, C2H_DOORBELLS, H2C_DOORBELLS, EntryView
from virtio.errors import (
    BrokenResourceError,
    ClosedResourceError,
    LocalProtocolError,
    MicError,
    MicTimeoutError,
    RemoteProtocolError,
    ResourceError,
)
from virtio.handshake import (
    CardHandshake,
    ConfigChanged,
    ConfigDoorbell,
    Handled,
    Publish,
    PublishStatus,
    PublishType,
    PublishUsedAddress,
    RemoveDevice,
    RingPeer,
    publish,
)
from virtio.layouts import DeviceEntry, iter_device_page, parse_bootparam

__all__ = ["VirtioBus"]

log = logging.getLogger("mic_card.bus")


def _ident(entry: DeviceEntry) -> tuple[int, ...]:
    """What identifies an entry across rescans (not the fields the card itself writes)."""
    dims = (entry.type, entry.num_vq, entry.feature_len, entry.config_len)
    return dims + tuple(x for v in entry.vqconfigs for x in (v.address, v.num))


_PREFIX = {int(DeviceType.BLOCK): "vd", int(DeviceType.CONSOLE): "hvc", int(DeviceType.NET): "eth"}


class VirtioBus:
    """The card's view of the device page: scan, probe, bind, hot add/remove, reset.

    Use as ``async with VirtioBus(platform, drivers=DRIVERS) as bus:``.
    ``drivers`` maps a device type to a driver factory: the card OS passes a
    :class:`~mic_card.bus.table.DriverTable` (built-ins and plug-ins, by name,
    from :func:`mic_card.drivers.plugins.load_driver_table`); a plain dict
    such as :data:`mic_card.drivers.DRIVERS` works too. The bus never imports
    the drivers. Options:
    ``used_in_card`` moves every used ring into card RAM (the Linux used-ring
    trick); ``h2c_doorbells`` are the host->card doorbells the card may pick;
    ``timeout`` bounds every handshake (Linux: 10 s);
    ``extra_acks`` is a fault-injection hook (bits acked beyond the offer).
    """

    def __init__(
        self,
        platform: CardPlatform,
        *,
        drivers: Mapping[int, DriverFactory],
        used_in_card: bool = False,
        h2c_doorbells: Sequence[int] = range(H2C_DOORBELLS),
        timeout: float = 10.0,
        indirect_max: int = 8,
        extra_acks: int = 0,
    ) -> None:
        if not h2c_doorbells or any(not 0 <= d < H2C_DOORBELLS for d in h2c_doorbells):
            raise LocalProtocolError(f"h2c doorbells {list(h2c_doorbells)} outside 0..15")
        self._platform = platform
        self.used_in_card = used_in_card
        self._timeout = timeout
        self._indirect_max = indirect_max
        self._extra_acks = extra_acks
        self._h2c = list(h2c_doorbells)
        self._drivers = DriverTable.from_mapping(drivers)
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

    # -- BusOwner (what a CardDevice uses) ------------------------------------------
    @property
    def platform(self) -> CardPlatform:
        return self._platform

    @property
    def timeout(self) -> float:
        return self._timeout

    @property
    def indirect_max(self) -> int:
        return self._indirect_max

    @property
    def extra_acks(self) -> int:
        return self._extra_acks

    @property
    def drivers(self) -> DriverTable:
        """The driver table: every known driver by name, the serving one per type."""
        return self._drivers

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
            dev.unbind(BrokenResourceError("virtio bus closed"), "closed")
            dev.release()
        self._by_offset.clear()

    def fail_all(self, exc: BrokenResourceError) -> None:
        """The host is gone: fail every outstanding request and detach every driver.

        Card RAM is not freed (the host might still be reading it); the process
        is about to end anyway.
        """
        for dev in list(self._by_offset.values()):
            if dev.state == "live":
                dev.unbind(exc, "failed")

    # -- doorbells ----------------------------------------------------------------------
    def ring(self, db: int) -> None:
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
                dev.on_interrupt()

    def pick_h2c(self) -> int:
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
                    else:
                        self._config_request(dev)
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
        view = EntryView(self._dp, offset, entry.num_vq, entry.feature_len, entry.config_len)
        hs = CardHandshake(view)
        try:
            if not any(isinstance(a, RemoveDevice) for a in hs.receive(ConfigDoorbell())):
                return
            actions = hs.receive(Handled())
        except RemoteProtocolError as e:
            self.scan_errors += 1
            log.error("device at %#x: %s", offset, e)
            return
        for a in actions:
            match a:
                case Publish() | PublishStatus() | PublishType() | PublishUsedAddress():
                    publish(view, a)
                case RingPeer() if 0 <= entry.c2h_vdev_db < C2H_DOORBELLS:
                    self.ring(entry.c2h_vdev_db)

    async def _probe(
        self, offset: int, entry: DeviceEntry, ident: tuple[int, ...], name: str = ""
    ) -> CardDevice | None:
        factory = self._drivers.get(entry.type)
        if factory is None:
            log.error("device at %#x: no driver for type %d; skipped", offset, entry.type)
            self._failed[offset] = ident
            return None
        dev = CardDevice(self, self._dp, offset, entry)
        dev.used_in_card = self.used_in_card
        dev.name = name or self._new_name(entry.type)
        self._by_offset[offset] = dev
        try:
            # A driver whose acks depend on the device (config space, boot
            # parameters: virtio-net's mode) says so with supported_features(dev).
            pick = getattr(factory, "supported_features", None)
            own = pick(dev) if pick is not None else getattr(factory, "FEATURES", 0)
            supported = int(own) | CARD_TRANSPORT_FEATURES
            await dev.probe(supported)
            dev.driver = factory(dev)
        except (RemoteProtocolError, MicTimeoutError, ResourceError) as e:
            dev.error = str(e)
            log.error("probe of %s (type %d at %#x) failed: %s", dev.name, dev.type, offset, e)
            dev.unbind(BrokenResourceError(str(e)), "failed")
            if not isinstance(e, MicTimeoutError):
                dev.status = dev.status | DeviceStatus.FAILED
                dev._notify_host()
            dev.release()
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
    def _config_request(self, dev: CardDevice) -> None:
        """The host may have asked something of ``dev`` (``config_change``): answer it."""
        try:
            asked = dev.act(dev.hs.receive(ConfigDoorbell()))
        except RemoteProtocolError as e:
            self.scan_errors += 1
            log.error("%s: %s", dev.name, e)
            return
        for a in asked:
            match a:
                case RemoveDevice():
                    self._remove(dev)
                case ConfigChanged():
                    self._config_change(dev)

    def _config_change(self, dev: CardDevice) -> None:
        try:
            if dev.status & DeviceStatus.DEVICE_NEEDS_RESET and dev.state == "live":
                log.error("%s: host set DEVICE_NEEDS_RESET; requests failed until reset", dev.name)
                dev.unbind(BrokenResourceError(f"{dev.name} needs reset"), "needs_reset")
            elif dev.driver is not None and dev.state == "live":
                dev.driver.config_changed()
        finally:
            dev.act(dev.hs.receive(Handled()))  # guest_ack = 1, ring

    def _remove(self, dev: CardDevice) -> None:
        """DEV_REMOVE (Linux ``_vop_remove_device``): unbind, h2c -1, guest_ack, type -1."""
        dev.unbind(BrokenResourceError(f"{dev.name} was removed"), "removed")
        dev.release()
        del self._by_offset[dev.offset]
        dev.act(dev.hs.receive(Handled()))
        self._signal()
        log.info("%s removed by the host", dev.name)

    def _drop(self, dev: CardDevice, why: str) -> None:
        dev.unbind(BrokenResourceError(f"{dev.name}: {why}"), "removed")
        dev.release()
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
            dev.unbind(BrokenResourceError(f"{name} is being reset"), "resetting")
            try:
                await dev.vdev_reset()
            finally:
                dev.release()
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
