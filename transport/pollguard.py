"""Polls at the idle priority, with a guard against starving (issue 19).

Owns :func:`for_this_thread`, :class:`IdlePoll` and :data:`ENV`. Must not import
anything above ``transport``; :mod:`transport.spinloop` is its one user.

Why: a loop that polls holds its CPU. When the kernel queues a task there (the
pty's kworker woken by our own write, the client it wakes, the card our
interrupt woke), that task waits for the rest of the poll: on this 2-vCPU VM the
kernel packs wake-ups onto the waker's vCPU rather than wake a halted one, and
an idle CPU does not pull a task that ran within 0.5 ms. Traced with ``perf
sched``, that was the console echo's tail (``docs/latency.md`` item 21: a
kworker 420 µs behind the daemon's poll, the other vCPU idle), and no count of
runnable tasks can see it (two runnable tasks, two CPUs).

A ``SCHED_IDLE`` thread is the kernel's own answer: any task woken on its CPU
preempts it at once, and the kernel places wake-ups on a CPU running only
``SCHED_IDLE`` tasks as on an idle one, without waking a halted vCPU. So a poll
runs at ``SCHED_IDLE`` and is back at ``SCHED_OTHER`` before it handles what it
found or sleeps. The danger: next to a busy task a ``SCHED_IDLE`` thread gets
about 0.3% of the CPU (measured: gaps of 1.4 s), so a poll that began on a free
CPU would not end when its budget does. The C extension
:mod:`transport._pollguard` arms a timer at each poll; its own thread, which
never needs the GIL the starved poller may hold, puts the poller back to
``SCHED_OTHER`` when the timer fires first. Measured: polls next to a busy task
on the same CPU end within 4.5 ms of their start instead of 1.4 s.

Not available (then the loop polls at ``SCHED_OTHER``, as before):

- without the extension: ``make install`` compiles it with the ring core
  (``tools/mypyc_build.py``); ``MIC_PURE_PYTHON=1`` and ``make pure`` leave it out;
- where a thread may not come back from ``SCHED_IDLE`` (an unprivileged user
  needs ``RLIMIT_NICE`` >= 20 or ``CAP_SYS_NICE``): probed once, on a thread of
  its own, before any poll uses it;
- ``MIC_LOOP_IDLE_POLL=0`` in the environment.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Protocol

__all__ = ["ENV", "IdlePoll", "available", "for_this_thread"]

ENV = "MIC_LOOP_IDLE_POLL"


class IdlePoll(Protocol):
    """What :func:`for_this_thread` returns (:class:`transport._pollguard.Guard`)."""

    rescued: int

    def enter(self, ns: int, /) -> None:
        """Arm the guard for ``ns`` and make the calling thread ``SCHED_IDLE``."""

    def leave(self) -> None:
        """The calling thread back to ``SCHED_OTHER``; the guard disarmed."""


def _extension() -> Callable[[int], IdlePoll] | None:
    try:
        from transport._pollguard import Guard
    except ImportError:  # pure Python (not built, or MIC_PURE_PYTHON=1)
        return None
    return Guard


_Guard = _extension()

#: native thread id -> its guard (None: not available); a guard's thread lives
#: as long as the process, so there is at most one per polling thread
_GUARDS: dict[int, IdlePoll | None] = {}
_probe: bool | None = None


def _can_leave_idle() -> bool:
    """Can a thread of ours go to ``SCHED_IDLE`` and come back? Tried on a
    throwaway thread: one that cannot come back ends there."""
    ok: list[bool] = []

    def probe() -> None:
        param = os.sched_param(0)
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, param)
            os.sched_setscheduler(0, os.SCHED_OTHER, param)
        except (OSError, AttributeError):
            return
        ok.append(True)

    t = threading.Thread(target=probe, name="mic-idle-poll-probe", daemon=True)
    t.start()
    t.join()
    return bool(ok)


def available() -> str | None:
    """Why polls cannot run at the idle priority here, or None if they can."""
    global _probe
    if os.environ.get(ENV, "").strip() == "0":
        return f"{ENV}=0"
    if _Guard is None:
        return "transport._pollguard is not built (make install builds it)"
    if os.sched_getscheduler(0) != os.SCHED_OTHER:
        return "the thread does not run at SCHED_OTHER"
    if _probe is None:
        _probe = _can_leave_idle()
    if not _probe:
        return "a thread cannot come back from SCHED_IDLE (RLIMIT_NICE < 20, no CAP_SYS_NICE)"
    return None


def for_this_thread() -> IdlePoll | None:
    """The calling thread's guard, made at the first call; None where polls
    cannot run at the idle priority (:func:`available` says why)."""
    tid = threading.get_native_id()
    if tid not in _GUARDS:
        guard: IdlePoll | None = None
        if available() is None and _Guard is not None:
            try:
                guard = _Guard(tid)
            except OSError:  # pragma: no cover - no timerfd or no thread
                guard = None
        _GUARDS[tid] = guard
    return _GUARDS[tid]
