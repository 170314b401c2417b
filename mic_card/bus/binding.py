"""Runtime binding on the card's virtio bus: unbind, bind, reset, and the claim primitives.

Owns :class:`RuntimeBinding`, the part of :class:`mic_card.bus.VirtioBus`
that changes which driver drives a device while the card runs
(``card.unbind(name)``, ``card.bind(name, driver)``, ``card.claim(name)``
through :mod:`mic_card.bus.claim`, and the older ``reset_device``). Every
change goes through the same steps: detach what drives the device (its
driver, or an app's claim), reset it with the vdev-reset handshake
(``virtio.handshake``: ``vdev_reset = 1``, wait ``host_ack``) so the host's
backend sees a clean reset, free the card RAM it held, then list a fresh
record (``unbound``, ``claimed``) or probe a driver again. All of it runs
under the bus's scan lock, so a rescan never sees a device half-changed.

A mixin: :class:`~mic_card.bus.devices.VirtioBus` provides the primitives
declared at the top of the class (the scan lock, the table, the device map,
``_probe``/``_record``/``_drop``/``_signal``/``device``). Must not import
:mod:`mic_card.bus.devices`, the drivers, ``transport`` or ``mic_host``.
"""

from __future__ import annotations

import asyncio
import logging

from mic_card.bus.device import CardDevice, DriverFactory
from mic_card.bus.registry import (
    DeviceBusyError,
    DriverEntry,
    DriverProbeError,
    DriverRegistry,
)
from virtio.errors import BrokenResourceError, MicError, RemoteProtocolError
from virtio.layouts import DeviceEntry

__all__ = ["RuntimeBinding", "entry_ident"]

log = logging.getLogger("mic_card.bus")


def entry_ident(entry: DeviceEntry) -> tuple[int, ...]:
    """What identifies an entry across rescans (not the fields the card itself writes)."""
    dims = (entry.type, entry.num_vq, entry.feature_len, entry.config_len)
    return dims + tuple(x for v in entry.vqconfigs for x in (v.address, v.num))


class RuntimeBinding:
    """Unbind, bind, reset and claim, over the primitives the bus provides."""

    # -- provided by VirtioBus --------------------------------------------------------
    _scan_lock: asyncio.Lock
    _registry: DriverRegistry
    _closed: bool
    _by_offset: dict[int, CardDevice]
    _dp: memoryview
    _idents: dict[int, tuple[int, ...]]

    def device(self, name: str) -> CardDevice:
        raise NotImplementedError

    async def _probe(
        self,
        offset: int,
        entry: DeviceEntry,
        ident: tuple[int, ...],
        name: str = "",
        driver: DriverEntry | None = None,
    ) -> CardDevice:
        raise NotImplementedError

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
        raise NotImplementedError

    def _drop(self, dev: CardDevice, why: str) -> None:
        raise NotImplementedError

    def _signal(self) -> None:
        raise NotImplementedError

    def _is_closed(self) -> bool:
        """Read afresh after an await (the bus may close meanwhile)."""
        return self._closed

    # -- the operations -----------------------------------------------------------------
    async def reset_device(self, name: str) -> CardDevice | None:
        """Reset ``name`` (vdev reset handshake) and probe it again under the same name,
        with the same driver if it is in the table (else its type's default).

        Returns the new device, or None if the re-probe failed (logged; the
        device is listed ``failed``).

        Raises:
            LocalProtocolError: no such device.
            DeviceBusyError: an app holds a claim on it.
            MicTimeoutError: the host did not acknowledge the reset (the
                device is listed ``failed``).
        """
        async with self._scan_lock:
            dev = self._unclaimed(name)
            drv = self._registry.default(dev.type)
            if dev.driver_name in self._registry.names():
                same = self._registry.get(dev.driver_name)
                drv = same if same.device_type == dev.type else drv
            rec = await self._reset(dev, "resetting", f"{name} is being reset")
            new = await self._reprobe(rec, drv)
            return new if new.state == "live" else None

    def _unclaimed(self, name: str) -> CardDevice:
        """Raises: LocalProtocolError: no such device. DeviceBusyError: an app holds it."""
        dev = self.device(name)
        if dev.holder:
            raise DeviceBusyError(f"{name} is claimed by {dev.holder}")
        return dev

    async def _reset(self, dev: CardDevice, state: str, why: str) -> CardDevice:
        """Detach whatever drives ``dev``, vdev-reset it (so the host's backend sees a
        clean reset), free its card RAM; list a fresh driverless record in ``state``.

        Raises:
            MicTimeoutError, RemoteProtocolError: the reset handshake failed (the
                device is listed ``failed`` with that error).
        """
        dev.unbind(BrokenResourceError(why), "resetting")
        try:
            if dev.status != 0:
                await dev.vdev_reset()
        except BaseException as e:
            dev.release()
            error = f"reset failed: {e}" if isinstance(e, MicError) else "reset cancelled"
            self._rerecord(dev, "failed", error)
            raise
        dev.release()
        return self._rerecord(dev, state, "")

    def _rerecord(self, dev: CardDevice, state: str, error: str) -> CardDevice:
        """Replace ``dev`` with a driverless record of its current entry.

        Raises:
            RemoteProtocolError: the host broke the entry (the device is dropped).
        """
        try:
            entry = DeviceEntry.parse(bytes(self._dp), dev.offset)
        except RemoteProtocolError:
            self._drop(dev, "its entry no longer parses")
            raise
        self._idents[dev.offset] = entry_ident(entry)
        return self._record(dev.offset, entry, dev.name, state, error=error,
                            driver=dev.driver_name)  # fmt: skip

    async def _reprobe(self, dev: CardDevice, driver: DriverEntry | None) -> CardDevice:
        entry = DeviceEntry.parse(bytes(self._dp), dev.offset)
        return await self._probe(dev.offset, entry, entry_ident(entry), dev.name, driver)

    async def unbind(self, name: str) -> None:
        """Detach ``name``'s driver and reset the device; it stays listed ``unbound``.

        Requests in flight fail with BrokenResourceError (the driver's
        ``detach``). Unbinding a device without a driver (``failed``,
        ``unbound``) resets it too.

        Raises:
            LocalProtocolError: no such device.
            DeviceBusyError: an app holds a claim on it (the message names the app).
            MicTimeoutError: the host did not acknowledge the reset (``failed``).
        """
        async with self._scan_lock:
            dev = self._unclaimed(name)
            await self._reset(dev, "unbound", f"{name} was unbound")
            log.info("%s: driver %s unbound", name, dev.driver_name or "-")

    async def bind(self, name: str, driver: str | DriverFactory) -> CardDevice:
        """Probe ``name`` with ``driver``: a registered name (``"virtio-blk"``) or a
        factory object (``factory(device) -> driver``, see :class:`~mic_card.bus.Driver`).

        The device must have no driver (:meth:`unbind` it first). Returns the live device.

        Raises:
            LocalProtocolError: no such device.
            UnknownDriverError: no driver of that name, or one for another device
                type (the message names the driver and the device).
            DeviceBusyError: the device has a driver bound, or an app holds it.
            DriverProbeError: the driver failed to probe (the device is listed
                ``failed`` with the error).
        """
        async with self._scan_lock:
            dev = self._unclaimed(name)
            drv = self._registry.resolve(driver, name, dev.type)
            if dev.driver is not None:
                raise DeviceBusyError(
                    f"{name} already has driver {dev.driver_name} bound; unbind it first"
                )
            new = await self._reprobe(dev, drv)
            if new.state != "live":
                raise DriverProbeError(f"binding {drv.name} to {name} failed: {new.error}")
            return new

    async def take(self, name: str, holder: str) -> CardDevice:
        """Claim ``name`` for ``holder``: detach its driver, reset it, list it ``claimed``.

        The returned device has no driver and no queues; the claimant drives it
        (:mod:`mic_card.bus.claim`) and must :meth:`give_back` it.

        Raises:
            LocalProtocolError: no such device.
            DeviceBusyError: another app holds it (the message names the holder).
            MicTimeoutError: the host did not acknowledge the reset (``failed``).
        """
        async with self._scan_lock:
            dev = self._unclaimed(name)
            new = await self._reset(dev, "claimed", f"{name} was claimed by {holder}")
            new.holder = holder
            self._signal()
            log.info("%s claimed by %s", name, holder)
            return new

    async def give_back(self, dev: CardDevice) -> None:
        """End a claim: reset the device and bind its type's default driver again.

        A device the host removed meanwhile, or a closed bus, needs nothing.
        Failures are logged and shown in the device's state, never raised (this
        runs while the claimant unwinds, perhaps with its own exception).
        """
        async with self._scan_lock:
            if self._closed or self._by_offset.get(dev.offset) is not dev:
                return
            holder, dev.holder = dev.holder, ""
            try:
                rec = await self._reset(dev, "unbound", f"{dev.name}: claim by {holder} ended")
                if self._is_closed():  # the card OS is shutting down: no driver to bind
                    return
                new = await self._reprobe(rec, self._registry.default(dev.type))
            except MicError as e:
                log.error("%s: after the claim by %s: %s", dev.name, holder, e)
                return
            log.info("%s released by %s; %s: %s", dev.name, holder, new.driver_name, new.state)
