"""virtio-console's sans-IO part (virtio/console.py): queues, control messages, config."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtio import console as C
from virtio import layouts as L
from virtio.constants import ConsoleEvent
from virtio.errors import LocalProtocolError, RemoteProtocolError


def test_port_queues_follow_the_spec() -> None:
    # §5.3.2: port 0 on 0/1, the control pair on 2/3, port k on 2+2k/3+2k
    assert C.port_queues(0) == (0, 1)
    assert (C.CONTROL_RX, C.CONTROL_TX) == (2, 3)
    assert [C.port_queues(k) for k in (1, 2, 3)] == [(4, 5), (6, 7), (8, 9)]


@pytest.mark.parametrize("nr_ports", [1, 2, 3])
def test_queue_count_and_max_ports_agree(nr_ports: int) -> None:
    n = C.num_queues(nr_ports, multiport=True)
    assert C.max_ports(n) == nr_ports
    # every port's queues are inside the device's, none is the control pair
    used = {q for k in range(nr_ports) for q in C.port_queues(k)}
    assert used | {C.CONTROL_RX, C.CONTROL_TX} == set(range(n))
    assert C.num_queues(nr_ports, multiport=False) == 2


def test_a_vop_device_has_room_for_three_ports() -> None:
    assert C.max_ports(L.MAX_NUM_VQ) == 3
    assert C.max_ports(2) == 1  # no control queue: port 0 only


def test_control_twin_matches_construct_golden_bytes() -> None:
    golden = bytes.fromhex("0300000006000100")
    assert L.ConsoleControl.build({"id": 3, "event": ConsoleEvent.PORT_OPEN, "value": 1}) == golden
    assert C.pack_control(3, ConsoleEvent.PORT_OPEN, 1) == golden
    assert C.CONTROL_SIZE == L.ConsoleControl.sizeof() == 8


def test_resize_is_rows_then_cols() -> None:
    raw = C.pack_resize(cols=132, rows=50)
    assert raw == L.ConsoleResize.build({"rows": 50, "cols": 132}) == bytes.fromhex("32008400")
    assert C.parse_resize(raw) == (132, 50)
    assert C.parse_resize(raw + b"extra") == (132, 50)
    with pytest.raises(C.ControlError, match="RESIZE with 3 bytes"):
        C.parse_resize(raw[:3])


def test_device_messages_carry_a_payload() -> None:
    raw = C.pack_control(1, ConsoleEvent.PORT_NAME, 1, b"org.example\0")
    msg = C.parse_control(raw, from_driver=False)
    assert msg == C.ControlMessage(1, ConsoleEvent.PORT_NAME, 1, b"org.example\0")
    assert C.parse_port_name(msg.payload) == "org.example"


def test_driver_messages_are_exactly_one_header() -> None:
    raw = C.pack_control(0, ConsoleEvent.DEVICE_READY, 1)
    assert C.parse_control(raw, from_driver=True) == C.ControlMessage(0, 0, 1)
    with pytest.raises(C.ControlError, match="9 bytes, want 8"):
        C.parse_control(raw + b"x", from_driver=True)


@pytest.mark.parametrize("from_driver", [True, False])
def test_short_messages_raise_the_remote_error(from_driver: bool) -> None:
    with pytest.raises(RemoteProtocolError) as ei:
        C.parse_control(b"\x01\x02", from_driver=from_driver)
    assert isinstance(ei.value, C.ControlError)
    assert ei.value.reason == "control"


@given(st.binary(max_size=64), st.booleans())
def test_arbitrary_bytes_parse_or_raise_the_remote_error(data: bytes, from_driver: bool) -> None:
    try:
        msg = C.parse_control(data, from_driver=from_driver)
    except C.ControlError:
        return
    assert C.pack_control(msg.port, msg.event, msg.value, msg.payload) == data
    # payloads too: they parse or raise the remote error, never anything else
    with contextlib.suppress(C.ControlError):
        C.parse_resize(msg.payload)
    with contextlib.suppress(C.ControlError):
        C.parse_port_name(msg.payload)


@pytest.mark.parametrize(
    ("payload", "ok"),
    [
        (b"org.mic-vop.agent.0", True),
        (b"name\0\0\0", True),
        (b"", False),
        (b"\0\0", False),
        (b"\x01\x02", False),  # unprintable
        (b"a" * 120, True),
        (b"a" * 121, False),
        ("é".encode() * 61, False),  # 61 characters, 122 bytes
    ],
)
def test_port_names(payload: bytes, ok: bool) -> None:
    if ok:
        assert C.parse_port_name(payload) == payload.rstrip(b"\0").decode()
    else:
        with pytest.raises(C.ControlError, match="bad PORT_NAME"):
            C.parse_port_name(payload)


def test_config_round_trip_matches_construct() -> None:
    raw = C.build_config(cols=80, rows=25, max_nr_ports=3)
    parsed = L.ConsoleConfig.parse(raw)
    assert (parsed.cols, parsed.rows, parsed.max_nr_ports, parsed.emerg_wr) == (80, 25, 3, 0)
    assert C.parse_config(raw) == C.ConsoleConfigValues(80, 25, 3)


def test_config_errors() -> None:
    with pytest.raises(RemoteProtocolError, match="does not parse") as ei:
        C.parse_config(bytes(11))
    assert ei.value.reason == "config"
    with pytest.raises(LocalProtocolError):
        C.build_config(cols=70000, rows=25, max_nr_ports=1)
