"""mic_host.lifecycle: every (state, event) pair, shutdown status, listeners, history."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from mic_host.lifecycle import (
    STATUS_EFFECTS,
    TRANSITIONS,
    CardEvent,
    CardLifecycle,
    CardState,
    ShutdownStatus,
    Transition,
    session_end_events,
)
from virtio.errors import LocalProtocolError

S, E = CardState, CardEvent

ALL_PAIRS = list(itertools.product(CardState, CardEvent))

#: The specification, written out independently of the table's construction.
EXPECTED = {
    (S.READY, E.BOOT): S.BOOTING,
    (S.BOOTING, E.ONLINE): S.ONLINE,
    (S.BOOTING, E.BOOT_TIMEOUT): S.RESET_FAILED,
    (S.BOOTING, E.CRASH): S.CRASHED,
    (S.BOOTING, E.HEARTBEAT_LOST): S.CRASHED,
    (S.BOOTING, E.RESET): S.RESETTING,
    (S.BOOTING, E.SUSPEND): S.RESETTING,
    (S.ONLINE, E.SHUTDOWN): S.SHUTTING_DOWN,
    (S.ONLINE, E.CRASH): S.CRASHED,
    (S.ONLINE, E.HEARTBEAT_LOST): S.CRASHED,
    (S.ONLINE, E.RESET): S.RESETTING,
    (S.ONLINE, E.SUSPEND): S.RESETTING,
    (S.SHUTTING_DOWN, E.SHUTDOWN_DONE): S.READY,
    (S.SHUTTING_DOWN, E.CRASH): S.CRASHED,
    (S.SHUTTING_DOWN, E.HEARTBEAT_LOST): S.CRASHED,
    (S.SHUTTING_DOWN, E.RESET): S.RESETTING,
    (S.SHUTTING_DOWN, E.SUSPEND): S.RESETTING,
    (S.CRASHED, E.RESET): S.RESETTING,
    (S.CRASHED, E.SUSPEND): S.RESETTING,
    (S.RESET_FAILED, E.RESET): S.RESETTING,
    (S.RESET_FAILED, E.SUSPEND): S.RESETTING,
    (S.RESET_FAILED, E.RESUME): S.RESET_FAILED,
    (S.RESETTING, E.RESET): S.RESETTING,
    (S.RESETTING, E.RESET_DONE): S.READY,
    (S.RESETTING, E.RESET_FAILED): S.RESET_FAILED,
    (S.READY, E.SUSPEND): S.READY,
    (S.READY, E.RESUME): S.READY,
}


def test_table_is_the_specification() -> None:
    assert TRANSITIONS == EXPECTED


@pytest.mark.parametrize(("state", "event"), ALL_PAIRS, ids=[f"{s}-{e}" for s, e in ALL_PAIRS])
def test_every_pair(state: CardState, event: CardEvent) -> None:
    lc = CardLifecycle("mic0", state=state, shutdown_status=ShutdownStatus.HALTED)
    if (state, event) in EXPECTED:
        assert lc.can_fire(event)
        assert lc.fire(event) is EXPECTED[(state, event)]
        assert lc.state is EXPECTED[(state, event)]
        assert list(lc.history) == [Transition("mic0", state, event, lc.state, lc.shutdown_status)]
    else:
        assert not lc.can_fire(event)
        with pytest.raises(LocalProtocolError, match=rf"^cannot .* mic0: state is {state.value}, "):
            lc.fire(event)
        assert lc.state is state
        assert lc.shutdown_status is ShutdownStatus.HALTED
        assert not lc.history


def test_refusal_message() -> None:
    lc = CardLifecycle("mic0", state=S.ONLINE)
    with pytest.raises(LocalProtocolError) as ei:
        lc.fire(E.BOOT)
    assert str(ei.value) == "cannot boot mic0: state is online, boot needs ready"
    with pytest.raises(LocalProtocolError) as ei:
        CardLifecycle("mic3").fire(E.RESET)
    assert str(ei.value) == (
        "cannot reset mic3: state is ready, reset needs one of "
        "booting, online, shutting_down, resetting, reset_failed, crashed"
    )


def test_mpssd_cycle_with_shutdown_status() -> None:
    lc = CardLifecycle("mic0")
    assert (lc.state, lc.shutdown_status) == (S.READY, ShutdownStatus.NOP)
    lc.fire(E.BOOT)
    lc.fire(E.ONLINE)
    lc.fire(E.SHUTDOWN, status=ShutdownStatus.RESTART)
    assert lc.shutdown_status is ShutdownStatus.RESTART
    lc.fire(E.SHUTDOWN_DONE, status=ShutdownStatus.RESTART)
    assert (lc.state, lc.shutdown_status) == (S.READY, ShutdownStatus.RESTART)
    lc.fire(E.BOOT)  # mpssd boots again after "restart"; cosm_start clears the status
    assert lc.shutdown_status is ShutdownStatus.NOP
    lc.fire(E.ONLINE)
    lc.fire(E.SHUTDOWN)
    lc.fire(E.SHUTDOWN_DONE)  # default: halted
    assert lc.shutdown_status is ShutdownStatus.HALTED


@pytest.mark.parametrize("event", [E.CRASH, E.HEARTBEAT_LOST])
def test_crash_then_reset(event: CardEvent) -> None:
    lc = CardLifecycle("mic0", state=S.ONLINE)
    lc.fire(event, at=12.5)
    assert (lc.state, lc.shutdown_status) == (S.CRASHED, ShutdownStatus.CRASHED)
    assert lc.history[-1].at == 12.5
    lc.fire(E.RESET)
    lc.fire(E.RESET)  # idempotent while resetting, as cosm_reset
    lc.fire(E.RESET_DONE)
    assert lc.state is S.READY
    assert lc.shutdown_status is ShutdownStatus.CRASHED  # kept until the next boot


def test_status_effects_are_the_documented_ones() -> None:
    assert STATUS_EFFECTS == {
        E.BOOT: ShutdownStatus.NOP,
        E.CRASH: ShutdownStatus.CRASHED,
        E.HEARTBEAT_LOST: ShutdownStatus.CRASHED,
        E.SHUTDOWN_DONE: ShutdownStatus.HALTED,
    }


@pytest.mark.parametrize(
    ("state", "flag"),
    [(S.BOOTING, True), (S.ONLINE, True), (S.CRASHED, False), (S.SHUTTING_DOWN, False)],
)
def test_suspend_marks_boot_on_resume(state: CardState, flag: bool) -> None:
    lc = CardLifecycle("mic0", state=state)
    lc.fire(E.SUSPEND)
    assert lc.state is S.RESETTING
    lc.fire(E.RESET_DONE)
    lc.fire(E.RESUME)
    assert lc.state is S.READY
    assert lc.boot_on_resume is flag
    if flag:
        lc.fire(E.BOOT)
        assert lc.boot_on_resume is False


def test_suspend_in_ready_keeps_flag_clear() -> None:
    lc = CardLifecycle("mic0")
    lc.fire(E.SUSPEND)
    assert (lc.state, lc.boot_on_resume) == (S.READY, False)


def test_listeners_and_removal() -> None:
    lc = CardLifecycle("mic0")
    seen: list[Transition] = []
    remove = lc.add_listener(seen.append)
    lc.fire(E.BOOT)
    lc.fire(E.BOOT_TIMEOUT)
    assert [(t.old, t.event, t.new) for t in seen] == [
        (S.READY, E.BOOT, S.BOOTING),
        (S.BOOTING, E.BOOT_TIMEOUT, S.RESET_FAILED),
    ]
    remove()
    remove()  # twice is harmless
    lc.fire(E.RESET)
    assert len(seen) == 2


def test_a_failing_listener_does_not_stop_the_others() -> None:
    lc = CardLifecycle("mic0")
    seen: list[CardState] = []

    def bad(t: Transition) -> None:
        raise RuntimeError("listener bug")

    lc.add_listener(bad)
    lc.add_listener(lambda t: seen.append(t.new))
    with pytest.raises(RuntimeError, match="listener bug"):
        lc.fire(E.BOOT)
    assert lc.state is S.BOOTING  # the move happened
    assert seen == [S.BOOTING]


def test_a_listener_may_remove_itself() -> None:
    lc = CardLifecycle("mic0")
    calls: list[CardState] = []
    remove = None

    def once(t: Transition) -> None:
        calls.append(t.new)
        assert remove is not None
        remove()

    remove = lc.add_listener(once)
    lc.fire(E.BOOT)
    lc.fire(E.ONLINE)
    assert calls == [S.BOOTING]


def test_history_is_bounded() -> None:
    lc = CardLifecycle("mic0", history_len=3)
    for _ in range(5):
        lc.fire(E.BOOT)
        lc.fire(E.RESET)
        lc.fire(E.RESET_DONE)
    assert len(lc.history) == 3
    assert [t.event for t in lc.history] == [E.BOOT, E.RESET, E.RESET_DONE]


def test_string_values_are_the_cosm_names() -> None:
    assert [s.value for s in CardState] == [
        "ready",
        "booting",
        "online",
        "shutting_down",
        "resetting",
        "reset_failed",
        "crashed",
    ]
    assert [s.value for s in ShutdownStatus] == ["nop", "crashed", "halted", "poweroff", "restart"]
    lc = CardLifecycle("mic0")
    assert lc.fire("boot") == "booting"  # type: ignore[arg-type]
    assert "mic0 booting" in repr(lc)


def test_lifecycle_is_sans_io() -> None:
    """No asyncio, no OS, no transport in the lifecycle module (checked on its source,
    since ``mic_host/__init__`` may import the client library)."""
    import ast

    import mic_host.lifecycle as mod

    tree = ast.parse(Path(mod.__file__).read_text(encoding="utf-8"))
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        (node.module or "").split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
    }
    assert not imported & {"asyncio", "os", "socket", "transport", "time", "subprocess"}


# -- the end of a boot session (issue 14, item 3) --------------------------------------

#: States a card can be in while a session runs (it ends in none of the others).
SESSION_STATES = (S.BOOTING, S.ONLINE, S.SHUTTING_DOWN, S.RESETTING, S.RESET_FAILED)
REASONS = (E.SHUTDOWN_DONE, E.CRASH, E.HEARTBEAT_LOST, E.BOOT_TIMEOUT, E.RESET)


@pytest.mark.parametrize(("state", "reason"), list(itertools.product(SESSION_STATES, REASONS)))
@pytest.mark.parametrize("status", [None, *ShutdownStatus])
def test_a_session_end_always_lands_the_card_down(
    state: CardState, reason: CardEvent, status: ShutdownStatus | None
) -> None:
    """Whatever raced, the events are legal one after the other, and the card
    ends ready, crashed or reset_failed (booting only for a restart); never
    resetting, never online or shutting_down with no card process."""
    card = CardLifecycle("mic0", state=state)
    for event, recorded in session_end_events(state, reason, status):
        card.fire(event, status=recorded)
    restart = reason is E.SHUTDOWN_DONE and status is ShutdownStatus.RESTART
    if state in (S.RESETTING, S.RESET_FAILED):
        assert card.state is S.READY  # the reset asked meanwhile completes
    elif restart and state in (S.ONLINE, S.SHUTTING_DOWN):
        assert card.state is S.BOOTING
    else:
        assert card.state in (S.READY, S.CRASHED, S.RESET_FAILED)


def test_session_end_mapping() -> None:
    halted = ShutdownStatus.HALTED
    # a shutdown_done that raced a reset (the watchdog's, or the user's)
    assert session_end_events(S.RESETTING, E.SHUTDOWN_DONE, halted) == [(E.RESET_DONE, None)]
    # a reset that timed out, and whose session ended after all
    assert session_end_events(S.RESET_FAILED, E.RESET, None) == [
        (E.RESET, None),
        (E.RESET_DONE, None),
    ]
    assert session_end_events(S.SHUTTING_DOWN, E.SHUTDOWN_DONE, halted) == [
        (E.SHUTDOWN_DONE, halted)
    ]
    poweroff = ShutdownStatus.POWEROFF
    assert session_end_events(S.ONLINE, E.SHUTDOWN_DONE, poweroff) == [
        (E.SHUTDOWN, poweroff),
        (E.SHUTDOWN_DONE, poweroff),
    ]
    assert session_end_events(S.BOOTING, E.BOOT_TIMEOUT, None) == [(E.BOOT_TIMEOUT, None)]
    # a boot timeout that raced "online": the process is gone, the card crashed
    assert session_end_events(S.ONLINE, E.BOOT_TIMEOUT, None) == [(E.CRASH, None)]
