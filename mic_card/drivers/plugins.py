"""Card driver plug-ins: the ``mic_vop.drivers`` entry points, next to the built-ins.

Owns filling the card OS's driver table (:class:`~mic_card.bus.DriverRegistry`)
at boot: the built-in drivers (:func:`mic_card.drivers.builtin_registry`:
``virtio-net``, ``virtio-blk``, ``virtio-console``, priority 0) first, then
every entry point of the group :data:`ENTRY_POINT_GROUP` installed in the
card's Python environment, sorted by entry-point name, the way the host loads
backends from ``mic_vop.backends``. A package adds a driver with::

    [project.entry-points."mic_vop.drivers"]
    virtio-rng = "mic_vop_rng.driver:RngDriver"

The entry point's name is the driver's name (what ``card.bind(dev, name)``
and ``micctl devices`` use); the object it names is a driver factory
(usually the driver class: ``factory(device) -> driver``, see
:class:`mic_card.bus.Driver`) with

- ``DEVICE_TYPE: int``, the virtio device ID it drives (1..127: the MIC device
  page stores the type in a signed byte);
- ``FEATURES: int``, the device-specific feature bits it supports (or a
  classmethod ``supported_features(device) -> int``);
- ``PRIORITY: int``, optional (default 0).

The table's rule (:class:`~mic_card.bus.DriverRegistry`: highest priority,
then first added) with this order of adding means: when two drivers claim
one device type the highest ``PRIORITY`` serves; on a tie a built-in beats a
plug-in, and plug-ins tie-break by name. One log line per contested type
says which one serves. A plug-in that fails to import, names a built-in's
name or a name already taken, or breaks the contract
(:meth:`~mic_card.bus.DriverEntry.from_factory`) is logged with its name and
skipped: whatever else claims the type (the built-in) serves, and the card
boots. A plug-in whose driver raises while probing a device is not this
module's business: the bus marks that device ``failed`` with the error.
Must not import ``transport`` or ``mic_host``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from importlib.metadata import EntryPoint, entry_points

from mic_card.bus import DriverEntry, DriverRegistry
from mic_card.drivers import builtin_registry
from virtio.errors import LocalProtocolError

__all__ = ["ENTRY_POINT_GROUP", "load_driver_table", "load_plugins"]

log = logging.getLogger("mic_card.drivers")

#: Entry-point group third-party card drivers register under.
ENTRY_POINT_GROUP = "mic_vop.drivers"


def _where(ep: EntryPoint) -> str:
    """``entry point mod:attr (dist 1.0)``: names a plug-in exactly, for log lines."""
    dist = ep.dist
    version = f" ({dist.name} {dist.version})" if dist is not None else ""
    return f"entry point {ep.value}{version}"


def _origin(ep: EntryPoint) -> str:
    """``plug-in <distribution>``: the entry's origin in the table and ``micctl devices``."""
    return f"plug-in {ep.dist.name}" if ep.dist is not None else f"plug-in {ep.value}"


def load_plugins(
    group: str = ENTRY_POINT_GROUP, *, reserved: Iterable[str] = ()
) -> list[DriverEntry]:
    """Every usable driver of entry-point group ``group``, sorted by entry-point name.

    ``reserved`` are names taken already (the built-ins'). Logs one line per
    plug-in loaded; a plug-in that cannot be used is logged (naming it and
    why) and skipped. Never raises.
    """
    taken = set(reserved)
    found: list[DriverEntry] = []
    for ep in sorted(entry_points(group=group), key=lambda e: (e.name, e.value)):
        where = _where(ep)
        if ep.name in taken:
            log.error(
                "card driver plug-in %r (%s): the name is taken by another driver; skipped",
                ep.name,
                where,
            )
            continue
        try:
            factory = ep.load()
        except Exception as e:  # a plug-in is user code: report anything its import raises
            log.error(
                "card driver plug-in %r (%s) failed to load: %s: %s; skipped",
                ep.name,
                where,
                type(e).__name__,
                e,
            )
            continue
        try:
            entry = DriverEntry.from_factory(ep.name, factory, _origin(ep))
        except LocalProtocolError as e:
            log.error("card driver plug-in %r (%s): %s; skipped", ep.name, where, e)
            continue
        log.info(
            "card driver plug-in %r loaded for device type %d (%s, priority %d)",
            entry.name,
            entry.device_type,
            where,
            entry.priority,
        )
        taken.add(ep.name)
        found.append(entry)
    return found


def load_driver_table(
    *, console_multiport: bool = True, group: str = ENTRY_POINT_GROUP
) -> DriverRegistry:
    """The card OS's driver table: the built-in drivers, then the plug-ins of
    ``group`` (sorted by name), with one log line per plug-in loaded and per
    device type claimed more than once (saying which driver serves).
    ``console_multiport=False``: the built-in console driver leaves MULTIPORT
    unacked. Never raises: an unusable plug-in is logged and left out."""
    table = builtin_registry(console_multiport=console_multiport)
    for entry in load_plugins(group, reserved=table.names()):
        table.add(entry)
    for dtype, (first, *rest) in table.contested().items():
        log.info(
            "device type %d: driver %s serves; also claimed by %s",
            dtype,
            first.describe(),
            ", ".join(e.describe() for e in rest),
        )
    return table
