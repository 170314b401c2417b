"""The card's virtio bus: discovers devices on the host's device page and binds drivers.

Follows Linux ``drivers/misc/mic/vop/vop_main.c`` and the virtio core's probe
sequence (virtio 1.2 §3.1.1); the device-page handshakes are the card half of
:mod:`virtio.handshake`, shared with the host.

Modules, lowest first (imports point down):

- :mod:`~mic_card.bus.device`: one device (:class:`CardDevice`: probe, queues,
  the handshake adapter) and the protocols around it (:class:`CardPlatform`,
  :class:`Driver`, :class:`BusOwner`), the :class:`CardRamAllocator`;
- :mod:`~mic_card.bus.registry`: the card's one driver table
  (:class:`DriverRegistry` of named :class:`DriverEntry` per device type: the
  driver contract check, the default-driver rule, what ``bind`` resolves) and
  the binding errors;
- :mod:`~mic_card.bus.binding`: runtime unbind/bind/reset and the claim
  primitives (a mixin of the bus);
- :mod:`~mic_card.bus.devices`: the bus itself (:class:`VirtioBus`: scan, bind,
  config changes, hot add/remove, reset), given its driver table by the caller;
- :mod:`~mic_card.bus.claim`: raw device access for driver authors
  (:func:`claim_device`, :class:`ClaimedDevice`, :class:`RawQueue`).

Must not import the drivers, ``transport`` or ``mic_host``.
"""

from mic_card.bus.claim import ClaimedDevice, RawQueue, claim_device
from mic_card.bus.device import (
    CARD_TRANSPORT_FEATURES,
    BusOwner,
    CardDevice,
    CardPlatform,
    CardRamAllocator,
    Driver,
    DriverFactory,
)
from mic_card.bus.devices import VirtioBus
from mic_card.bus.registry import (
    DeviceBusyError,
    DriverEntry,
    DriverProbeError,
    DriverRegistry,
    UnknownDriverError,
)

__all__ = [
    "CARD_TRANSPORT_FEATURES",
    "BusOwner",
    "CardDevice",
    "CardPlatform",
    "CardRamAllocator",
    "ClaimedDevice",
    "DeviceBusyError",
    "Driver",
    "DriverEntry",
    "DriverFactory",
    "DriverProbeError",
    "DriverRegistry",
    "RawQueue",
    "UnknownDriverError",
    "VirtioBus",
    "claim_device",
]
