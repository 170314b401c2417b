"""Card driver plug-ins: the ``mic_vop.drivers`` entry points, next to the built-ins.

Owns filling the card OS's :class:`~mic_card.bus.table.DriverTable` at boot:
the built-in drivers (``virtio-blk``, ``virtio-console``, ``virtio-net``,
priority 0) and every entry point of the group :data:`ENTRY_POINT_GROUP`
installed in the card's Python environment, the way the host loads backends
from ``mic_vop.backends``. A package adds a driver with::

    [project.entry-points."mic_vop.drivers"]
    virtio-rng = "mic_vop_rng.driver:RngDriver"

The entry point's name is the driver's name; the object it names is a driver
factory (usually the driver class: ``factory(device) -> driver``, see
:class:`mic_card.bus.Driver`) with

- ``DEVICE_TYPE: int``, the virtio device ID it drives (1..127: the MIC device
  page stores the type in a signed byte);
- ``FEATURES: int``, the device-specific feature bits it supports (or a
  classmethod ``supported_features(device) -> int``);
- ``PRIORITY: int``, optional (default 0).

When two drivers claim one device type the highest ``PRIORITY`` serves; on a
tie a built-in beats a plug-in, and plug-ins tie-break by name
(:class:`~mic_card.bus.table.DriverSpec`); one log line says which one serves.
A plug-in that fails to import, names a built-in's name or a name already
taken, or lacks a valid ``DEVICE_TYPE``/``FEATURES`` is logged with its name
and skipped: whatever else claims the type (the built-in) serves, and the card
boots. Must not import ``transport`` or ``mic_host``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from importlib.metadata import EntryPoint, entry_points

from mic_card.bus import DriverSpec, DriverTable
from mic_card.drivers.block import BlockDevice
from mic_card.drivers.console import ConsoleDevice, SinglePortConsole
from mic_card.drivers.net import NetDevice
from virtio.constants import DeviceType
from virtio.errors import LocalProtocolError

__all__ = [
    "BUILTIN_NAMES",
    "ENTRY_POINT_GROUP",
    "builtin_drivers",
    "driver_spec",
    "load_driver_table",
    "load_plugins",
]

log = logging.getLogger("mic_card.drivers")

#: Entry-point group third-party card drivers register under.
ENTRY_POINT_GROUP = "mic_vop.drivers"

#: The built-in drivers' names, by device type.
BUILTIN_NAMES: dict[int, str] = {
    int(DeviceType.BLOCK): "virtio-blk",
    int(DeviceType.CONSOLE): "virtio-console",
    int(DeviceType.NET): "virtio-net",
}

#: Device types a MIC device page can hold (``mic_device_desc.type`` is ``__s8``;
#: 0 ends the list and -1 marks a removed slot).
_TYPES = range(1, 128)
_FEATURE_BITS = 64


def builtin_drivers(*, console_multiport: bool = True) -> list[DriverSpec]:
    """The built-in drivers, priority 0. ``console_multiport=False`` makes the
    console driver leave MULTIPORT unacked (a card that only knows port 0)."""
    console = ConsoleDevice if console_multiport else SinglePortConsole
    factories = {
        int(DeviceType.BLOCK): BlockDevice,
        int(DeviceType.CONSOLE): console,
        int(DeviceType.NET): NetDevice,
    }
    return [DriverSpec(BUILTIN_NAMES[t], t, f, builtin=True) for t, f in sorted(factories.items())]


def _int_attr(obj: object, attr: str, default: int | None = None) -> int:
    value = getattr(obj, attr, default)
    if value is None:
        raise LocalProtocolError(f"has no {attr}")
    if isinstance(value, bool) or not isinstance(value, int):
        raise LocalProtocolError(f"{attr} is {type(value).__name__} {value!r}, not an int")
    return value


def driver_spec(name: str, factory: object, origin: str) -> DriverSpec:
    """Check a plug-in's factory and describe it.

    Raises:
        LocalProtocolError: not callable, or ``DEVICE_TYPE``/``FEATURES``/
            ``PRIORITY`` missing, not ints or out of range (the message says which).
    """
    if not callable(factory):
        raise LocalProtocolError(f"{type(factory).__name__} is not callable")
    dtype = _int_attr(factory, "DEVICE_TYPE")
    if dtype not in _TYPES:
        raise LocalProtocolError(f"DEVICE_TYPE {dtype} outside 1..127")
    features = _int_attr(factory, "FEATURES")
    if not 0 <= features < 1 << _FEATURE_BITS:
        raise LocalProtocolError(f"FEATURES {features:#x} is not a 64-bit feature set")
    priority = _int_attr(factory, "PRIORITY", 0)
    return DriverSpec(name, dtype, factory, priority=priority, origin=origin)


def _origin(ep: EntryPoint) -> str:
    dist = ep.dist
    where = f" ({dist.name} {dist.version})" if dist is not None else ""
    return f"entry point {ep.value}{where}"


def load_plugins(
    group: str = ENTRY_POINT_GROUP, *, reserved: Iterable[str] = ()
) -> list[DriverSpec]:
    """Every usable driver of entry-point group ``group``, by name.

    ``reserved`` are names taken already (the built-ins'). A plug-in that
    cannot be used is logged (naming it and why) and skipped; never raises.
    """
    taken = set(reserved)
    specs: list[DriverSpec] = []
    for ep in sorted(entry_points(group=group), key=lambda e: (e.name, e.value)):
        origin = _origin(ep)
        if ep.name in taken:
            log.error(
                "card driver plug-in %r (%s): the name is taken by another driver; skipped",
                ep.name,
                origin,
            )
            continue
        try:
            factory = ep.load()
        except Exception as e:  # a plug-in is user code: report anything its import raises
            log.error(
                "card driver plug-in %r (%s) failed to load: %s: %s; skipped",
                ep.name,
                origin,
                type(e).__name__,
                e,
            )
            continue
        try:
            spec = driver_spec(ep.name, factory, origin)
        except LocalProtocolError as e:
            log.error("card driver plug-in %r (%s): %s; skipped", ep.name, origin, e)
            continue
        taken.add(ep.name)
        specs.append(spec)
    return specs


def load_driver_table(
    *, console_multiport: bool = True, group: str = ENTRY_POINT_GROUP
) -> DriverTable:
    """The built-in drivers and the plug-ins of ``group``, with one log line per
    plug-in loaded and per device type claimed twice (saying which one serves).
    Never raises: an unusable plug-in is logged and left out."""
    builtins = builtin_drivers(console_multiport=console_multiport)
    plugins = load_plugins(group, reserved=[s.name for s in builtins])
    table = DriverTable([*builtins, *plugins])
    for spec in plugins:
        log.info(
            "card driver plug-in %r loaded for device type %d (%s)",
            spec.name,
            spec.device_type,
            spec.origin,
        )
    for dtype in table:
        first, *rest = table.candidates(dtype)
        if rest:
            log.info(
                "device type %d: driver %s serves; also claimed by %s",
                dtype,
                first.describe(),
                ", ".join(s.describe() for s in rest),
            )
    return table
