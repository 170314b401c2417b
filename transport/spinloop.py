"""An asyncio event loop that polls briefly before it sleeps (adaptive halt-polling).

Owns :class:`SpinSelector` and :func:`run`, the loop the ``mic-host`` daemon and
the ``mic-card`` processes run on. Must not import anything above ``transport``.

Why: one request crosses two processes, and a cross-vCPU wake-up of a sleeping
process costs 35-80 µs on this machine (``reference/perf_baselines.md`` §2b),
most of a round trip. A loop that is still polling when the peer's doorbell
(an eventfd write), a pty byte or a TAP frame arrives picks it up in a few µs.

Where the spin lives matters. A waiter that spins *inside a task* (the
HYBRID policy of :class:`~transport.notify.Vector`) holds the loop while other
callbacks are ready: measured with ``bench/latency.py --trace``, the doorbell
pump's 50 µs spin sat between every doorbell and the backend that serves it,
and between every interrupt and the request it completes. This selector spins
only where the loop would block: when nothing is ready and the next timer is
further away, it polls the selector with a zero timeout (``epoll_wait(…, 0)``,
every registered fd at once, so the daemon spins once for every card it
serves) for up to the current budget, then blocks as usual. It never delays
work that is ready: a ready callback makes the loop call ``select(0)``, which
returns at once.

The budget adapts as KVM's halt-polling does (``virt/kvm/kvm_main.c``,
``grow_halt_poll_ns``/``shrink_halt_poll_ns``): a sleep that ended within the
maximum would have been caught by a longer spin, so the budget doubles (from
:data:`GROW_START_NS`); a sleep longer than the maximum halves it. An idle
process therefore stops spinning after a few long sleeps and costs what a
plain loop costs; a process in a request/response exchange spins just long
enough to catch its peer.

Polling pays only while a CPU would otherwise idle. When more tasks are
runnable than there are CPUs (``/proc/loadavg``'s running count, read before a
poll and every :data:`CHECK_NS` during it, ~2 µs), or a preemption kept us off
the CPU for more than :data:`CONTENDED_NS`, the loop sleeps at once, as KVM
stops halt-polling when another task is runnable: a polling process only
queues behind the others (and spends its CFS share), while a sleeper the
kernel wakes preempts them. Measured under load (load average 3-5 on the two
CPUs) before this rule: block QD1 p50 145-180 µs spinning against 100-105 µs
not spinning, with a third of the daemon's samples inside ``sched_yield``.

``MIC_LOOP_SPIN_US`` (default :data:`DEFAULT_SPIN_US`) sets the maximum spin
of both processes; ``0`` turns spinning off (a plain asyncio loop).
"""

from __future__ import annotations

import asyncio
import os
import selectors
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = [
    "CONTENDED_NS",
    "DEFAULT_SPIN_US",
    "ENV",
    "GROW_START_NS",
    "CHECK_NS",
    "SpinSelector",
    "new_event_loop",
    "run",
    "spin_budget_from_env",
]

T = TypeVar("T")

ENV = "MIC_LOOP_SPIN_US"
#: Longest spin before the loop sleeps. A block request spends 20-60 µs on the
#: other side; a console echo or a ping from the card involves a third process
#: (the reader, the pinger) whose own wake-up sits inside the gap, 150-300 µs:
#: with 100 µs the daemon slept at every doorbell; on the quiet machine 400
#: against 200 µs gave console echo p50 160-170 against 300-330 µs, block read
#: 73 against 80-90 µs (two runs each). Idle, the budget still halves at every
#: long sleep (400 -> 0 in six).
DEFAULT_SPIN_US = 400
#: First budget after a short sleep showed that spinning would pay.
GROW_START_NS = 10_000
#: How often a spinning loop checks that no task waits for a CPU.
CHECK_NS = 20_000
#: A gap this long between two polls means another process ran on our CPU.
CONTENDED_NS = 30_000


def spin_budget_from_env() -> int:
    """The maximum spin in ns from ``$MIC_LOOP_SPIN_US`` (bad values: the default)."""
    raw = os.environ.get(ENV, "").strip()
    try:
        us = float(raw) if raw else float(DEFAULT_SPIN_US)
    except ValueError:
        us = float(DEFAULT_SPIN_US)
    return max(0, int(us * 1000))


class SpinSelector(selectors.EpollSelector):
    """An epoll selector that polls up to an adaptive budget before it blocks.

    Counters (plain ints): ``spins`` (polls that began), ``spin_hits`` (polls
    that found an event), ``contended`` (polls cut short because another
    process had our CPU), ``sleeps`` (blocking selects), ``spin_ns`` (the
    current budget).
    """

    def __init__(self, max_spin_ns: int) -> None:
        super().__init__()
        self.max_spin_ns = max(0, int(max_spin_ns))
        self.spin_ns = 0
        self.contended = 0
        self.spins = 0
        self.spin_hits = 0
        self.sleeps = 0
        self._ncpu = os.cpu_count() or 1
        try:
            self._loadavg = os.open("/proc/loadavg", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # pragma: no cover - not Linux: never crowded
            self._loadavg = -1

    def close(self) -> None:
        if self._loadavg >= 0:
            os.close(self._loadavg)
            self._loadavg = -1
        super().close()

    def _crowded(self) -> bool:
        """True when more tasks are runnable than there are CPUs (we are one of
        them): ``/proc/loadavg``'s 4th field counts them now, system-wide."""
        if self._ncpu < 2:
            return True  # our peer cannot run while we poll
        if self._loadavg < 0:
            return False
        try:
            return int(os.pread(self._loadavg, 64, 0).split()[3].split(b"/")[0]) > self._ncpu
        except (OSError, ValueError, IndexError):  # pragma: no cover - an odd kernel
            return False

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if self.max_spin_ns == 0 or (timeout is not None and timeout <= 0):
            return super().select(timeout)
        clock = time.perf_counter_ns
        budget = self.spin_ns
        t0 = clock()
        if budget and self._crowded():
            # More runnable tasks than CPUs: a poll would hold a CPU someone
            # waits for (KVM's halt-polling stops on !single_task_running()).
            self.contended += 1
            budget = 0
        if budget:
            if timeout is not None:
                budget = min(budget, int(timeout * 1e9))
            self.spins += 1
            deadline = t0 + budget
            next_check = t0 + CHECK_NS
            poll = super().select
            last = t0
            while True:
                ready = poll(0)
                if ready:
                    self.spin_hits += 1
                    return ready
                now = clock()
                if now - last > CONTENDED_NS:
                    # Another process had our CPU (a preemption): polling now
                    # only queues us behind it, while a sleeper the kernel
                    # wakes preempts it. Sleep, and spin again only once short
                    # sleeps show it pays (the budget regrows from 0).
                    self.contended += 1
                    self.spin_ns = 0
                    break
                if now >= deadline:
                    break
                if now >= next_check:
                    if self._crowded():
                        self.contended += 1
                        break
                    now = clock()
                    next_check = now + CHECK_NS
                last = now
            if timeout is not None:
                timeout = max(0.0, timeout - (now - t0) / 1e9)
        self.sleeps += 1
        ready = super().select(timeout)
        self._adapt(clock() - t0)
        return ready

    def _adapt(self, waited_ns: int) -> None:
        """KVM's rule: grow after a sleep a longer spin would have saved, shrink
        after one no allowed spin could have."""
        cur, top = self.spin_ns, self.max_spin_ns
        if waited_ns > top:
            self.spin_ns = cur // 2 if cur // 2 >= GROW_START_NS else 0
        elif cur < top:
            self.spin_ns = min(top, cur * 2 if cur else GROW_START_NS)


def new_event_loop(max_spin_ns: int | None = None) -> asyncio.AbstractEventLoop:
    """A selector event loop on a :class:`SpinSelector` (``None``: from the environment);
    a plain one when the budget is 0."""
    ns = spin_budget_from_env() if max_spin_ns is None else max_spin_ns
    if ns <= 0:
        return asyncio.SelectorEventLoop()
    return asyncio.SelectorEventLoop(SpinSelector(ns))


def run(main: Coroutine[Any, Any, T], max_spin_ns: int | None = None) -> T:
    """``asyncio.run(main)`` on :func:`new_event_loop`."""
    with asyncio.Runner(loop_factory=lambda: new_event_loop(max_spin_ns)) as runner:
        return runner.run(main)
