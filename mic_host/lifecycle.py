"""The card lifecycle (Linux COSM, ``drivers/misc/mic/cosm``), as a table.

Everything that moves a card's state lives in this file (the h11 rule): the
``(state, event) -> next state`` table, the shutdown status each event
records, and the history. Sans-IO: no asyncio, no clock (the caller passes
``at=`` if it wants times), no ``transport``. The daemon performs the work
(spawning the card process, waiting for its hello, stopping it) and fires the
event that reports what happened.

The states and their meaning follow COSM's sysfs ``state`` and
``shutdown_status`` files and mpssd's use of them
(``samples/mic/mpssd/mpssd.c``):

- ``ready --boot--> booting --online--> online`` (online = the card OS said
  hello on the control link, as COSM's SCIF client connecting);
- ``online --shutdown--> shutting_down --shutdown_done--> ready``; the card
  reports why it went down (``halted``, ``poweroff`` or ``restart``; mpssd
  boots the card again after ``restart``);
- ``crash`` (card process died) and ``heartbeat_lost`` from ``booting``,
  ``online`` or ``shutting_down`` lead to ``crashed`` with status ``crashed``;
- ``reset`` from any state but ``ready`` (as ``cosm_reset``) leads to
  ``resetting``, then ``ready`` (``reset_done``) or ``reset_failed``;
  resetting an already resetting card is a no-op, as in COSM;
- ``boot_timeout`` from ``booting`` leads to ``reset_failed``;
- ``suspend`` (host PM) stops every card that is not ``ready``, as
  ``cosm_suspend -> cosm_stop`` does: to ``resetting``, then ``reset_done``.
  A card that was ``booting`` or ``online`` is marked ``boot_on_resume``
  (v3.13 mpssd's flag); ``resume`` is accepted in ``ready`` and
  ``reset_failed`` and the daemon boots the marked cards after it.

When a boot session ends (the card process is gone), :func:`session_end_events`
says which events take the card to where it belongs, whatever raced: a reset
asked meanwhile always completes (a card is never left ``resetting``), and a
reason that no longer fits the state marks the card ``crashed`` rather than
leaving it looking up with no process.

Unlike virtio device status (STYLE §2, where an illegal transition moves the
device to its failure state), an illegal card event is a *request* refused:
``micctl boot`` on an online card must not crash it. :meth:`CardLifecycle.fire`
raises :class:`~virtio.errors.LocalProtocolError` and the state does not move.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from virtio.errors import LocalProtocolError

__all__ = [
    "TRANSITIONS",
    "STATUS_EFFECTS",
    "CardEvent",
    "CardLifecycle",
    "CardState",
    "ShutdownStatus",
    "Transition",
    "session_end_events",
]

log = logging.getLogger(__name__)


class CardState(StrEnum):
    """COSM's sysfs ``state`` values (``cosm_state_string``)."""

    READY = "ready"
    BOOTING = "booting"
    ONLINE = "online"
    SHUTTING_DOWN = "shutting_down"
    RESETTING = "resetting"
    RESET_FAILED = "reset_failed"
    CRASHED = "crashed"


class ShutdownStatus(StrEnum):
    """COSM's sysfs ``shutdown_status`` values: why the card last went down."""

    NOP = "nop"
    CRASHED = "crashed"
    HALTED = "halted"
    POWEROFF = "poweroff"
    RESTART = "restart"


class CardEvent(StrEnum):
    """What happened to a card (a request, or a report from the card or a watchdog)."""

    BOOT = "boot"  # user/daemon asks to boot (sysfs state <- "boot")
    ONLINE = "online"  # the card OS said hello
    SHUTDOWN = "shutdown"  # user asks, or the card OS starts shutting down
    SHUTDOWN_DONE = "shutdown_done"  # the card OS finished; status says why
    RESET = "reset"  # user/daemon asks to reset (sysfs state <- "reset")
    RESET_DONE = "reset_done"  # reset completed, card stopped
    RESET_FAILED = "reset_failed"  # reset could not stop the card
    CRASH = "crash"  # the card process died unexpectedly
    HEARTBEAT_LOST = "heartbeat_lost"  # watchdog: no heartbeat for heartbeat_timeout
    BOOT_TIMEOUT = "boot_timeout"  # watchdog: no hello within boot_timeout
    SUSPEND = "suspend"  # host PM suspend: stop the card (cosm_stop)
    RESUME = "resume"  # host PM resume


_S = CardState
_E = CardEvent

#: The whole lifecycle. A pair missing here is refused (LocalProtocolError)
#: and the state does not move.
TRANSITIONS: dict[tuple[CardState, CardEvent], CardState] = {
    (_S.READY, _E.BOOT): _S.BOOTING,
    (_S.BOOTING, _E.ONLINE): _S.ONLINE,
    (_S.BOOTING, _E.BOOT_TIMEOUT): _S.RESET_FAILED,
    (_S.ONLINE, _E.SHUTDOWN): _S.SHUTTING_DOWN,
    (_S.SHUTTING_DOWN, _E.SHUTDOWN_DONE): _S.READY,
    (_S.RESETTING, _E.RESET): _S.RESETTING,  # cosm_reset: already resetting is a no-op
    (_S.RESETTING, _E.RESET_DONE): _S.READY,
    (_S.RESETTING, _E.RESET_FAILED): _S.RESET_FAILED,
    (_S.READY, _E.SUSPEND): _S.READY,
    (_S.READY, _E.RESUME): _S.READY,
    (_S.RESET_FAILED, _E.RESUME): _S.RESET_FAILED,
}
for _st in (_S.BOOTING, _S.ONLINE, _S.SHUTTING_DOWN):
    TRANSITIONS[(_st, _E.CRASH)] = _S.CRASHED
    TRANSITIONS[(_st, _E.HEARTBEAT_LOST)] = _S.CRASHED
# cosm_reset accepts any state but ready; cosm_stop (suspend) likewise.
for _st in (_S.BOOTING, _S.ONLINE, _S.SHUTTING_DOWN, _S.CRASHED, _S.RESET_FAILED):
    TRANSITIONS[(_st, _E.RESET)] = _S.RESETTING
    TRANSITIONS[(_st, _E.SUSPEND)] = _S.RESETTING
del _st

#: The shutdown status an event records when the caller does not give one.
STATUS_EFFECTS: dict[CardEvent, ShutdownStatus] = {
    _E.BOOT: ShutdownStatus.NOP,  # cosm_start clears it
    _E.CRASH: ShutdownStatus.CRASHED,
    _E.HEARTBEAT_LOST: ShutdownStatus.CRASHED,  # cosm_set_crashed
    _E.SHUTDOWN_DONE: ShutdownStatus.HALTED,
}

#: How a refusal names what was asked ("cannot <verb> mic0: ...").
_VERB: dict[CardEvent, str] = {
    _E.BOOT: "boot",
    _E.ONLINE: "mark online",
    _E.SHUTDOWN: "shut down",
    _E.SHUTDOWN_DONE: "finish shutting down",
    _E.RESET: "reset",
    _E.RESET_DONE: "finish resetting",
    _E.RESET_FAILED: "fail the reset of",
    _E.CRASH: "mark crashed",
    _E.HEARTBEAT_LOST: "report a lost heartbeat of",
    _E.BOOT_TIMEOUT: "time out the boot of",
    _E.SUSPEND: "suspend",
    _E.RESUME: "resume",
}

#: Which states an event is accepted in, for error messages.
_NEEDS: dict[CardEvent, tuple[CardState, ...]] = {
    ev: tuple(st for st in CardState if (st, ev) in TRANSITIONS) for ev in CardEvent
}


@dataclass(frozen=True, slots=True)
class Transition:
    """One move of the lifecycle, as recorded in the history and given to listeners."""

    card: str
    old: CardState
    event: CardEvent
    new: CardState
    shutdown_status: ShutdownStatus
    at: float | None = None


Listener = Callable[[Transition], None]


class CardLifecycle:
    """The state of one card, moved only by :meth:`fire` through :data:`TRANSITIONS`.

    ``history`` keeps the last ``history_len`` transitions. Listeners are
    plain callables run synchronously after each move (the daemon wakes its
    waiters from them); a listener that raises does not stop the others, and
    the first error is re-raised after all ran (the move has happened).
    """

    __slots__ = ("_listeners", "boot_on_resume", "history", "name", "shutdown_status", "state")

    def __init__(
        self,
        name: str,
        *,
        state: CardState = CardState.READY,
        shutdown_status: ShutdownStatus = ShutdownStatus.NOP,
        history_len: int = 256,
    ) -> None:
        self.name = name
        self.state = state
        self.shutdown_status = shutdown_status
        #: set by ``suspend`` from booting/online, cleared by ``boot``
        self.boot_on_resume = False
        self.history: deque[Transition] = deque(maxlen=history_len)
        self._listeners: list[Listener] = []

    def __repr__(self) -> str:
        return f"<CardLifecycle {self.name} {self.state} ({self.shutdown_status})>"

    def can_fire(self, event: CardEvent) -> bool:
        """Whether ``event`` is accepted in the current state."""
        return (self.state, event) in TRANSITIONS

    def fire(
        self,
        event: CardEvent,
        *,
        status: ShutdownStatus | None = None,
        at: float | None = None,
    ) -> CardState:
        """Apply ``event``; return the new state.

        ``status`` overrides the shutdown status the event records (the card
        reports ``halted``/``poweroff``/``restart`` with ``shutdown`` or
        ``shutdown_done``); ``at`` is an optional time stamp for the history.

        Raises:
            LocalProtocolError: the pair is not in the table ("cannot boot mic0:
                state is online, boot needs ready"); nothing changed.
        """
        event = CardEvent(event)
        old = self.state
        new = TRANSITIONS.get((old, event))
        if new is None:
            needs = _NEEDS[event]
            need = needs[0].value if len(needs) == 1 else "one of " + ", ".join(needs)
            raise LocalProtocolError(
                f"cannot {_VERB[event]} {self.name}: "
                f"state is {old.value}, {event.value} needs {need}"
            )
        if event is CardEvent.SUSPEND and old in (CardState.BOOTING, CardState.ONLINE):
            self.boot_on_resume = True
        elif event is CardEvent.BOOT:
            self.boot_on_resume = False
        recorded = status if status is not None else STATUS_EFFECTS.get(event)
        if recorded is not None:
            self.shutdown_status = ShutdownStatus(recorded)
        self.state = new
        tr = Transition(self.name, old, event, new, self.shutdown_status, at)
        self.history.append(tr)
        log.debug("%s: %s --%s--> %s (%s)", self.name, old, event, new, self.shutdown_status)
        first: BaseException | None = None
        for cb in list(self._listeners):
            try:
                cb(tr)
            except Exception as e:
                log.exception("%s: lifecycle listener %r failed", self.name, cb)
                if first is None:
                    first = e
        if first is not None:
            raise first
        return new

    def add_listener(self, callback: Listener) -> Callable[[], None]:
        """Call ``callback(transition)`` after every move; returns a function that removes it."""
        self._listeners.append(callback)

        def remove() -> None:
            if callback in self._listeners:
                self._listeners.remove(callback)

        return remove


Step = tuple[CardEvent, ShutdownStatus | None]


def session_end_events(
    state: CardState, reason: CardEvent, status: ShutdownStatus | None
) -> list[Step]:
    """The events (with the status each records) to fire, in order, when a card's
    boot session has ended for ``reason`` while the card is in ``state``.

    - a reset was asked (``resetting``) or timed out (``reset_failed``): the
      card is stopped now, so the reset completes, whatever the session's own
      reason (mapping that reason instead once left the card ``resetting``
      for good, refusing boot and shutdown);
    - ``shutdown_done`` from ``online`` (the card OS shut itself down) or
      ``shutting_down``: the shutdown completes with the card's status, and a
      ``restart`` boots it again (the caller starts the new session);
    - ``reset`` (the daemon ended the session): reset, then done;
    - any other reason the table accepts: that event;
    - a reason that no longer fits (e.g. a boot timeout that raced ``online``):
      ``crash``; the card process is gone and the card must not look up.
    """
    if state in (CardState.RESETTING, CardState.RESET_FAILED):
        again: list[Step] = [(CardEvent.RESET, None)] if state is CardState.RESET_FAILED else []
        return [*again, (CardEvent.RESET_DONE, None)]
    if reason is CardEvent.SHUTDOWN_DONE and state in (CardState.ONLINE, CardState.SHUTTING_DOWN):
        steps: list[Step] = [(CardEvent.SHUTDOWN, status)] if state is CardState.ONLINE else []
        steps.append((CardEvent.SHUTDOWN_DONE, status))
        if status is ShutdownStatus.RESTART:
            steps.append((CardEvent.BOOT, None))
        return steps
    if reason is CardEvent.RESET:
        return [(CardEvent.RESET, None), (CardEvent.RESET_DONE, None)]
    if (state, reason) in TRANSITIONS:
        return [(reason, None)]
    return [(CardEvent.CRASH, None)]
