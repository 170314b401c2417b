"""The events and actions of the device-page handshakes (both halves), and the table step.

Owns the typed inputs each half takes (:data:`Event`), the typed outputs it
returns (:data:`Action`), :func:`publish` (performs a store action on an
:class:`~virtio.devpage.EntryView`) and :func:`step` (one table lookup; a
missing pair is the caller's bug). Frozen slotted dataclasses, as h11's
``_events.py``. Imports only ``virtio`` modules below it; no asyncio.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TypeVar

from virtio.constants import MicConfigChange
from virtio.devpage import Ctrl, EntryView
from virtio.errors import LocalProtocolError

__all__ = [
    "Action",
    "BeginReset",
    "CardGone",
    "ConfigAcked",
    "ConfigChanged",
    "ConfigDoorbell",
    "Doorbell",
    "Event",
    "Fault",
    "Handled",
    "MoveUsedRings",
    "NeedsReset",
    "Publish",
    "PublishStatus",
    "PublishType",
    "PublishUsedAddress",
    "RemoveDevice",
    "RequestReset",
    "ResetAcked",
    "ResetDrained",
    "RingConfig",
    "RingPeer",
    "StartConfigChange",
    "StartQueues",
    "StatusAcked",
    "Stop",
    "StopQueues",
    "Tick",
    "TimedOut",
    "UsedRingsTaken",
    "WriteStatus",
    "publish",
]
# Not in __all__ (the halves import them from here): TableEnum, step.


# ---------------------------------------------------------------------------
# events (inputs)


@dataclass(frozen=True, slots=True)
class Doorbell:
    """The peer rang this device's doorbell (host: c2h_vdev_db; card: h2c_vdev_db)."""


@dataclass(frozen=True, slots=True)
class Tick:
    """The adapter's fallback re-check period passed (Linux polls; a peer may not ring)."""


@dataclass(frozen=True, slots=True)
class TimedOut:
    """The adapter stopped waiting for the pending handshake (deadline or cancellation)."""


@dataclass(frozen=True, slots=True)
class StartConfigChange:
    """Host: begin a config change or hot remove; ``config_db`` is the page's h2c_config_db."""

    kind: MicConfigChange
    config_db: int


@dataclass(frozen=True, slots=True)
class ResetDrained:
    """Host: after :class:`BeginReset`, queues are stopped, drained and the rings zeroed."""


@dataclass(frozen=True, slots=True)
class Fault:
    """Host: the device side found the card's ring bad (or could not start a queue)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Stop:
    """Host: the device is being removed; card-initiated handshakes are no longer served."""


@dataclass(frozen=True, slots=True)
class CardGone:
    """Host: the card crashed or was reset; forget its state (the page is rewritten)."""


@dataclass(frozen=True, slots=True)
class WriteStatus:
    """Card: write ``value`` to ``status`` and wait for the host to apply it."""

    value: int


@dataclass(frozen=True, slots=True)
class RequestReset:
    """Card: ask the host to reset the device (Linux ``vop_reset``)."""


@dataclass(frozen=True, slots=True)
class MoveUsedRings:
    """Card: the ``used_address`` of every vq now points into card RAM; tell the host."""


@dataclass(frozen=True, slots=True)
class ConfigDoorbell:
    """Card: the config doorbell rang (or a rescan runs); look at ``config_change``."""


@dataclass(frozen=True, slots=True)
class Handled:
    """Card: the driver was told of the config change (or unbound for a removal)."""


Event = (
    Doorbell
    | Tick
    | TimedOut
    | StartConfigChange
    | ResetDrained
    | Fault
    | Stop
    | CardGone
    | WriteStatus
    | RequestReset
    | MoveUsedRings
    | ConfigDoorbell
    | Handled
)


# ---------------------------------------------------------------------------
# actions (outputs)


@dataclass(frozen=True, slots=True)
class Publish:
    """Store ``value`` into ctrl field ``field`` of the entry."""

    field: Ctrl
    value: int


@dataclass(frozen=True, slots=True)
class PublishStatus:
    """Store ``value`` into the entry's ``status``."""

    value: int


@dataclass(frozen=True, slots=True)
class PublishType:
    """Store ``value`` into the entry's ``type`` (card: -1 after a removal)."""

    value: int


@dataclass(frozen=True, slots=True)
class PublishUsedAddress:
    """Store ``address`` into vq ``index``'s ``used_address``."""

    index: int
    address: int


@dataclass(frozen=True, slots=True)
class RingPeer:
    """Ring the device's doorbell towards the peer (host: h2c_vdev_db; card: c2h_vdev_db)."""


@dataclass(frozen=True, slots=True)
class RingConfig:
    """Host: ring the card's config doorbell ``db``."""

    db: int


@dataclass(frozen=True, slots=True)
class BeginReset:
    """Host: the card asked for a reset: stop the queues, drain, zero the rings, then
    feed :class:`ResetDrained`."""


@dataclass(frozen=True, slots=True)
class StartQueues:
    """Host: DRIVER_OK was accepted; build the device queues over these used rings."""

    used: tuple[int, ...]
    features: int


@dataclass(frozen=True, slots=True)
class StopQueues:
    """Host: the driver reset the device or gave up on it; park the queues."""

    reason: str


@dataclass(frozen=True, slots=True)
class NeedsReset:
    """Host: the card broke the protocol; the device is DEVICE_NEEDS_RESET (published).

    Break the queues and tell the card with a config change.
    """

    reason: str


@dataclass(frozen=True, slots=True)
class ConfigAcked:
    """Host: the card acknowledged the config change (``guest_ack``); fields cleared."""

    kind: MicConfigChange


@dataclass(frozen=True, slots=True)
class StatusAcked:
    """Card: the host applied the status write; ``status`` is what it published."""

    status: int


@dataclass(frozen=True, slots=True)
class ResetAcked:
    """Card: the host reset the device (``status`` is 0 again)."""


@dataclass(frozen=True, slots=True)
class UsedRingsTaken:
    """Card: the host took the moved used rings (``used_address_updated`` cleared)."""


@dataclass(frozen=True, slots=True)
class ConfigChanged:
    """Card: the host changed the config space: tell the driver, then feed :class:`Handled`."""


@dataclass(frozen=True, slots=True)
class RemoveDevice:
    """Card: the host removes the device: unbind it, then feed :class:`Handled`."""


Action = (
    Publish
    | PublishStatus
    | PublishType
    | PublishUsedAddress
    | RingPeer
    | RingConfig
    | BeginReset
    | StartQueues
    | StopQueues
    | NeedsReset
    | ConfigAcked
    | StatusAcked
    | ResetAcked
    | UsedRingsTaken
    | ConfigChanged
    | RemoveDevice
)


def publish(
    view: EntryView, action: Publish | PublishStatus | PublishType | PublishUsedAddress
) -> None:
    """Perform one store action on the entry (one store; shared memory)."""
    match action:
        case Publish(field, value):
            view.set_ctrl(field, value)
        case PublishStatus(value):
            view.status = value
        case PublishType(value):
            view.device_type = value
        case PublishUsedAddress(index, address):
            view.set_vq_used_address(index, address)


# ---------------------------------------------------------------------------


class TableEnum(Enum):
    """Base of the tables' states and inputs: members hash by identity.

    Enum members are singletons, so identity hashing is exact; it is a C slot,
    where Enum's own ``__hash__`` (by name) runs Python code on every table
    lookup, and the host looks the table up on every doorbell.
    """

    __hash__ = object.__hash__


_S = TypeVar("_S", bound=Enum)
_I = TypeVar("_I", bound=Enum)


def step(table: dict[tuple[_S, _I], _S], state: _S, inp: _I) -> _S:
    try:
        return table[(state, inp)]
    except KeyError:
        raise LocalProtocolError(f"handshake input {inp} not allowed in state {state}") from None
