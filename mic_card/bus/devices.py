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

from mic_card.bus.binding import RuntimeBinding, entry_ident
from mic_card.bus.device import CardDevice, CardPlatform, DriverFactory
from mic_card.bus.registry import (
    DriverEntry,
    DriverProbeError,
    DriverRegistry,
    device_type_name,
)
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


_PREFIX = {int(DeviceType.BLOCK): "vd", int(DeviceType.CONSOLE): "hvc", int(DeviceType.NET): "eth"}


class VirtioBus(RuntimeBinding):
    """The card's view of the device page: scan, probe, bind, hot add/remove, reset.

    Use as ``async with VirtioBus(platform, drivers=registry) as bus:``.
    ``drivers`` is the driver table: a :class:`~mic_card.bus.registry.DriverRegistry`
    (the card OS passes :func:`mic_card.drivers.plugins.load_driver_table`:
    the built-ins and the ``mic_vop.drivers`` plug-ins; the bus never imports
    the drivers), or a plain ``{device type: factory}`` mapping. Each device
    gets its type's default driver (:meth:`DriverRegistry.default`);
    :meth:`bind`, :meth:`unbind` and :meth:`take`/:meth:`give_back`
    (``card.claim``) change that at run time.
    A device whose driver fails to probe stays listed, ``failed``, with its
    error. Options:
    ``used_in_card`` moves every used ring into card RAM (the Linux used-ring
    trick); ``h2c_doorbells`` are the host->card doorbells the card may pick;
    ``timeout`` bounds every handshake (Linux: 10 s);
    ``extra_acks`` is a fault-injection hook (bits acked beyond the offer).
    """

    def __init__(
        self,
        platform: CardPlatform,
        *,
        drivers: DriverRegistry | Mapping[int, DriverFactory],
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
        self._registry = (
            drivers if isinstance(drivers, DriverRegistry) else DriverRegistry.from_mapping(drivers)
        )
        self._dp: memoryview = memoryview(b"")
        self.config_db = -1
        self._by_offset: dict[int, CardDevice] = {}
        self._idents: dict[int, tuple[int, ...]] = {}  # offset -> identity last probed
        self._scan_lock = asyncio.Lock()
        self._config_event = asyncio.Event()
        self._changed = asyncio.Event()  # set (and replaced) whenever a device binds or goes
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        #: counts device-list changes (bind, unbind, claim, failure, hot add/remove)
        self.generation = 0
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
    def drivers(self) -> DriverRegistry:
        """The driver table this bus binds from."""
        return self._registry

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
            if dev.state in ("live", "claimed"):
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
                ident = entry_ident(entry)
                if dev is not None:
                    if entry.type != dev.type:  # host reused/removed it behind our back
                        self._drop(dev, "removed by the host")
                        continue
                    if dev.state != "failed" or self._idents.get(offset) == ident:
                        self._config_request(dev)
                        continue
                    # the host rewrote the entry of a device that failed: try again
                    self._drop(dev, "its entry was rewritten")
                if entry.removed:
                    continue
                if entry.config_change == MicConfigChange.DEV_REMOVE:
                    # never bound here: just acknowledge (vop_scan_devices does the same)
                    self._ack_unbound_remove(offset, entry)
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
        self,
        offset: int,
        entry: DeviceEntry,
        ident: tuple[int, ...],
        name: str = "",
        driver: DriverEntry | None = None,
    ) -> CardDevice:
        """Probe the device at ``offset`` with ``driver`` (default: its type's default).

        Returns the device: ``live`` with its driver, or a ``failed`` record with
        the error (the driver raised, the host refused), or ``unbound`` when the
        table has no driver for its type. Never raises but CancelledError (the
        device is then recorded ``failed``).
        """
        drv = driver or self._registry.default(entry.type)
        name = name or self._new_name(entry.type)
        self._idents[offset] = ident
        if drv is None:
            why = f"no driver for {device_type_name(entry.type)} (device type {entry.type})"
            log.error("%s (at %#x): %s; left unbound", name, offset, why)
            return self._record(offset, entry, name, "unbound", error=why)
        dev = CardDevice(self, self._dp, offset, entry)
        dev.used_in_card = self.used_in_card
        dev.name = name
        dev.driver_name = drv.name
        self._by_offset[offset] = dev
        try:
            await dev.probe(drv.supported_features(dev))
            dev.driver = drv.construct(dev)
        except (RemoteProtocolError, MicTimeoutError, ResourceError, DriverProbeError) as e:
            log.error("probe of %s (type %d at %#x) by %s failed: %s", name, dev.type, offset,
                      drv.name, e)  # fmt: skip
            self._fail_probe(dev, str(e), tell_host=not isinstance(e, MicTimeoutError))
            why = str(e) if isinstance(e, DriverProbeError) else f"{drv.name}: {e}"
            return self._record(offset, entry, name, "failed", error=why, driver=drv.name)
        except asyncio.CancelledError:
            self._fail_probe(dev, "probe cancelled", tell_host=True)
            self._record(offset, entry, name, "failed", error="probe cancelled", driver=drv.name)
            raise
        log.info("%s: type %d bound to %s", dev.name, dev.type, drv.name)
        self._signal()
        return dev

    def _fail_probe(self, dev: CardDevice, why: str, *, tell_host: bool) -> None:
        """A probe failed: detach, set FAILED for the host (virtio 1.2 §3.1.1), free card RAM."""
        dev.unbind(BrokenResourceError(why), "failed")
        if tell_host:
            dev.status = dev.status | DeviceStatus.FAILED
            dev._notify_host()
        dev.release()

    def _record(
        self,
        offset: int,
        entry: DeviceEntry,
        name: str,
        state: str,
        *,
        error: str = "",
        driver: str = "",
    ) -> CardDevice:
        """A driverless device at ``offset`` (``failed``, ``unbound``, ``claimed``): listed,
        reachable for bind/claim/remove, with a fresh handshake state."""
        dev = CardDevice(self, self._dp, offset, entry)
        dev.used_in_card = self.used_in_card
        dev.name, dev.state, dev.error, dev.driver_name = name, state, error, driver
        self._by_offset[offset] = dev
        try:  # so that a reset or a claim can talk to the host
            dev.setup_doorbells()
        except RemoteProtocolError as e:
            log.error("%s: %s", name, e)
            dev.error = dev.error or str(e)
        self._signal()
        return dev

    def _signal(self) -> None:
        self.generation += 1
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
            if dev.status & DeviceStatus.DEVICE_NEEDS_RESET and dev.state in ("live", "claimed"):
                log.error("%s: host set DEVICE_NEEDS_RESET; requests failed until reset", dev.name)
                dev.unbind(BrokenResourceError(f"{dev.name} needs reset"), "needs_reset")
                self._signal()
            elif dev.driver is not None and dev.state == "live":
                dev.driver.config_changed()
            elif dev.raw is not None and dev.state == "claimed":
                dev.raw.config_changed()
        except Exception:  # a driver may be user code: log its bug, answer the host anyway
            log.exception("%s: %s failed to handle a config change", dev.name, dev.driver_name)
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

    async def wait_changed(self, seen: int) -> int:
        """Wait until :attr:`generation` differs from ``seen``; return it."""
        while self.generation == seen:
            await self._changed.wait()
        return self.generation

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
            held = f", claimed by {dev.holder}" if dev.holder else ""
            raise ClosedResourceError(f"{name} has no driver bound ({dev.state}{held})")
        return dev.driver

    def devices(self) -> list[dict[str, Any]]:
        """Every device as a plain dict: name, type, driver (its registered name, None
        without one), state (``live``, ``failed``, ``unbound``, ``claimed``,
        ``needs_reset``...), error, holder, features, queue sizes, status..."""
        return [d.info() for d in sorted(self._by_offset.values(), key=lambda d: d.offset)]
