"""A queue's life as a table (uacce states) and its counters.

Shared by the app queues (:mod:`mic_card.accel.queue`), the host channels
(:mod:`mic_card.accel.offload`) and the framework. Imports nothing from
``mic_card``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = ["TRANSITIONS", "QState", "QueueStats"]


class QState(StrEnum):
    """uacce queue states (``include/linux/uacce.h``)."""

    INIT = "init"
    STARTED = "started"
    ZOMBIE = "zombie"


#: ``(state, event) -> next state``; a pair missing here is refused (STYLE.md §2).
TRANSITIONS: dict[tuple[QState, str], QState] = {
    (QState.INIT, "start"): QState.STARTED,
    (QState.INIT, "put"): QState.ZOMBIE,
    (QState.STARTED, "put"): QState.ZOMBIE,
    (QState.STARTED, "reset"): QState.STARTED,
    (QState.STARTED, "fault"): QState.STARTED,  # disabled until reset
    (QState.ZOMBIE, "put"): QState.ZOMBIE,
}


@dataclass(slots=True)
class QueueStats:
    submitted: int = 0
    completed: int = 0
    doorbells: int = 0
    sleeps: int = 0
    faults: int = 0
