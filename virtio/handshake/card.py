"""The card half of the device-page handshakes: what the card writes, and what it waits for.

Owns :class:`CardHandshake` (one per device) and its table
(:data:`CARD_TRANSITIONS`): the card-initiated handshakes (status write, vdev
reset, used-ring move) and the card's answers to the host's config change
and hot remove. Raises :class:`~virtio.errors.RemoteProtocolError` for a
value the host may not write, and nothing else for what the host wrote.
Imports only ``virtio`` modules below it; no asyncio, no clock.
"""

from __future__ import annotations

from virtio.constants import DeviceType, MicConfigChange
from virtio.devpage import Ctrl, EntryView
from virtio.errors import LocalProtocolError, RemoteProtocolError
from virtio.handshake.events import (
    Action,
    ConfigChanged,
    ConfigDoorbell,
    Doorbell,
    Event,
    Handled,
    MoveUsedRings,
    Publish,
    PublishStatus,
    PublishType,
    RemoveDevice,
    RequestReset,
    ResetAcked,
    RingPeer,
    StatusAcked,
    TableEnum,
    Tick,
    TimedOut,
    UsedRingsTaken,
    WriteStatus,
    step,
)

__all__ = ["CARD_TRANSITIONS", "CardHandshake", "CardInput", "CardState"]


class CardState(TableEnum):
    """Where the card's side of one device's handshakes is."""

    IDLE = "idle"
    AWAIT_STATUS_ACK = "await_status_ack"
    AWAIT_RESET_ACK = "await_reset_ack"
    AWAIT_USED_ACK = "await_used_ack"
    CONFIG_CHANGING = "config_changing"  # the driver is being told
    REMOVING = "removing"  # the driver is being unbound
    REMOVED = "removed"


class CardInput(TableEnum):
    WRITE_STATUS = "write_status"
    REQUEST_RESET = "request_reset"
    MOVE_USED_RINGS = "move_used_rings"
    HOST_ACK = "host_ack"  # doorbell or tick found the awaited answer
    TIMED_OUT = "timed_out"
    CONFIG_CHANGE = "config_change"  # config doorbell found config_change = 2, not acked
    DEV_REMOVE = "dev_remove"  # config doorbell found config_change = 1, not acked
    HANDLED = "handled"


_C, _CI = CardState, CardInput

#: Card-initiated handshakes run one at a time (the bus serialises them with its
#: scan lock); host-initiated ones are taken only between them.
CARD_TRANSITIONS: dict[tuple[CardState, CardInput], CardState] = {
    (_C.IDLE, _CI.WRITE_STATUS): _C.AWAIT_STATUS_ACK,
    (_C.IDLE, _CI.REQUEST_RESET): _C.AWAIT_RESET_ACK,
    (_C.IDLE, _CI.MOVE_USED_RINGS): _C.AWAIT_USED_ACK,
    (_C.IDLE, _CI.CONFIG_CHANGE): _C.CONFIG_CHANGING,
    (_C.IDLE, _CI.DEV_REMOVE): _C.REMOVING,
    (_C.AWAIT_STATUS_ACK, _CI.HOST_ACK): _C.IDLE,
    (_C.AWAIT_STATUS_ACK, _CI.TIMED_OUT): _C.IDLE,
    (_C.AWAIT_RESET_ACK, _CI.HOST_ACK): _C.IDLE,
    (_C.AWAIT_RESET_ACK, _CI.TIMED_OUT): _C.IDLE,
    (_C.AWAIT_USED_ACK, _CI.HOST_ACK): _C.IDLE,
    (_C.AWAIT_USED_ACK, _CI.TIMED_OUT): _C.IDLE,
    (_C.CONFIG_CHANGING, _CI.HANDLED): _C.IDLE,
    (_C.REMOVING, _CI.HANDLED): _C.REMOVED,
}


class CardHandshake:
    """The card half for one device (``view``: dimensions from the card's validated parse)."""

    __slots__ = ("state", "view")

    def __init__(self, view: EntryView) -> None:
        self.view = view
        self.state = CardState.IDLE

    def _go(self, inp: CardInput) -> CardState:
        prev = self.state
        self.state = step(CARD_TRANSITIONS, prev, inp)
        return prev

    def receive(self, event: Event) -> list[Action]:
        """Feed one event; return the actions to perform in order.

        Raises:
            RemoteProtocolError: the host wrote a value it may not (``host_ack``
                other than 0/1, an unknown ``config_change``).
            LocalProtocolError: an event this half does not take, or one the
                table does not allow now (the adapter's bug).
        """
        match event:
            case WriteStatus(value):
                self._go(_CI.WRITE_STATUS)
                return [Publish(Ctrl.HOST_ACK, 0), PublishStatus(value), RingPeer()]
            case RequestReset():
                self._go(_CI.REQUEST_RESET)
                return [Publish(Ctrl.HOST_ACK, 0), Publish(Ctrl.VDEV_RESET, 1), RingPeer()]
            case MoveUsedRings():
                self._go(_CI.MOVE_USED_RINGS)
                return [Publish(Ctrl.USED_ADDRESS_UPDATED, 1), RingPeer()]
            case Doorbell() | Tick():
                return self._check_answer()
            case TimedOut():
                self._go(_CI.TIMED_OUT)
                return []
            case ConfigDoorbell():
                return self._config_request()
            case Handled():
                if self._go(_CI.HANDLED) is CardState.REMOVING:
                    # Linux _vop_remove_device: no more interrupts, ack, then free the slot
                    return [
                        Publish(Ctrl.H2C_VDEV_DB, -1),
                        Publish(Ctrl.GUEST_ACK, 1),
                        PublishType(DeviceType.REMOVED),
                        RingPeer(),
                    ]
                return [Publish(Ctrl.GUEST_ACK, 1), RingPeer()]
        raise LocalProtocolError(f"the card half does not take {type(event).__name__}")

    def _host_ack(self) -> bool:
        v = self.view.ctrl(Ctrl.HOST_ACK)
        if v not in (0, 1):
            raise RemoteProtocolError(f"host_ack {v}, must be 0 or 1", reason="device-page")
        return v == 1

    def _check_answer(self) -> list[Action]:
        match self.state:
            case CardState.AWAIT_STATUS_ACK if self._host_ack():
                self._go(_CI.HOST_ACK)
                return [StatusAcked(self.view.status)]
            case CardState.AWAIT_RESET_ACK if self._host_ack():
                self._go(_CI.HOST_ACK)
                return [PublishStatus(0), ResetAcked()]
            case CardState.AWAIT_USED_ACK if self.view.ctrl(Ctrl.USED_ADDRESS_UPDATED) == 0:
                self._go(_CI.HOST_ACK)
                return [UsedRingsTaken()]
        return []

    def _config_request(self) -> list[Action]:
        raw = self.view.ctrl(Ctrl.CONFIG_CHANGE)
        try:
            kind = MicConfigChange(raw)
        except ValueError:
            raise RemoteProtocolError(
                f"config_change {raw} unknown", reason="device-page"
            ) from None
        if kind is MicConfigChange.NONE or self.view.ctrl(Ctrl.GUEST_ACK):
            return []  # nothing asked, or already acknowledged
        if kind is MicConfigChange.DEV_REMOVE:
            self._go(_CI.DEV_REMOVE)
            return [RemoveDevice()]
        self._go(_CI.CONFIG_CHANGE)
        return [ConfigChanged()]
