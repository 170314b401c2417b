"""What card code may use of the card OS: the :class:`CardServices` protocol.

The bottom of ``mic_card``'s own layers. The shell, the agent, the offload
endpoint, the accelerator framework and users' card apps depend on this
protocol, never on the card OS object (``mic_card.card``), which is the
composition root that nothing imports. The same seam as
``mic_host.backends.BackendContext`` on the host side.

Imports only ``virtio`` and ``transport`` (for types); nothing from ``mic_card``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from typing import Any, Protocol

from transport import Region
from transport.messages import SHUTDOWN_STATUSES
from virtio.memory import Memory

__all__ = ["SHUTDOWN_STATUSES", "CardBus", "CardServices", "DriverTable"]


class DriverTable(Protocol):
    """The card's driver table as apps see it (a ``mic_card.bus.DriverRegistry``):
    what is registered and which driver serves which device type. Entries are
    ``mic_card.bus.DriverEntry`` (``name``, ``device_type``, ``priority``,
    ``origin``). Read-only: drivers come from the card's built-ins and the
    ``mic_vop.drivers`` entry points (docs/extending.md)."""

    def names(self) -> list[str]:
        """Every registered driver name, in the order added."""
        ...

    def get(self, name: str) -> Any:
        """The entry called ``name``.

        Raises:
            UnknownDriverError (a LocalProtocolError): no such driver (the
                message lists the known ones).
        """
        ...

    def for_type(self, device_type: int) -> list[Any]:
        """The entries for ``device_type``, best first."""
        ...

    def default(self, device_type: int) -> Any:
        """The entry that binds a new device of ``device_type`` (None: no driver)."""
        ...

    def contested(self) -> dict[int, list[Any]]:
        """The device types more than one driver claims, entries best first."""
        ...

    def info(self) -> list[dict[str, object]]:
        """Every driver as a dict: ``name``, ``type``, ``priority``, ``origin``, ``default``."""
        ...


class CardBus(Protocol):
    """The card's device bus as apps see it (``card.bus``, a
    ``mic_card.bus.VirtioBus``): what is on it, its drivers, and a way to wait
    for it to change. Changing a binding goes through :class:`CardServices`
    (``bind``, ``unbind``, ``claim``), which names the app that holds a device.
    """

    @property
    def drivers(self) -> DriverTable: ...

    @property
    def generation(self) -> int:
        """Grows by one at every change of the bus (a device added, removed,
        bound, unbound, failed, claimed...)."""
        ...

    async def wait_changed(self, seen: int) -> int:
        """Wait until :attr:`generation` differs from ``seen`` and return it:
        ``seen = bus.generation; ...; seen = await bus.wait_changed(seen)``.
        Bound it with ``asyncio.timeout``."""
        ...

    def devices(self) -> list[dict[str, Any]]:
        """Every device as a dict (``name``, ``type``, ``driver``, ``state``,
        ``error``, ``holder``, features, queue sizes...), in device-page order."""
        ...

    def device(self, name: str) -> Any:
        """The bus's device object (``mic_card.bus.CardDevice``: ``info()``,
        ``read_config()``, ``host_features()``, ``driver``...), bound or not.

        Raises:
            LocalProtocolError: no device of that name.
        """
        ...


class CardServices(Protocol):
    """The card OS as card code sees it (``async def main(card)`` gets one).

    - devices: ``devices()`` lists the bus's devices (``name``, ``type``,
      ``driver``, ``state``...), ``device(name)`` is the bound driver
      (a ``BlockDevice``, ``ConsoleDevice``, ``NetDevice``...);
    - binding: ``await unbind(name)``, ``await bind(name, driver)`` change which
      driver drives a device; ``async with claim(name) as dev:`` drives it
      from the app itself (raw access, :mod:`mic_card.bus.claim`);
    - memory: ``memory`` is the card-physical address space, ``card_ram`` the
      card RAM region (its fd can be handed to a host script), ``alloc``/``free``
      hand out card RAM;
    - ``dmesg()``, ``log``, ``uptime``, ``boot_params``, ``shutdown(status)``;
    - ``accelerators()`` starts the accelerator framework on first use;
    - ``bus`` (:class:`CardBus`): the device bus itself: its devices, its
      driver table (``bus.drivers``), and ``wait_changed`` to follow it.
    """

    @property
    def name(self) -> str: ...

    @property
    def log(self) -> logging.Logger: ...

    @property
    def boot_params(self) -> Mapping[str, Any]: ...

    @property
    def memory(self) -> Memory: ...

    @property
    def card_ram(self) -> Region: ...

    @property
    def uptime(self) -> float: ...

    @property
    def bus(self) -> CardBus:
        """The card's device bus (:class:`CardBus`)."""
        ...

    def devices(self) -> list[dict[str, Any]]:
        """The bus's devices, one dict each (``name``, ``type``, ``driver``, ``state``...)."""
        ...

    def device(self, name: str) -> Any:
        """The driver bound to ``name`` (``vda``, ``hvc0``...).

        Raises:
            LocalProtocolError: no such device (or no driver bound to it).
        """
        ...

    async def wait_device(self, name: str, timeout: float = 10.0) -> Any:
        """The driver bound to ``name`` once it appears (hot-add).

        Raises:
            TimeoutError: not within ``timeout`` seconds.
        """
        ...

    async def unbind(self, name: str) -> None:
        """Detach ``name``'s driver and reset the device through the vdev-reset
        handshake (the host's backend sees a clean reset). The device stays
        listed, state ``unbound``, until :meth:`bind`. Requests in flight on
        the old driver fail with BrokenResourceError.

        Raises:
            LocalProtocolError: no such device.
            DeviceBusyError (a ResourceError): an app holds a claim on it; the
                message names the app.
            MicTimeoutError: the host did not acknowledge the reset (the device
                is then ``failed``).
        """
        ...

    async def bind(self, name: str, driver: Any) -> Any:
        """Probe ``name`` with ``driver`` and return the bound driver object.

        ``driver`` is a registered driver name (the built-ins ``virtio-blk``,
        ``virtio-console``, ``virtio-net``, or a plug-in's), or a factory
        object: ``factory(device) -> driver``, with ``FEATURES`` (or a
        ``supported_features(device)`` classmethod), ``config_changed()`` and
        ``detach(exc)`` (:class:`mic_card.bus.Driver`); an integer
        ``DEVICE_TYPE`` attribute is checked against the device, a string
        ``NAME`` names it in ``micctl devices``. The device must have no
        driver (:meth:`unbind` it first).

        Raises:
            LocalProtocolError: no such device.
            UnknownDriverError (a LocalProtocolError): no driver of that name,
                or a driver for another device type; the message names both.
            DeviceBusyError (a ResourceError): the device has a driver, or an
                app holds a claim on it.
            DriverProbeError (a MicError): the driver failed to probe (the
                host refused its features, or its code raised); the device is
                listed ``failed`` with that error and the card carries on.
        """
        ...

    def claim(
        self, name: str, holder: str | None = None
    ) -> contextlib.AbstractAsyncContextManager[Any]:
        """Raw access to a device for driver authors: ``async with card.claim("vda") as dev:``.

        Entering unbinds the driver and resets the device; ``dev`` (a
        :class:`mic_card.bus.ClaimedDevice`) offers ``offered_features``,
        ``write_status``, ``ack_features``, ``negotiate(supported)``,
        ``read_config()``, ``setup_queues()`` (one :class:`mic_card.bus.RawQueue`
        per virtqueue: the ring core ``ring``, ``publish()``/``kick()``,
        ``get_used()``/``wait_interrupt()``/``on_interrupt``), ``driver_ok()``,
        ``alloc``/``free`` (card RAM), ``memory`` and ``reset()``. Leaving the
        block (normally, by an exception, or by cancellation) resets the device,
        frees the claim's card RAM and binds the type's default driver again.
        ``holder`` names the claimant (default: the running app).

        Raises (on entry):
            LocalProtocolError: no such device.
            DeviceBusyError (a ResourceError): another app holds it; the
                message names the holder.
            MicTimeoutError: the host did not acknowledge the reset.
        """
        ...

    def alloc(self, size: int, align: int = 64) -> int:
        """``size`` bytes of card RAM; returns the card-physical address.

        Raises:
            ResourceError: card RAM is exhausted.
        """
        ...

    def free(self, addr: int) -> None: ...

    def dmesg(self) -> list[str]:
        """The card's recent log lines, oldest first."""
        ...

    def shutdown(self, status: str = "halted") -> None:
        """End the card OS with ``status`` (one of :data:`SHUTDOWN_STATUSES`).

        Raises:
            LocalProtocolError: an unknown status.
        """
        ...

    async def accelerators(self) -> Any:
        """The card's accelerator framework (``mic_card.accel.AccelFramework``),
        started on first use and stopped when the card OS shuts down."""
        ...
