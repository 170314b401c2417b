"""Card virtio drivers, by device type.

:func:`builtin_registry` is the driver table the card OS starts from: one
named :class:`mic_card.bus.DriverEntry` per built-in driver
(:data:`BUILTIN_DRIVERS`: ``virtio-net``, ``virtio-blk``, ``virtio-console``,
priority 0); :func:`mic_card.drivers.plugins.load_driver_table` adds the
``mic_vop.drivers`` plug-ins to it before the bus gets it.
:data:`DRIVERS` is the same as a plain ``{device ID: driver class}`` map.
Each class has ``FEATURES`` (the device-specific bits it supports) and is
built with the live :class:`mic_card.bus.CardDevice`.

Must not import ``transport`` or ``mic_host``.
"""

from __future__ import annotations

from typing import Any

from mic_card.bus import DriverEntry, DriverRegistry
from mic_card.drivers.block import BlockDevice, BlockIOError
from mic_card.drivers.console import ConsoleDevice, SinglePortConsole
from mic_card.drivers.net import NetDevice
from virtio.constants import DeviceType

__all__ = [
    "BUILTIN_DRIVERS",
    "DRIVERS",
    "BlockDevice",
    "BlockIOError",
    "ConsoleDevice",
    "NetDevice",
    "builtin_registry",
]

#: device type -> driver class (``factory(device) -> driver``)
DRIVERS: dict[int, Any] = {
    int(DeviceType.BLOCK): BlockDevice,
    int(DeviceType.CONSOLE): ConsoleDevice,
    int(DeviceType.NET): NetDevice,
}

#: the built-in drivers, by the names ``card.bind`` and ``micctl devices`` use
BUILTIN_DRIVERS: tuple[DriverEntry, ...] = (
    DriverEntry("virtio-net", int(DeviceType.NET), NetDevice),
    DriverEntry("virtio-blk", int(DeviceType.BLOCK), BlockDevice),
    DriverEntry("virtio-console", int(DeviceType.CONSOLE), ConsoleDevice),
)


def builtin_registry(*, console_multiport: bool = True) -> DriverRegistry:
    """A fresh driver table of the built-in drivers.

    ``console_multiport=False``: ``virtio-console`` is the legacy single-port
    driver (MULTIPORT left unacked).
    """
    reg = DriverRegistry(BUILTIN_DRIVERS)
    if not console_multiport:
        reg.add(
            DriverEntry("virtio-console", int(DeviceType.CONSOLE), SinglePortConsole), replace=True
        )
    return reg
