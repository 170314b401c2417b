"""The device-page handshakes (virtio.handshake), without asyncio: every table pair (h2
style), both halves pumped over one page (h11's ConnectionPair), and bad peer input."""

from __future__ import annotations

from collections.abc import Callable

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from virtio.constants import DeviceStatus, DeviceType, Feature, MicConfigChange
from virtio.devpage import Ctrl, EntryView
from virtio.errors import LocalProtocolError, RemoteProtocolError
from virtio.handshake import (
    CARD_TRANSITIONS,
    CONFIG_TRANSITIONS,
    HOST_TRANSITIONS,
    Action,
    BeginReset,
    CardGone,
    CardHandshake,
    CardInput,
    CardState,
    ConfigAcked,
    ConfigChanged,
    ConfigDoorbell,
    ConfigInput,
    ConfigState,
    Doorbell,
    Event,
    Fault,
    Handled,
    HostHandshake,
    HostInput,
    HostState,
    MoveUsedRings,
    NeedsReset,
    Publish,
    PublishStatus,
    PublishType,
    PublishUsedAddress,
    RemoveDevice,
    RequestReset,
    ResetAcked,
    ResetDrained,
    RingConfig,
    RingPeer,
    StartConfigChange,
    StartQueues,
    StatusAcked,
    Stop,
    StopQueues,
    Tick,
    TimedOut,
    UsedRingsTaken,
    WriteStatus,
    publish,
)
from virtio.layouts import DeviceEntry, MicDeviceCtrl, VqConfig, field_offset
from virtio.status import DeviceStatusMachine

S = DeviceStatus
ACK, DRV, FOK, DOK = int(S.ACKNOWLEDGE), int(S.DRIVER), int(S.FEATURES_OK), int(S.DRIVER_OK)
NR = int(S.DEVICE_NEEDS_RESET)
V1 = int(Feature.VERSION_1)
OFFERED = V1 | int(Feature.EVENT_IDX)
SIZES = (8, 16)
DESC = (0x80_0000_1000, 0x80_0000_4000)
DEFAULT_USED = (0x80_0000_2000, 0x80_0000_6000)
CARD_USED = (0x10000, 0x20000)  # in card RAM: acceptable
HOST_RAM = range(0x80_0000_0000, 0x80_0010_0000)


class Pair:
    """A host half and a card half over one device entry in one page."""

    def __init__(self) -> None:
        entry = DeviceEntry(
            type=DeviceType.BLOCK,
            num_vq=len(SIZES),
            feature_len=8,
            config_len=4,
            vqconfigs=tuple(
                VqConfig(d, u, n) for d, u, n in zip(DESC, DEFAULT_USED, SIZES, strict=True)
            ),
            config=b"\x01\x02\x03\x04",
            host_features=OFFERED,
            c2h_vdev_db=1,
            h2c_vdev_db=2,
        )
        self.page = bytearray(4096)
        self.page[: entry.size] = entry.build()
        mv = memoryview(self.page)
        dims = (entry.num_vq, entry.feature_len, entry.config_len)
        self.host_view = EntryView(mv, 0, *dims)
        self.card_view = EntryView(mv, 0, *dims)
        self.machine = DeviceStatusMachine(OFFERED)
        self.checked: list[tuple[int, int, int]] = []
        self.host = HostHandshake(
            self.host_view, self.machine, SIZES, DEFAULT_USED, self._check_used
        )
        self.card = CardHandshake(self.card_view)

    def _check_used(self, index: int, addr: int, nbytes: int) -> str | None:
        self.checked.append((index, addr, nbytes))
        if addr in HOST_RAM:
            return "lies in host RAM"
        return None

    def to_host(self, event: Event) -> list[Action]:
        """Feed the host half; perform its stores; return every action."""
        actions = self.host.receive(event)
        for a in actions:
            if isinstance(a, Publish | PublishStatus | PublishType | PublishUsedAddress):
                publish(self.host_view, a)
        return actions

    def to_card(self, event: Event) -> list[Action]:
        actions = self.card.receive(event)
        for a in actions:
            if isinstance(a, Publish | PublishStatus | PublishType | PublishUsedAddress):
                publish(self.card_view, a)
        return actions

    def status(self, value: int) -> tuple[list[Action], list[Action]]:
        """One status handshake: card writes, host applies, card reads the answer."""
        started = self.to_card(WriteStatus(value))
        assert started[-1] == RingPeer()
        host = self.to_host(Doorbell())
        answer = self.to_card(Doorbell())
        return host, answer

    def go_live(self, acks: int = OFFERED) -> list[Action]:
        self.status(ACK)
        self.status(ACK | DRV)
        self.card_view.guest_acks = acks
        self.status(ACK | DRV | FOK)
        host, answer = self.status(ACK | DRV | FOK | DOK)
        assert answer == [StatusAcked(ACK | DRV | FOK | DOK)]
        return host


def kinds(actions: list[Action]) -> list[type]:
    return [type(a) for a in actions]


# ---------------------------------------------------------------------------
# the ctrl fields


def test_ctrl_offsets_match_the_layout() -> None:
    for f in Ctrl:
        assert f.value == field_offset(MicDeviceCtrl, f.name.lower())
    assert {f.name.lower() for f in Ctrl} == {
        c.name for c in MicDeviceCtrl.subcons if c.name is not None
    }


def test_ctrl_doorbells_read_signed() -> None:
    p = Pair()
    p.host_view.set_ctrl(Ctrl.H2C_VDEV_DB, -1)
    assert p.card_view.ctrl(Ctrl.H2C_VDEV_DB) == -1
    p.host_view.set_ctrl(Ctrl.VDEV, 0x1122334455667788)
    assert p.card_view.ctrl(Ctrl.VDEV) == 0x1122334455667788
    assert p.card_view.ctrl(Ctrl.CONFIG_CHANGE) == 0


# ---------------------------------------------------------------------------
# the host tables, pair by pair


def _host_input(p: Pair, inp: HostInput) -> Event:
    match inp:
        case HostInput.CARD_WRITE:
            return Doorbell()
        case HostInput.RESET_REQUEST:
            p.card_view.set_ctrl(Ctrl.VDEV_RESET, 1)
            return Doorbell()
        case HostInput.RESET_DRAINED:
            return ResetDrained()
        case HostInput.FAULT:
            return Fault("bad ring")
        case HostInput.STOP:
            return Stop()
        case HostInput.CARD_GONE:
            return CardGone()


@pytest.mark.parametrize(
    ("state", "inp"),
    [pytest.param(s, i, id=f"{s.name}-{i.name}") for s in HostState for i in HostInput],
)
def test_every_host_state_input_pair(state: HostState, inp: HostInput) -> None:
    p = Pair()
    p.host.state = state
    event = _host_input(p, inp)
    expected = HOST_TRANSITIONS.get((state, inp))
    if expected is None:
        with pytest.raises(LocalProtocolError):
            p.to_host(event)
        assert p.host.state is state
        return
    p.to_host(event)
    assert p.host.state is expected


def test_host_table_covers_every_input_the_card_can_cause() -> None:
    for s in HostState:
        for i in (HostInput.CARD_WRITE, HostInput.RESET_REQUEST, HostInput.STOP):
            assert (s, i) in HOST_TRANSITIONS


def _config_input(p: Pair, inp: ConfigInput) -> Event:
    match inp:
        case ConfigInput.START:
            return StartConfigChange(MicConfigChange.CONFIG_CHANGE, 0)
        case ConfigInput.GUEST_ACK:
            p.card_view.set_ctrl(Ctrl.GUEST_ACK, 1)
            return Tick()
        case ConfigInput.GIVE_UP:
            return TimedOut()


@pytest.mark.parametrize(
    ("state", "inp"),
    [pytest.param(s, i, id=f"{s.name}-{i.name}") for s in ConfigState for i in ConfigInput],
)
def test_every_config_state_input_pair(state: ConfigState, inp: ConfigInput) -> None:
    p = Pair()
    p.host.config_state = state
    p.host.config_kind = MicConfigChange.CONFIG_CHANGE
    event = _config_input(p, inp)
    expected = CONFIG_TRANSITIONS.get((state, inp))
    if inp is ConfigInput.GUEST_ACK and expected is None:
        # only derived while waiting: a stray guest_ack is not an input at all
        assert p.to_host(event) == []
        assert p.host.config_state is state
        return
    if expected is None:
        with pytest.raises(LocalProtocolError):
            p.to_host(event)
        assert p.host.config_state is state
        return
    p.to_host(event)
    assert p.host.config_state is expected


# ---------------------------------------------------------------------------
# the card table, pair by pair

_AWAIT = {CardState.AWAIT_STATUS_ACK, CardState.AWAIT_RESET_ACK, CardState.AWAIT_USED_ACK}


def _card_input(p: Pair, inp: CardInput) -> Event:
    match inp:
        case CardInput.WRITE_STATUS:
            return WriteStatus(ACK)
        case CardInput.REQUEST_RESET:
            return RequestReset()
        case CardInput.MOVE_USED_RINGS:
            return MoveUsedRings()
        case CardInput.HOST_ACK:
            p.host_view.set_ctrl(Ctrl.HOST_ACK, 1)
            p.host_view.set_ctrl(Ctrl.USED_ADDRESS_UPDATED, 0)
            return Doorbell()
        case CardInput.TIMED_OUT:
            return TimedOut()
        case CardInput.CONFIG_CHANGE:
            p.host_view.set_ctrl(Ctrl.CONFIG_CHANGE, MicConfigChange.CONFIG_CHANGE)
            return ConfigDoorbell()
        case CardInput.DEV_REMOVE:
            p.host_view.set_ctrl(Ctrl.CONFIG_CHANGE, MicConfigChange.DEV_REMOVE)
            return ConfigDoorbell()
        case CardInput.HANDLED:
            return Handled()


@pytest.mark.parametrize(
    ("state", "inp"),
    [pytest.param(s, i, id=f"{s.name}-{i.name}") for s in CardState for i in CardInput],
)
def test_every_card_state_input_pair(state: CardState, inp: CardInput) -> None:
    p = Pair()
    p.card.state = state
    event = _card_input(p, inp)
    expected = CARD_TRANSITIONS.get((state, inp))
    if inp is CardInput.HOST_ACK and state not in _AWAIT:
        assert expected is None
        assert p.to_card(event) == []  # an answer nobody waits for is not an input
        assert p.card.state is state
        return
    if expected is None:
        with pytest.raises(LocalProtocolError):
            p.to_card(event)
        assert p.card.state is state
        return
    p.to_card(event)
    assert p.card.state is expected


# ---------------------------------------------------------------------------
# the handshakes, both halves over one page


def test_status_write_is_applied_then_acknowledged() -> None:
    p = Pair()
    host, answer = p.status(ACK)
    assert host == [
        PublishStatus(ACK),
        Publish(Ctrl.HOST_ACK, 1),
        RingPeer(),
    ]
    assert answer == [StatusAcked(ACK)]
    assert p.card.state is CardState.IDLE


def test_card_waits_until_the_host_answers() -> None:
    p = Pair()
    p.to_card(WriteStatus(ACK))
    assert p.card_view.ctrl(Ctrl.HOST_ACK) == 0
    assert p.to_card(Tick()) == []  # the host has not run yet
    assert p.card.state is CardState.AWAIT_STATUS_ACK
    p.to_host(Doorbell())
    assert p.to_card(Tick()) == [StatusAcked(ACK)]  # polling finds it too


def test_driver_ok_starts_the_queues_over_the_default_used_rings() -> None:
    p = Pair()
    host = p.go_live()
    assert StartQueues(DEFAULT_USED, OFFERED) in host
    assert p.machine.live


def test_refused_features_are_visible_before_host_ack() -> None:
    p = Pair()
    p.status(ACK)
    p.status(ACK | DRV)
    p.card_view.guest_acks = OFFERED | int(Feature.INDIRECT_DESC)  # not offered
    host, answer = p.status(ACK | DRV | FOK)
    assert answer == [StatusAcked(ACK | DRV)]  # FEATURES_OK cleared: refused
    assert host.index(PublishStatus(ACK | DRV)) < host.index(Publish(Ctrl.HOST_ACK, 1))


def test_illegal_status_means_needs_reset_never_an_exception() -> None:
    p = Pair()
    p.status(ACK | DRV)
    host, answer = p.status(ACK)  # cleared DRIVER without a reset
    assert any(isinstance(a, NeedsReset) for a in host)
    assert answer[0] == StatusAcked(p.machine.status)
    assert p.card_view.status & NR


def test_status_zero_and_failed_stop_the_queues() -> None:
    p = Pair()
    p.go_live()
    host, _ = p.status(0)
    assert StopQueues("driver reset the device") in host
    p.status(ACK)
    host, _ = p.status(ACK | int(S.FAILED))
    assert any(isinstance(a, StopQueues) for a in host)


def test_fault_publishes_needs_reset() -> None:
    p = Pair()
    p.go_live()
    out = p.to_host(Fault("queue 0: avail idx jumped"))
    assert out == [PublishStatus(p.machine.status), NeedsReset("queue 0: avail idx jumped")]
    assert p.card_view.status & NR


def _move(p: Pair, addrs: tuple[int, ...]) -> list[Action]:
    for i, a in enumerate(addrs):
        p.card_view.set_vq_used_address(i, a)
    assert p.to_card(MoveUsedRings()) == [Publish(Ctrl.USED_ADDRESS_UPDATED, 1), RingPeer()]
    host = p.to_host(Doorbell())
    assert p.to_card(Doorbell()) == [UsedRingsTaken()]  # cleared whatever the host thought
    return host


def test_used_ring_move_accepted_then_used_at_driver_ok() -> None:
    p = Pair()
    p.status(ACK)
    p.status(ACK | DRV)
    p.card_view.guest_acks = OFFERED
    p.status(ACK | DRV | FOK)
    host = _move(p, CARD_USED)
    assert host == [Publish(Ctrl.USED_ADDRESS_UPDATED, 0), RingPeer()]
    assert p.host.used == list(CARD_USED)
    assert p.checked == [(0, CARD_USED[0], 6 + 8 * SIZES[0]), (1, CARD_USED[1], 6 + 8 * SIZES[1])]
    host, _ = p.status(ACK | DRV | FOK | DOK)
    assert StartQueues(CARD_USED, OFFERED) in host


@pytest.mark.parametrize(
    ("addrs", "why"),
    [
        ((CARD_USED[0], HOST_RAM.start + 0x3000), "host RAM"),
        ((CARD_USED[0] + 2, CARD_USED[1]), "aligned"),
    ],
)
def test_used_ring_move_refused(addrs: tuple[int, ...], why: str) -> None:
    p = Pair()
    p.status(ACK)
    host = _move(p, addrs)
    needs = [a for a in host if isinstance(a, NeedsReset)]
    assert len(needs) == 1
    assert why in needs[0].reason
    assert p.host.used == list(DEFAULT_USED)


def test_used_ring_move_after_driver_ok_refused() -> None:
    p = Pair()
    p.go_live()
    host = _move(p, CARD_USED)
    assert any(isinstance(a, NeedsReset) and "after DRIVER_OK" in a.reason for a in host)


def test_vdev_reset() -> None:
    p = Pair()
    p.status(ACK)
    p.status(ACK | DRV)
    p.card_view.guest_acks = OFFERED
    p.status(ACK | DRV | FOK)
    _move(p, CARD_USED)
    p.status(ACK | DRV | FOK | DOK)
    assert p.to_card(RequestReset()) == [
        Publish(Ctrl.HOST_ACK, 0),
        Publish(Ctrl.VDEV_RESET, 1),
        RingPeer(),
    ]
    assert p.to_host(Doorbell()) == [BeginReset()]
    assert p.host.state is HostState.RESETTING
    # doorbells while draining neither apply anything nor acknowledge
    assert p.to_host(Doorbell()) == []
    assert p.to_card(Doorbell()) == []
    done = p.to_host(ResetDrained())
    assert done[-2:] == [Publish(Ctrl.HOST_ACK, 1), RingPeer()]
    assert p.to_card(Doorbell()) == [PublishStatus(0), ResetAcked()]
    assert p.card_view.status == 0
    assert p.card_view.ctrl(Ctrl.VDEV_RESET) == 0
    assert [p.card_view.vq_used_address(i) for i in range(2)] == list(DEFAULT_USED)
    assert p.host.used == list(DEFAULT_USED)
    assert p.machine.status == 0
    p.go_live()  # probes again from scratch


def test_card_gone_forgets_the_card() -> None:
    p = Pair()
    p.status(ACK)
    p.status(ACK | DRV)
    p.card_view.guest_acks = OFFERED
    p.status(ACK | DRV | FOK)
    _move(p, CARD_USED)
    assert p.to_host(CardGone()) == []
    assert p.machine.status == 0
    assert p.host.used == list(DEFAULT_USED)


@pytest.mark.parametrize("db", [3, -1, 16])
def test_config_change(db: int) -> None:
    p = Pair()
    p.go_live()
    out = p.to_host(StartConfigChange(MicConfigChange.CONFIG_CHANGE, db))
    assert out[:2] == [Publish(Ctrl.GUEST_ACK, 0), Publish(Ctrl.CONFIG_CHANGE, 2)]
    assert out[2:] == ([RingConfig(db)] if 0 <= db < 16 else [])
    assert p.to_host(Tick()) == []  # not acknowledged yet
    assert p.to_card(ConfigDoorbell()) == [ConfigChanged()]
    assert p.to_card(Handled()) == [Publish(Ctrl.GUEST_ACK, 1), RingPeer()]
    assert p.to_card(ConfigDoorbell()) == []  # already acknowledged: a rescan does nothing
    out = p.to_host(Doorbell())
    assert out[-1] == ConfigAcked(MicConfigChange.CONFIG_CHANGE)
    assert p.card_view.ctrl(Ctrl.CONFIG_CHANGE) == 0
    assert p.card_view.ctrl(Ctrl.GUEST_ACK) == 0
    assert not p.host.config_pending


def test_hot_remove() -> None:
    p = Pair()
    p.go_live()
    p.to_host(Stop())
    p.to_host(StartConfigChange(MicConfigChange.DEV_REMOVE, 0))
    assert p.to_card(ConfigDoorbell()) == [RemoveDevice()]
    assert p.card.state is CardState.REMOVING
    assert p.to_card(Handled()) == [
        Publish(Ctrl.H2C_VDEV_DB, -1),
        Publish(Ctrl.GUEST_ACK, 1),
        PublishType(DeviceType.REMOVED),
        RingPeer(),
    ]
    assert p.card.state is CardState.REMOVED
    assert p.host_view.device_type == -1
    # a removing device answers nothing but the removal's guest_ack
    assert p.to_host(Doorbell()) == [*_cleared(), ConfigAcked(MicConfigChange.DEV_REMOVE)]


def _cleared() -> list[Action]:
    return [Publish(Ctrl.CONFIG_CHANGE, 0), Publish(Ctrl.GUEST_ACK, 0)]


def test_host_gives_up_and_clears_the_fields() -> None:
    p = Pair()
    p.to_host(StartConfigChange(MicConfigChange.CONFIG_CHANGE, 0))
    assert p.to_host(TimedOut()) == _cleared()
    assert p.card_view.ctrl(Ctrl.CONFIG_CHANGE) == 0
    assert p.to_card(ConfigDoorbell()) == []


def test_card_gives_up_and_can_start_again() -> None:
    p = Pair()
    p.to_card(WriteStatus(ACK))
    assert p.to_card(TimedOut()) == []
    assert p.card.state is CardState.IDLE
    p.to_card(WriteStatus(ACK))


@pytest.mark.parametrize(
    "make",
    [
        lambda p: p.host.receive(WriteStatus(1)),
        lambda p: p.host.receive(StartConfigChange(MicConfigChange.NONE, 0)),
        lambda p: p.card.receive(ResetDrained()),
        lambda p: p.card.receive(StartConfigChange(MicConfigChange.DEV_REMOVE, 0)),
    ],
)
def test_events_a_half_does_not_take(make: Callable[[Pair], object]) -> None:
    with pytest.raises(LocalProtocolError):
        make(Pair())


# ---------------------------------------------------------------------------
# bad input from the peer


@pytest.mark.parametrize("value", [2, 0x80, 0xFF])
def test_card_refuses_a_bad_host_ack(value: int) -> None:
    p = Pair()
    p.to_card(WriteStatus(ACK))
    p.host_view.set_ctrl(Ctrl.HOST_ACK, value)
    with pytest.raises(RemoteProtocolError):
        p.to_card(Doorbell())


@pytest.mark.parametrize("value", [3, 0x7F, 0xFF])
def test_card_refuses_an_unknown_config_change(value: int) -> None:
    p = Pair()
    p.host_view.set_ctrl(Ctrl.CONFIG_CHANGE, value)
    with pytest.raises(RemoteProtocolError):
        p.to_card(ConfigDoorbell())
    assert p.card.state is CardState.IDLE


_ENTRY_BYTES = st.binary(min_size=16, max_size=16)


@settings(max_examples=300, deadline=None)
@given(
    ctrl=_ENTRY_BYTES,
    status=st.integers(0, 255),
    acks=st.integers(0, (1 << 64) - 1),
    used=st.lists(st.integers(0, (1 << 64) - 1), min_size=2, max_size=2),
    state=st.sampled_from(list(CardState)),
    event=st.sampled_from([Doorbell(), Tick(), ConfigDoorbell()]),
)
def test_card_half_on_arbitrary_host_bytes(
    ctrl: bytes, status: int, acks: int, used: list[int], state: CardState, event: Event
) -> None:
    """Whatever the host wrote: the card half answers or raises RemoteProtocolError."""
    p = Pair()
    p.card.state = state
    _scribble(p, ctrl, status, acks, used)
    try:
        p.to_card(event)
    except RemoteProtocolError:
        pass
    except LocalProtocolError:
        # only a config request outside IDLE (the bus serialises those)
        assert isinstance(event, ConfigDoorbell)
        assert state is not CardState.IDLE


@settings(max_examples=300, deadline=None)
@given(
    ctrl=_ENTRY_BYTES,
    status=st.integers(0, 255),
    acks=st.integers(0, (1 << 64) - 1),
    used=st.lists(st.integers(0, (1 << 64) - 1), min_size=2, max_size=2),
    live=st.booleans(),
    state=st.sampled_from(list(HostState)),
    waiting=st.booleans(),
)
def test_host_half_never_raises_for_card_bytes(
    ctrl: bytes,
    status: int,
    acks: int,
    used: list[int],
    live: bool,
    state: HostState,
    waiting: bool,
) -> None:
    """Whatever the card wrote: the host half returns actions; a fault is NeedsReset."""
    p = Pair()
    if live:
        p.go_live()
    p.host.state = state
    if waiting:
        p.to_host(StartConfigChange(MicConfigChange.CONFIG_CHANGE, 0))
    _scribble(p, ctrl, status, acks, used)
    for event in (Doorbell(), Tick(), Doorbell()):
        for a in p.to_host(event):
            if isinstance(a, NeedsReset):
                assert p.machine.status & NR


def _scribble(p: Pair, ctrl: bytes, status: int, acks: int, used: list[int]) -> None:
    raw = p.card_view.raw
    off = len(raw) - 16
    raw[off:] = ctrl
    p.card_view.status = status
    p.card_view.guest_acks = acks
    for i, a in enumerate(used):
        p.card_view.set_vq_used_address(i, a)
