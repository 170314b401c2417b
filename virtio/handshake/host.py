"""The host half of the device-page handshakes: what the host does with the card's writes.

Owns :class:`HostHandshake` (one per device) and its two tables: the
card-initiated handshakes (:data:`HOST_TRANSITIONS`: status writes, used-ring
moves, vdev reset) and the host-initiated one (:data:`CONFIG_TRANSITIONS`:
config change and hot remove). Never raises for anything the card wrote: a
bad value becomes a :class:`~virtio.handshake.events.NeedsReset` action.
Imports only ``virtio`` modules below it; no asyncio, no clock.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from virtio.constants import MicConfigChange
from virtio.devpage import H2C_DOORBELLS, RING_PACKED, Ctrl, EntryView
from virtio.errors import LocalProtocolError, RemoteProtocolError
from virtio.handshake.events import (
    Action,
    BeginReset,
    CardGone,
    ConfigAcked,
    Doorbell,
    Event,
    Fault,
    NeedsReset,
    Publish,
    PublishStatus,
    PublishUsedAddress,
    ResetDrained,
    RingConfig,
    RingPeer,
    StartConfigChange,
    StartQueues,
    Stop,
    StopQueues,
    TableEnum,
    Tick,
    TimedOut,
    step,
)
from virtio.split import SplitLayout
from virtio.status import DeviceStatusMachine, DevState

__all__ = [
    "CONFIG_TRANSITIONS",
    "HOST_TRANSITIONS",
    "ConfigInput",
    "ConfigState",
    "HostHandshake",
    "HostInput",
    "HostState",
]


def _clear_config() -> list[Action]:
    return [Publish(Ctrl.CONFIG_CHANGE, 0), Publish(Ctrl.GUEST_ACK, 0)]


class HostState(TableEnum):
    """What the host serves for card-initiated handshakes."""

    SERVING = "serving"
    RESETTING = "resetting"  # vdev_reset seen; the adapter is draining
    STOPPED = "stopped"  # being removed (or a zombie): doorbells only answer config acks


class HostInput(TableEnum):
    CARD_WRITE = "card_write"  # doorbell: status / used-ring move / host_ack
    RESET_REQUEST = "reset_request"  # doorbell with vdev_reset set
    RESET_DRAINED = "reset_drained"
    FAULT = "fault"
    STOP = "stop"
    CARD_GONE = "card_gone"


_H, _HI = HostState, HostInput

#: Card-initiated handshakes on the host. A missing pair is the adapter's bug
#: (LocalProtocolError): every input the card can cause has an entry.
HOST_TRANSITIONS: dict[tuple[HostState, HostInput], HostState] = {
    (_H.SERVING, _HI.CARD_WRITE): _H.SERVING,
    (_H.SERVING, _HI.RESET_REQUEST): _H.RESETTING,
    (_H.SERVING, _HI.FAULT): _H.SERVING,
    (_H.SERVING, _HI.CARD_GONE): _H.SERVING,
    # during a reset the card's writes wait for the acknowledgement
    (_H.RESETTING, _HI.CARD_WRITE): _H.RESETTING,
    (_H.RESETTING, _HI.RESET_REQUEST): _H.RESETTING,
    (_H.RESETTING, _HI.RESET_DRAINED): _H.SERVING,
    (_H.RESETTING, _HI.FAULT): _H.RESETTING,
    # a reset in flight finishes (its acknowledgement lands on the fresh page
    # harmlessly); the card's next write after the reset clears host_ack anyway
    (_H.RESETTING, _HI.CARD_GONE): _H.RESETTING,
    (_H.STOPPED, _HI.CARD_WRITE): _H.STOPPED,
    (_H.STOPPED, _HI.RESET_REQUEST): _H.STOPPED,
    # a reset drained while the removal started is still acknowledged, so a
    # card waiting for it gets on to the removal
    (_H.STOPPED, _HI.RESET_DRAINED): _H.STOPPED,
    (_H.STOPPED, _HI.FAULT): _H.STOPPED,
}
for _st in HostState:
    HOST_TRANSITIONS[(_st, _HI.STOP)] = _H.STOPPED
del _st


class ConfigState(TableEnum):
    """The host-initiated config handshake (config change or hot remove)."""

    IDLE = "idle"
    AWAITING_ACK = "awaiting_ack"


class ConfigInput(TableEnum):
    START = "start"
    GUEST_ACK = "guest_ack"  # doorbell or tick found guest_ack set
    GIVE_UP = "give_up"


#: One config handshake at a time (the adapter serialises them).
CONFIG_TRANSITIONS: dict[tuple[ConfigState, ConfigInput], ConfigState] = {
    (ConfigState.IDLE, ConfigInput.START): ConfigState.AWAITING_ACK,
    (ConfigState.AWAITING_ACK, ConfigInput.GUEST_ACK): ConfigState.IDLE,
    (ConfigState.AWAITING_ACK, ConfigInput.GIVE_UP): ConfigState.IDLE,
}


class HostHandshake:
    """The host half for one device.

    ``view``: the entry (dimensions from the host's own table); ``machine``:
    the device's status machine (its offer); ``default_used``: the used-ring
    address of each vq in the contiguous layout the host allocated;
    ``check_used(index, address, nbytes)`` returns why a used ring the card
    moved is unusable (outside what the host may reach, inside host RAM) or
    None. The current used rings are :attr:`used`.
    """

    __slots__ = (
        "check_used",
        "config_kind",
        "config_state",
        "default_used",
        "machine",
        "sizes",
        "state",
        "used",
        "view",
    )

    def __init__(
        self,
        view: EntryView,
        machine: DeviceStatusMachine,
        sizes: Sequence[int],
        default_used: Sequence[int],
        check_used: Callable[[int, int, int], str | None],
    ) -> None:
        if len(sizes) != len(default_used) or len(sizes) != view.num_vq:
            raise LocalProtocolError("one size and one used ring per vq")
        self.view = view
        self.machine = machine
        self.sizes = tuple(sizes)
        self.default_used = tuple(default_used)
        self.used = list(default_used)
        self.check_used = check_used
        self.state = HostState.SERVING
        self.config_state = ConfigState.IDLE
        self.config_kind = MicConfigChange.NONE

    @property
    def config_pending(self) -> bool:
        return self.config_state is ConfigState.AWAITING_ACK

    def receive(self, event: Event) -> list[Action]:
        """Feed one event; return the actions to perform in order.

        Never raises for anything the card wrote (that becomes :class:`NeedsReset`).

        Raises:
            LocalProtocolError: an event this half does not take, or one the
                tables do not allow now (the adapter's bug).
        """
        match event:
            case Doorbell():
                # the hot path (one per card kick): names bound once, below the class
                inp = _RESET_REQUEST if self.view.ctrl(_VDEV_RESET) else _CARD_WRITE
                prev, self.state = self.state, step(HOST_TRANSITIONS, self.state, inp)
                out: list[Action] = []
                if prev is _SERVING:
                    out = [BeginReset()] if inp is _RESET_REQUEST else self._card_wrote()
                if self.config_state is _AWAITING_ACK:
                    out += self._check_guest_ack()
                return out
            case Tick():
                return self._check_guest_ack()
            case ResetDrained():
                self.state = step(HOST_TRANSITIONS, self.state, _HI.RESET_DRAINED)
                return self._reset_done()
            case Fault(reason):
                self.state = step(HOST_TRANSITIONS, self.state, _HI.FAULT)
                return self._needs_reset(reason)
            case Stop():
                self.state = step(HOST_TRANSITIONS, self.state, _HI.STOP)
                return []
            case CardGone():
                # a config handshake in flight keeps waiting (and times out):
                # the rewritten page holds no guest_ack for it
                self.state = step(HOST_TRANSITIONS, self.state, _HI.CARD_GONE)
                self.machine.write_status(0)  # from any state: RESET is always legal
                self.used = list(self.default_used)
                return []
            case StartConfigChange(kind, db):
                if kind is MicConfigChange.NONE:
                    raise LocalProtocolError("a config handshake needs a change to announce")
                self.config_state = step(CONFIG_TRANSITIONS, self.config_state, ConfigInput.START)
                self.config_kind = kind
                out = [Publish(Ctrl.GUEST_ACK, 0), Publish(Ctrl.CONFIG_CHANGE, int(kind))]
                if 0 <= db < H2C_DOORBELLS:
                    out.append(RingConfig(db))
                return out
            case TimedOut():
                self.config_state = step(CONFIG_TRANSITIONS, self.config_state, ConfigInput.GIVE_UP)
                return _clear_config()
        raise LocalProtocolError(f"the host half does not take {type(event).__name__}")

    # -- card-initiated ------------------------------------------------------
    def _card_wrote(self) -> list[Action]:
        """Apply the status, then a used-ring move, then acknowledge with ``host_ack``."""
        out = self._status()
        if not out or not isinstance(out[-1], NeedsReset):
            out += self._used_move()
        if self.view.ctrl(_HOST_ACK) == 0:
            out += [Publish(Ctrl.HOST_ACK, 1), RingPeer()]  # the status write is applied
        return out

    def _status(self) -> list[Action]:
        m = self.machine
        value = self.view.status
        if value == m.status:
            return []
        was_live = m.live
        m.write_acks(self.view.guest_acks)
        try:
            m.write_status(value)
        except RemoteProtocolError as e:
            return [PublishStatus(m.status), NeedsReset(str(e))]
        out: list[Action] = [PublishStatus(m.status)]  # refusals are visible to the card
        if value == 0:
            out.append(StopQueues("driver reset the device"))
        elif m.state is DevState.FAILED:
            out.append(StopQueues(f"driver set FAILED: {m.reason or '-'}"))
        elif m.live and not was_live:
            out.append(StartQueues(tuple(self.used), m.features))
        return out

    def _used_move(self) -> list[Action]:
        if not self.view.ctrl(_USED_ADDRESS_UPDATED):
            return []
        # vop_virtio_init_post: clear the flag so the card stops waiting, whatever we decide
        done: list[Action] = [Publish(Ctrl.USED_ADDRESS_UPDATED, 0), RingPeer()]
        try:
            self.used = self._take_used()
        except RemoteProtocolError as e:
            return self._needs_reset(str(e)) + done
        return done

    def _take_used(self) -> list[int]:
        if self.machine.live:
            raise RemoteProtocolError(
                "card moved the used ring after DRIVER_OK", reason="used-address"
            )
        if self.machine.features & RING_PACKED:
            raise RemoteProtocolError(
                "card moved the used ring of a packed-ring device (a packed ring has none)",
                reason="used-address",
            )
        new: list[int] = []
        for i, num in enumerate(self.sizes):
            addr = self.view.vq_used_address(i)
            if addr % 4:
                raise RemoteProtocolError(
                    f"used ring {i} at {addr:#x} not 4-byte aligned", reason="used-address"
                )
            if addr != self.default_used[i]:
                why = self.check_used(i, addr, SplitLayout(num, 0, 0, 0).used_bytes)
                if why is not None:
                    raise RemoteProtocolError(
                        f"used ring {i} at {addr:#x} {why}", reason="used-address"
                    )
            new.append(addr)
        return new

    def _needs_reset(self, reason: str) -> list[Action]:
        self.machine.device_error(reason)
        return [PublishStatus(self.machine.status), NeedsReset(reason)]

    def _reset_done(self) -> list[Action]:
        """Linux ``vop_virtio_device_reset`` after the drain: status 0, flags, host_ack."""
        self.machine.write_status(0)
        self.used = list(self.default_used)
        out: list[Action] = [PublishStatus(0)]
        out += [PublishUsedAddress(i, a) for i, a in enumerate(self.default_used)]
        out += [
            Publish(Ctrl.USED_ADDRESS_UPDATED, 0),
            Publish(Ctrl.VDEV_RESET, 0),
            Publish(Ctrl.HOST_ACK, 1),
            RingPeer(),
        ]
        return out

    # -- host-initiated ------------------------------------------------------
    def _check_guest_ack(self) -> list[Action]:
        if self.config_state is not ConfigState.AWAITING_ACK or not self.view.ctrl(Ctrl.GUEST_ACK):
            return []
        self.config_state = step(CONFIG_TRANSITIONS, self.config_state, ConfigInput.GUEST_ACK)
        return [*_clear_config(), ConfigAcked(self.config_kind)]


# Hot-path names: on Python 3.11 each enum attribute lookup costs ~0.2 us.
_SERVING = HostState.SERVING
_AWAITING_ACK = ConfigState.AWAITING_ACK
_RESET_REQUEST = HostInput.RESET_REQUEST
_CARD_WRITE = HostInput.CARD_WRITE
_VDEV_RESET = Ctrl.VDEV_RESET
_HOST_ACK = Ctrl.HOST_ACK
_USED_ADDRESS_UPDATED = Ctrl.USED_ADDRESS_UPDATED
