"""Device status and feature negotiation (virtio 1.2 §2.1, §3.1): every table pair (h2-style)."""

from __future__ import annotations

import pytest

from tests.virtio.pair import RingPair
from virtio.constants import DeviceStatus, Feature
from virtio.errors import LocalProtocolError, RemoteProtocolError
from virtio.status import TRANSITIONS, DeviceStatusMachine, DevState, StatusEvent, driver_acks

S = DeviceStatus
ACK = int(S.ACKNOWLEDGE)
DRV = int(S.DRIVER)
FOK = int(S.FEATURES_OK)
DOK = int(S.DRIVER_OK)
NR = int(S.DEVICE_NEEDS_RESET)
FAILED = int(S.FAILED)
V1 = int(Feature.VERSION_1)
EVIDX = int(Feature.EVENT_IDX)
IND = int(Feature.INDIRECT_DESC)
OFFERED = V1 | EVIDX | IND

#: The status byte a device in each state publishes (to set up table tests).
STATUS_OF = {
    DevState.RESET: 0,
    DevState.ACKNOWLEDGED: ACK,
    DevState.DRIVER: ACK | DRV,
    DevState.FEATURES_OK: ACK | DRV | FOK,
    DevState.LIVE: ACK | DRV | FOK | DOK,
    DevState.NEEDS_RESET: ACK | DRV | NR,
    DevState.FAILED: ACK | FAILED,
}


def _pair_params() -> list[object]:
    return [
        pytest.param(st, ev, id=f"{st.name}-{ev.name}") for st in DevState for ev in StatusEvent
    ]


def machine_in(state: DevState, **kw: object) -> DeviceStatusMachine:
    m = DeviceStatusMachine(OFFERED, **kw)  # type: ignore[arg-type]
    m.state = state
    m.status = STATUS_OF[state]
    return m


# ---------------------------------------------------------------------------
# the table, pair by pair


def test_table_shape() -> None:
    # 5 handshake edges, RESET and FAIL from every state, DEVICE_ERROR from all but RESET
    assert len(TRANSITIONS) == 5 + len(DevState) * 2 + len(DevState) - 1
    assert TRANSITIONS[(DevState.RESET, StatusEvent.ACKNOWLEDGE)] is DevState.ACKNOWLEDGED
    assert TRANSITIONS[(DevState.DRIVER, StatusEvent.DRIVER_OK)] is DevState.LIVE


@pytest.mark.parametrize(("state", "event"), _pair_params())
def test_every_state_event_pair(state: DevState, event: StatusEvent) -> None:
    m = machine_in(state)
    expected = TRANSITIONS.get((state, event))
    if expected is not None:
        assert m._apply(event) is expected
        assert m.state is expected
        return
    with pytest.raises(RemoteProtocolError) as exc:
        m._apply(event)
    assert exc.value.reason == "status"
    assert m.state is DevState.NEEDS_RESET
    assert m.status & NR
    assert not m.live
    assert event.value in m.reason


# ---------------------------------------------------------------------------
# handshakes


def test_modern_handshake() -> None:
    m = DeviceStatusMachine(OFFERED, required=V1)
    assert m.state is DevState.RESET
    assert m.write_status(ACK) == ACK
    assert m.state is DevState.ACKNOWLEDGED
    assert m.write_status(ACK | DRV) == ACK | DRV
    assert m.state is DevState.DRIVER
    acks = driver_acks(m.offered, V1 | EVIDX | (1 << 50))
    assert acks == V1 | EVIDX
    m.write_acks(acks)
    assert m.write_status(ACK | DRV | FOK) == ACK | DRV | FOK  # re-read: accepted
    assert m.state is DevState.FEATURES_OK
    assert m.features == acks
    assert m.modern
    assert not m.live
    assert m.write_status(ACK | DRV | FOK | DOK) == ACK | DRV | FOK | DOK
    assert m.state is DevState.LIVE
    assert m.live
    # writing the same status again is harmless
    assert m.write_status(ACK | DRV | FOK | DOK) == ACK | DRV | FOK | DOK
    assert m.live


def test_modern_handshake_in_one_write() -> None:
    m = DeviceStatusMachine(OFFERED, required=V1)
    m.write_acks(V1)
    assert m.write_status(ACK | DRV | FOK | DOK) == ACK | DRV | FOK | DOK
    assert m.live
    assert m.features == V1


@pytest.mark.parametrize(
    ("acks", "required", "validate", "why"),
    [
        (V1 | (1 << 40), V1, None, "not offered"),
        (EVIDX, V1, None, "required"),
        (V1 | EVIDX, V1, lambda a: "no EVENT_IDX here" if a & EVIDX else None, "no EVENT_IDX"),
    ],
    ids=["acks-not-offered", "required-missing", "validate-refuses"],
)
def test_device_refuses_features_ok(acks: int, required: int, validate: object, why: str) -> None:
    m = DeviceStatusMachine(OFFERED, required=required, validate=validate)  # type: ignore[arg-type]
    m.write_status(ACK)
    m.write_status(ACK | DRV)
    m.write_acks(acks)
    status = m.write_status(ACK | DRV | FOK)
    assert not status & FOK  # the driver's re-read sees the refusal
    assert status == ACK | DRV
    assert m.status == ACK | DRV
    assert m.state is DevState.DRIVER
    assert why in m.reason
    assert m.features == 0
    # DRIVER_OK together with FEATURES_OK is refused the same way
    assert m.write_status(ACK | DRV | FOK | DOK) == ACK | DRV
    assert not m.live
    # a driver that fixes its acks may try again
    m.write_acks(V1)
    assert m.write_status(ACK | DRV | FOK) == ACK | DRV | FOK
    assert m.features == V1


def test_validate_accepting() -> None:
    seen = []

    def validate(acks: int) -> str | None:
        seen.append(acks)
        return None

    m = DeviceStatusMachine(OFFERED, validate=validate)
    m.write_acks(V1 | IND)
    assert m.write_status(ACK | DRV | FOK) & FOK
    assert seen == [V1 | IND]


def test_driver_gives_up_after_refusal() -> None:
    m = DeviceStatusMachine(OFFERED, required=V1)
    m.write_status(ACK | DRV)
    m.write_acks(0)
    assert not m.write_status(ACK | DRV | FOK) & FOK
    assert m.write_status(ACK | DRV | FAILED) == ACK | DRV | FAILED
    assert m.state is DevState.FAILED
    assert m.write_status(0) == 0
    assert m.state is DevState.RESET


def test_modern_driver_skipping_features_ok() -> None:
    m = DeviceStatusMachine(OFFERED)
    m.write_status(ACK | DRV)
    m.write_acks(V1)
    with pytest.raises(RemoteProtocolError) as exc:
        m.write_status(ACK | DRV | DOK)
    assert exc.value.reason == "status"
    assert m.state is DevState.NEEDS_RESET
    assert m.status & NR
    assert not m.live


def test_legacy_handshake() -> None:
    m = DeviceStatusMachine(OFFERED)
    m.write_status(ACK)
    m.write_status(ACK | DRV)
    m.write_acks(EVIDX)
    assert m.write_status(ACK | DRV | DOK) == ACK | DRV | DOK
    assert m.state is DevState.LIVE
    assert m.live
    assert m.features == EVIDX
    assert not m.modern


@pytest.mark.parametrize(
    ("acks", "required"),
    [(1 << 45, 0), (EVIDX, V1)],
    ids=["acks-not-offered", "required-missing"],
)
def test_legacy_driver_ok_with_bad_acks(acks: int, required: int) -> None:
    m = DeviceStatusMachine(OFFERED, required=required)
    m.write_status(ACK | DRV)
    m.write_acks(acks)
    with pytest.raises(RemoteProtocolError) as exc:
        m.write_status(ACK | DRV | DOK)
    assert exc.value.reason == "features"
    assert m.state is DevState.NEEDS_RESET
    assert m.status & NR
    assert m.features == 0


@pytest.mark.parametrize(
    ("before", "write"),
    [
        (ACK | DRV, ACK),
        (ACK | DRV | FOK, ACK | DRV),
        (ACK | DRV | FOK | DOK, ACK | DRV | DOK),
        (ACK | DRV | FOK | DOK, DRV | FOK | DOK),
    ],
)
def test_clearing_bits_without_reset_is_refused(before: int, write: int) -> None:
    m = DeviceStatusMachine(OFFERED)
    m.write_acks(V1)
    m.write_status(before)
    assert m.status == before
    with pytest.raises(RemoteProtocolError) as exc:
        m.write_status(write)
    assert exc.value.reason == "status"
    assert m.state is DevState.NEEDS_RESET
    assert m.status == before | NR
    assert "without a reset" in m.reason


def test_out_of_order_bits_are_refused() -> None:
    m = DeviceStatusMachine(OFFERED)
    m.write_status(ACK)
    with pytest.raises(RemoteProtocolError):
        m.write_status(ACK | FOK)  # FEATURES_OK before DRIVER
    assert m.state is DevState.NEEDS_RESET


def test_needs_reset_until_reset() -> None:
    m = DeviceStatusMachine(OFFERED)
    m.write_status(ACK | DRV)
    m.device_error("backend lost")
    assert m.state is DevState.NEEDS_RESET
    assert m.status == ACK | DRV | NR
    assert m.reason == "backend lost"
    # re-writing what it reads is harmless (the driver cannot clear NEEDS_RESET)
    assert m.write_status(ACK | DRV | NR) == ACK | DRV | NR
    assert m.write_status(ACK | DRV) == ACK | DRV | NR
    with pytest.raises(RemoteProtocolError):
        m.write_status(ACK | DRV | FOK)
    assert m.state is DevState.NEEDS_RESET
    assert m.write_status(0) == 0
    assert m.state is DevState.RESET
    assert (m.status, m.acks, m.features, m.reason) == (0, 0, 0, "")


def test_device_error_while_live() -> None:
    m = DeviceStatusMachine(OFFERED)
    m.write_acks(V1)
    m.write_status(ACK | DRV | FOK | DOK)
    m.device_error("ring error")
    assert not m.live
    assert m.status == ACK | DRV | FOK | DOK | NR


def test_driver_cannot_set_needs_reset() -> None:
    m = DeviceStatusMachine(OFFERED)
    assert m.write_status(ACK | NR) == ACK
    assert m.state is DevState.ACKNOWLEDGED


def test_driver_cannot_touch_needs_reset_through_failed() -> None:
    m = DeviceStatusMachine(OFFERED)
    m.write_status(ACK)
    assert not m.write_status(ACK | FAILED | NR) & NR
    m = DeviceStatusMachine(OFFERED)
    m.write_status(ACK)
    m.device_error("x")
    assert m.write_status(ACK | FAILED) & NR


@pytest.mark.parametrize(
    "setup",
    [
        [],
        [ACK],
        [ACK, ACK | DRV],
        [ACK, ACK | DRV, ACK | DRV | FOK],
        [ACK, ACK | DRV, ACK | DRV | FOK, ACK | DRV | FOK | DOK],
        [ACK, ACK | DRV | FAILED],
        [ACK, ACK | DRV | FOK | FAILED],
    ],
    ids=["reset", "ack", "driver", "features_ok", "live", "failed-early", "failed-late"],
)
def test_reset_from_anywhere(setup: list[int]) -> None:
    m = DeviceStatusMachine(OFFERED)
    m.write_acks(V1)
    for v in setup:
        m.write_status(v)
    assert m.write_status(0) == 0
    assert m.state is DevState.RESET
    assert (m.status, m.acks, m.features) == (0, 0, 0)
    # and the handshake works again
    m.write_acks(V1)
    assert m.write_status(ACK | DRV | FOK | DOK) & DOK
    assert m.live


def test_reset_from_needs_reset_and_failed_states() -> None:
    for state in (DevState.NEEDS_RESET, DevState.FAILED):
        m = machine_in(state)
        assert m.write_status(0) == 0
        assert m.state is DevState.RESET


def test_status_is_a_byte() -> None:
    m = DeviceStatusMachine(OFFERED)
    m.write_status(ACK)
    assert m.write_status(0x100) == 0  # only the low byte counts: a reset
    assert m.state is DevState.RESET


def test_failed_from_every_state() -> None:
    for state in DevState:
        m = machine_in(state)
        status = m.write_status(STATUS_OF[state] & ~NR | FAILED)
        assert status & FAILED
        assert m.state is DevState.FAILED
        assert not m.live


def test_failed_then_clearing_is_refused() -> None:
    m = DeviceStatusMachine(OFFERED)
    m.write_status(ACK | FAILED)
    with pytest.raises(RemoteProtocolError):
        m.write_status(ACK)
    assert m.state is DevState.NEEDS_RESET


def test_reserved_bits_are_dropped() -> None:
    m = DeviceStatusMachine(OFFERED)
    assert m.write_status(ACK | 0x10 | 0x20) == ACK
    assert m.state is DevState.ACKNOWLEDGED


def test_illegal_write_from_reset_requires_a_reset() -> None:
    m = DeviceStatusMachine(OFFERED)
    with pytest.raises(RemoteProtocolError):
        m.write_status(DRV)  # DRIVER without ACKNOWLEDGE
    assert m.status & NR
    assert m.state is DevState.NEEDS_RESET


def test_illegal_write_from_reset_never_goes_live() -> None:
    m = DeviceStatusMachine(OFFERED)
    with pytest.raises(RemoteProtocolError):
        m.write_status(DRV)
    for v in (ACK, ACK | DRV, ACK | DRV | DOK):
        try:
            m.write_status(v)
        except RemoteProtocolError:
            break
    assert not (m.live and m.status & NR)


# ---------------------------------------------------------------------------
# no buffer is consumed before DRIVER_OK


def test_no_buffer_consumed_before_driver_ok() -> None:
    """The adapter activates the queue only when the status machine goes live."""
    p = RingPair(4, activate=False)
    m = DeviceStatusMachine(OFFERED, required=V1)

    def on_status_write(value: int) -> int:
        status = m.write_status(value)
        if m.live and not p.device.ready:
            p.device.activate()
        return status

    def serve_all() -> list[bytes]:
        if not p.device.ready:
            return []
        return [c.read() for c in p.device.pop_many()]

    on_status_write(ACK)
    on_status_write(ACK | DRV)
    m.write_acks(driver_acks(m.offered, V1))
    on_status_write(ACK | DRV | FOK)
    # a driver may fill its queues before DRIVER_OK (e.g. virtio-net rx buffers)
    p.add((b"early",), ())
    p.driver.publish()
    assert serve_all() == []
    with pytest.raises(LocalProtocolError):
        p.device.pop()  # the core itself refuses too
    assert p.device.next_avail == 0
    on_status_write(ACK | DRV | FOK | DOK)
    assert m.live
    assert serve_all() == [b"early"]


def test_driver_acks() -> None:
    assert driver_acks(OFFERED, V1 | IND) == V1 | IND
    assert driver_acks(OFFERED, 0) == 0
    assert driver_acks(0, ~0) == 0
    assert driver_acks(V1, V1 | EVIDX) == V1
