"""Card virtio drivers, by device type.

:data:`DRIVERS` maps a virtio device ID to the built-in driver class for
it. Each class has ``FEATURES`` (the device-specific bits it supports) and is
built with the live :class:`mic_card.bus.CardDevice`. The card OS does not
use this dict directly: :func:`mic_card.drivers.plugins.load_driver_table`
builds its driver table from the built-ins (by name: ``virtio-blk``,
``virtio-console``, ``virtio-net``) and the ``mic_vop.drivers`` entry points.

Must not import ``transport`` or ``mic_host``.
"""

from __future__ import annotations

from typing import Any

from mic_card.drivers.block import BlockDevice, BlockIOError
from mic_card.drivers.console import ConsoleDevice
from mic_card.drivers.net import NetDevice
from virtio.constants import DeviceType

__all__ = ["DRIVERS", "BlockDevice", "BlockIOError", "ConsoleDevice", "NetDevice"]

#: device type -> driver class (``factory(device) -> driver``)
DRIVERS: dict[int, Any] = {
    int(DeviceType.BLOCK): BlockDevice,
    int(DeviceType.CONSOLE): ConsoleDevice,
    int(DeviceType.NET): NetDevice,
}
