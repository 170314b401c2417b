"""Device status and feature negotiation (virtio 1.2 §2.1, §2.2, §3.1), as a table.

Everything that moves a device's status lives in this file (the h11 rule):
the ``(state, event) -> next state`` table, the device's right to refuse
FEATURES_OK, and the failure state an illegal transition leads to. Sans-IO:
no asyncio, no OS, no ``transport``.

The device side (:class:`DeviceStatusMachine`) is what the host enforces on
what the card writes into the device page. The driver side is a helper that
computes acks (:func:`driver_acks`). Unlike Linux MIC, which never read the
guest acks, acks outside the offer are refused here.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

from virtio.constants import DeviceStatus, Feature
from virtio.errors import RemoteProtocolError

__all__ = [
    "TRANSITIONS",
    "DevState",
    "DeviceStatusMachine",
    "StatusEvent",
    "driver_acks",
]

_S = DeviceStatus


class DevState(Enum):
    """Where a device is in its initialisation (§3.1.1)."""

    RESET = "reset"
    ACKNOWLEDGED = "acknowledged"
    DRIVER = "driver"
    FEATURES_OK = "features_ok"
    LIVE = "driver_ok"
    NEEDS_RESET = "needs_reset"
    FAILED = "failed"


class StatusEvent(Enum):
    """What a status write (or the device itself) does."""

    RESET = "reset"  # driver writes 0
    ACKNOWLEDGE = "acknowledge"
    DRIVER = "driver"
    FEATURES_OK = "features_ok"
    DRIVER_OK = "driver_ok"
    FAIL = "fail"  # driver sets FAILED
    DEVICE_ERROR = "device_error"  # device sets DEVICE_NEEDS_RESET


#: The whole protocol. A (state, event) pair missing here is a protocol error
#: that moves the device to NEEDS_RESET (as QEMU ``virtio_error`` does).
TRANSITIONS: dict[tuple[DevState, StatusEvent], DevState] = {
    (DevState.RESET, StatusEvent.ACKNOWLEDGE): DevState.ACKNOWLEDGED,
    (DevState.ACKNOWLEDGED, StatusEvent.DRIVER): DevState.DRIVER,
    (DevState.DRIVER, StatusEvent.FEATURES_OK): DevState.FEATURES_OK,
    # Legacy (no VERSION_1) drivers go straight to DRIVER_OK (§7.2.1, mpssd era).
    (DevState.DRIVER, StatusEvent.DRIVER_OK): DevState.LIVE,
    (DevState.FEATURES_OK, StatusEvent.DRIVER_OK): DevState.LIVE,
}
for _st in DevState:
    TRANSITIONS[(_st, StatusEvent.RESET)] = DevState.RESET
    TRANSITIONS[(_st, StatusEvent.FAIL)] = DevState.FAILED
    if _st is not DevState.RESET:
        TRANSITIONS[(_st, StatusEvent.DEVICE_ERROR)] = DevState.NEEDS_RESET
del _st

_BIT_EVENT = {
    int(_S.ACKNOWLEDGE): StatusEvent.ACKNOWLEDGE,
    int(_S.DRIVER): StatusEvent.DRIVER,
    int(_S.FEATURES_OK): StatusEvent.FEATURES_OK,
    int(_S.DRIVER_OK): StatusEvent.DRIVER_OK,
}


class DeviceStatusMachine:
    """The device's view of its status byte and negotiated features.

    ``offered`` is the host feature bitmap; ``required`` bits must be acked
    (e.g. VERSION_1 when the device is modern-only); ``validate`` may refuse a
    feature combination (return a reason string to refuse). The caller feeds
    every status value the driver writes to :meth:`write_status` and acks to
    :meth:`write_acks`, and publishes :attr:`status` back.
    """

    __slots__ = ("acks", "features", "offered", "reason", "required", "state", "status", "validate")

    def __init__(
        self,
        offered: int,
        *,
        required: int = 0,
        validate: Callable[[int], str | None] | None = None,
    ) -> None:
        self.offered = offered
        self.required = required
        self.validate = validate
        self.state = DevState.RESET
        self.status = 0
        self.acks = 0
        self.features = 0
        self.reason = ""

    @property
    def live(self) -> bool:
        """Buffers may be consumed (DRIVER_OK and not NEEDS_RESET/FAILED)."""
        return self.state is DevState.LIVE

    @property
    def modern(self) -> bool:
        return bool(self.features & Feature.VERSION_1)

    def write_acks(self, acks: int) -> None:
        """Record the driver's acked features (only meaningful before FEATURES_OK)."""
        self.acks = acks

    def _apply(self, event: StatusEvent) -> DevState:
        nxt = TRANSITIONS.get((self.state, event))
        if nxt is None:
            prev = self.state
            self.device_error(f"illegal status transition {event.value} from {prev.value}")
            self.state = DevState.NEEDS_RESET  # even from RESET: only a reset clears it
            raise RemoteProtocolError(
                f"driver moved status {event.value} from {prev.value}", reason="status"
            )
        self.state = nxt
        return nxt

    def device_error(self, reason: str) -> None:
        """The device gives up on the driver: DEVICE_NEEDS_RESET (§2.1.2)."""
        self.reason = reason
        if self.state is not DevState.RESET:
            self.state = DevState.NEEDS_RESET
        self.status |= _S.DEVICE_NEEDS_RESET

    def write_status(self, value: int) -> int:
        """Apply a status byte written by the driver; return the status to publish.

        FEATURES_OK is kept only if the acks are acceptable; otherwise the bit
        is cleared so the driver's re-read sees the refusal (§3.1.1 step 6).

        Raises:
            RemoteProtocolError: an illegal transition (the device is now
                NEEDS_RESET and :attr:`status` has the bit set).
        """
        value &= 0xFF
        if value == 0:
            self._apply(StatusEvent.RESET)
            self.status = 0
            self.acks = self.features = 0
            self.reason = ""
            return 0
        if value & _S.FAILED:
            self._apply(StatusEvent.FAIL)
            # the driver can neither set nor clear DEVICE_NEEDS_RESET
            nr = int(_S.DEVICE_NEEDS_RESET)
            self.status = (value & ~nr) | (self.status & nr)
            return self.status
        cur = self.status & ~int(_S.DEVICE_NEEDS_RESET)
        value &= ~int(_S.DEVICE_NEEDS_RESET)  # the driver cannot set or clear it
        if self.state is DevState.NEEDS_RESET:
            if value == cur:
                return self.status
            self._apply(StatusEvent.ACKNOWLEDGE)  # any progress needs a reset first: raises
        if value == cur:
            return self.status  # rewriting the same status is harmless
        if value & cur != cur:
            self.device_error(f"driver cleared status bits {cur & ~value:#x} without a reset")
            raise RemoteProtocolError(
                f"status bits {cur & ~value:#x} cleared without reset", reason="status"
            )
        for bit in (_S.ACKNOWLEDGE, _S.DRIVER, _S.FEATURES_OK, _S.DRIVER_OK):
            b = int(bit)
            if value & b and not cur & b:
                if bit is _S.FEATURES_OK:
                    if not self._features_acceptable():
                        # refuse: leave FEATURES_OK clear; the state does not move
                        return self.status
                    self._apply(StatusEvent.FEATURES_OK)
                    self.features = self.acks
                elif bit is _S.DRIVER_OK:
                    if self.state is DevState.DRIVER:
                        if self.acks & Feature.VERSION_1:
                            self.device_error("modern driver skipped FEATURES_OK")
                            raise RemoteProtocolError(
                                "DRIVER_OK before FEATURES_OK with VERSION_1", reason="status"
                            )
                        if not self._features_acceptable():
                            self.device_error(self.reason)
                            raise RemoteProtocolError(self.reason, reason="features")
                        self.features = self.acks
                    self._apply(StatusEvent.DRIVER_OK)
                else:
                    self._apply(_BIT_EVENT[b])
                cur |= b
                self.status = (self.status & int(_S.DEVICE_NEEDS_RESET)) | cur
        return self.status

    def _features_acceptable(self) -> bool:
        extra = self.acks & ~self.offered
        if extra:
            self.reason = f"driver acked features {extra:#x} that were not offered"
            return False
        missing = self.required & ~self.acks
        if missing:
            self.reason = f"driver did not ack required features {missing:#x}"
            return False
        if self.validate is not None:
            why = self.validate(self.acks)
            if why:
                self.reason = why
                return False
        return True


def driver_acks(offered: int, supported: int) -> int:
    """The features a driver acks: what it supports of what is offered (§3.1.1 step 4)."""
    return offered & supported
