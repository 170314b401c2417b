"""The card's driver table: which named driver factories may drive which virtio device type.

Owns :class:`DriverRegistry` (one :class:`DriverEntry` per named driver:
``(name, device_type, factory, priority, origin)``), the rule that picks a
device type's default driver, how ``card.bind(name, driver)`` resolves its
``driver`` argument (:meth:`DriverRegistry.resolve`), and the errors of
binding (:class:`UnknownDriverError`, :class:`DeviceBusyError`,
:class:`DriverProbeError`).

Who fills it: the card OS builds its one table at boot with
:func:`mic_card.drivers.plugins.load_driver_table`: the built-in drivers
(:func:`mic_card.drivers.builtin_registry`: ``virtio-net``, ``virtio-blk``,
``virtio-console``), then the ``mic_vop.drivers`` plug-ins
(:meth:`~DriverRegistry.add`), before it hands the table to
:class:`mic_card.bus.VirtioBus`. The bus never imports a driver; it only
calls the factories it was given.

The default rule: for a device type, the entry with the highest
``priority`` drives a new device; among equal priorities the one added
first (built-ins are added first, with priority 0; the plug-in loader adds
plug-ins sorted by entry-point name, so on a tie a built-in beats a plug-in
and plug-ins tie-break by name). :meth:`DriverRegistry.contested` lists the
types more than one driver claims (the loader logs one line for each).
:meth:`DriverEntry.from_factory` checks a factory against the driver
contract (``DEVICE_TYPE``, ``FEATURES``, ``PRIORITY``) before it is added.

A device whose default driver fails to probe (the factory raises anything:
:meth:`DriverEntry.construct` turns a driver's own bug into
:class:`DriverProbeError`) is marked ``failed``; the bus does not try the
next entry (a driver author wants to see their driver's failure, not have
it hidden by a fallback). ``card.bind(dev, other)`` picks another entry by
name.

Must not import the drivers, ``transport`` or ``mic_host``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from mic_card.bus.device import CARD_TRANSPORT_FEATURES, CardDevice, Driver, DriverFactory
from virtio.constants import DeviceType
from virtio.errors import (
    LocalProtocolError,
    MicError,
    MicTimeoutError,
    RemoteProtocolError,
    ResourceError,
)

__all__ = [
    "DeviceBusyError",
    "DriverEntry",
    "DriverProbeError",
    "DriverRegistry",
    "UnknownDriverError",
    "device_type_name",
    "driver_name",
]

#: Device types a MIC device page can hold (``mic_device_desc.type`` is ``__s8``;
#: 0 ends the list and -1 marks a removed slot).
DEVICE_TYPES = range(1, 128)
_FEATURE_BITS = 64

#: virtio device ID -> the name the built-in driver registers under
_TYPE_NAMES = {int(DeviceType.NET): "net", int(DeviceType.BLOCK): "blk", 3: "console"}


def device_type_name(device_type: int) -> str:
    """``2`` -> ``"virtio-blk"``; an ID without a built-in driver -> ``"virtio-<id>"``."""
    return f"virtio-{_TYPE_NAMES.get(device_type, device_type)}"


def driver_name(factory: object) -> str:
    """The name a factory object is known by when it has no registry entry.

    Its ``NAME`` attribute if it is a string, else its qualified name
    (``test_claim.FailingDriver``).
    """
    name = getattr(factory, "NAME", None)
    if isinstance(name, str) and name:
        return name
    qual = getattr(factory, "__qualname__", None) or type(factory).__qualname__
    module = getattr(factory, "__module__", "") or ""
    return f"{module.rsplit('.', 1)[-1]}.{qual}" if module else str(qual)


class UnknownDriverError(LocalProtocolError):
    """``bind`` named a driver the table does not have, or one for another device type."""


class DeviceBusyError(ResourceError):
    """The device is claimed by an app (the message names it) or already has a driver."""


class DriverProbeError(MicError):
    """A driver failed to bind: its probe or its factory raised (the device is ``failed``)."""


@dataclass(frozen=True, slots=True)
class DriverEntry:
    """One named driver: ``factory(device) -> driver`` for devices of ``device_type``.

    ``priority``: higher wins the default for the type (built-ins: 0).
    ``origin``: where it came from, for messages and ``micctl devices``
    (``"built-in"``, ``"plug-in <distribution>"``, ``"app"``).
    """

    name: str
    device_type: int
    factory: DriverFactory
    priority: int = 0
    origin: str = "built-in"

    @classmethod
    def from_factory(cls, name: str, factory: object, origin: str) -> DriverEntry:
        """An entry for ``factory`` after checking it against the driver contract:
        callable, an int ``DEVICE_TYPE`` in 1..127, an int ``FEATURES`` that fits
        64 bits (or a ``supported_features(device)`` callable), an optional int
        ``PRIORITY`` (default 0; negative is allowed: a fallback driver).

        Raises:
            LocalProtocolError: the factory breaks the contract (the message
                says how: ``has no DEVICE_TYPE``, ``FEATURES is str '1'``...).
        """
        if not callable(factory):
            raise LocalProtocolError(f"{type(factory).__name__} is not callable")
        dtype = _int_attr(factory, "DEVICE_TYPE")
        if dtype not in DEVICE_TYPES:
            raise LocalProtocolError(f"DEVICE_TYPE {dtype} outside 1..127")
        if not callable(getattr(factory, "supported_features", None)):
            features = _int_attr(factory, "FEATURES")
            if not 0 <= features < 1 << _FEATURE_BITS:
                raise LocalProtocolError(f"FEATURES {features:#x} is not a 64-bit feature set")
        priority = _int_attr(factory, "PRIORITY", 0)
        return cls(name, dtype, factory, priority, origin)

    @property
    def builtin(self) -> bool:
        """One of the card OS's own drivers (``origin == "built-in"``)."""
        return self.origin == "built-in"

    def describe(self) -> str:
        """``'virtio-blk' (priority 0, built-in)``: for log lines."""
        return f"{self.name!r} (priority {self.priority}, {self.origin})"

    def supported_features(self, dev: CardDevice) -> int:
        """The feature bits to ack: the driver's ``supported_features(dev)`` or
        ``FEATURES``, plus the transport features the card's virtio core supports.

        Raises:
            RemoteProtocolError: the driver refuses this device (its own choice).
            DriverProbeError: the driver's code raised anything else.
        """
        try:
            # A driver whose acks depend on the device (config space, boot
            # parameters: virtio-net's mode) says so with supported_features(dev).
            pick = getattr(self.factory, "supported_features", None)
            own = pick(dev) if pick is not None else getattr(self.factory, "FEATURES", 0)
            return int(own) | CARD_TRANSPORT_FEATURES
        except _BUS_ERRORS:
            raise
        except Exception as e:  # a driver may be user code: its bug is the device's failure
            raise DriverProbeError(
                f"driver {self.name} raised {type(e).__name__} choosing features: {e}"
            ) from e

    def construct(self, dev: CardDevice) -> Driver:
        """``factory(dev)``, on the live device (queues set up, DRIVER_OK written).

        Raises:
            RemoteProtocolError, MicTimeoutError, ResourceError: as the driver raised them.
            DriverProbeError: the driver's code raised anything else.
        """
        try:
            return self.factory(dev)
        except _BUS_ERRORS:
            raise
        except Exception as e:  # a driver may be user code: its bug is the device's failure
            raise DriverProbeError(f"driver {self.name} raised {type(e).__name__}: {e}") from e


#: what a probe may fail with besides DriverProbeError (the bus's own errors)
_BUS_ERRORS = (RemoteProtocolError, MicTimeoutError, ResourceError)


def _int_attr(obj: object, attr: str, default: int | None = None) -> int:
    value = getattr(obj, attr, default)
    if value is None:
        raise LocalProtocolError(f"has no {attr}")
    if isinstance(value, bool) or not isinstance(value, int):
        raise LocalProtocolError(f"{attr} is {type(value).__name__} {value!r}, not an int")
    return value


class DriverRegistry:
    """The table the card OS gives the bus: named driver entries, by device type.

    Iterating yields the entries in the order they were added.
    """

    def __init__(self, entries: Iterable[DriverEntry] = ()) -> None:
        self._entries: dict[str, DriverEntry] = {}
        for e in entries:
            self.add(e)

    @classmethod
    def from_mapping(cls, drivers: Mapping[int, DriverFactory]) -> DriverRegistry:
        """A table of one driver per type (``{2: BlockDevice}``), each named after its
        type (:func:`device_type_name`): the older ``drivers=`` form of ``VirtioBus``."""
        return cls(DriverEntry(device_type_name(t), int(t), f) for t, f in drivers.items())

    def add(self, entry: DriverEntry, *, replace: bool = False) -> None:
        """Register ``entry``.

        Raises:
            LocalProtocolError: a driver of that name is already registered
                (and ``replace`` is false), or the name is empty.
        """
        if not entry.name:
            raise LocalProtocolError("a driver needs a name")
        old = self._entries.get(entry.name)
        if old is not None and not replace:
            raise LocalProtocolError(
                f"driver {entry.name!r} is already registered ({old.origin}, "
                f"device type {old.device_type})"
            )
        self._entries[entry.name] = entry

    def register(
        self,
        name: str,
        device_type: int,
        factory: DriverFactory,
        *,
        priority: int = 0,
        origin: str = "built-in",
    ) -> DriverEntry:
        """Build and :meth:`add` an entry; returns it.

        Raises:
            LocalProtocolError: the name is taken or empty.
        """
        entry = DriverEntry(name, int(device_type), factory, priority, origin)
        self.add(entry)
        return entry

    def __iter__(self) -> Iterator[DriverEntry]:
        return iter(list(self._entries.values()))

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        """Every registered driver name, in the order added."""
        return list(self._entries)

    def get(self, name: str) -> DriverEntry:
        """The entry called ``name``.

        Raises:
            UnknownDriverError: no such driver (the message lists the known ones).
        """
        entry = self._entries.get(name)
        if entry is None:
            known = ", ".join(self._entries) or "none"
            raise UnknownDriverError(f"no driver {name!r} (known drivers: {known})")
        return entry

    def for_type(self, device_type: int) -> list[DriverEntry]:
        """The entries for ``device_type``, best first (highest priority, then first added)."""
        order = {n: i for i, n in enumerate(self._entries)}
        found = [e for e in self._entries.values() if e.device_type == device_type]
        return sorted(found, key=lambda e: (-e.priority, order[e.name]))

    def default(self, device_type: int) -> DriverEntry | None:
        """The driver that binds a new device of ``device_type`` (None: no driver)."""
        best = self.for_type(device_type)
        return best[0] if best else None

    def contested(self) -> dict[int, list[DriverEntry]]:
        """The device types more than one driver claims, each with its entries best first."""
        types = sorted({e.device_type for e in self._entries.values()})
        found = {t: self.for_type(t) for t in types}
        return {t: entries for t, entries in found.items() if len(entries) > 1}

    def info(self) -> list[dict[str, object]]:
        """Every driver as a plain dict (JSON-ready), by device type and in rule
        order: name, type, priority, origin, default (serves new devices of its type)."""
        types = sorted({e.device_type for e in self._entries.values()})
        return [
            {
                "name": e.name,
                "type": e.device_type,
                "priority": e.priority,
                "origin": e.origin,
                "default": i == 0,
            }
            for t in types
            for i, e in enumerate(self.for_type(t))
        ]

    def resolve(self, driver: str | DriverFactory, device: str, device_type: int) -> DriverEntry:
        """What ``bind(device, driver)`` binds: a registered name, or a factory object.

        A factory object needs no registration; if it has an integer
        ``DEVICE_TYPE`` attribute it is checked like a registered driver's type.

        Raises:
            UnknownDriverError: an unknown name, or a driver for another device
                type (the message names the driver and the device).
        """
        if isinstance(driver, str):
            try:
                entry = self.get(driver)
            except UnknownDriverError as e:
                raise UnknownDriverError(f"cannot bind {device}: {e}") from None
        else:
            declared = getattr(driver, "DEVICE_TYPE", None)
            dtype = int(declared) if isinstance(declared, int) else device_type
            entry = DriverEntry(driver_name(driver), dtype, driver, origin="app")
        if entry.device_type != device_type:
            raise UnknownDriverError(
                f"cannot bind {entry.name} to {device}: {entry.name} drives "
                f"{device_type_name(entry.device_type)} devices (type {entry.device_type}), "
                f"{device} is {device_type_name(device_type)} (type {device_type})"
            )
        return entry
