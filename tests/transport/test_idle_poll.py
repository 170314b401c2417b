"""Polls at the idle priority (``transport.pollguard``, ``SpinSelector``): real processes.

A poll runs at ``SCHED_IDLE`` so that a task queued on its CPU runs first; the
guard thread of ``transport._pollguard`` ends a poll the kernel starves, and the
loop then polls at ``SCHED_OTHER`` for a while. Each process here is pinned to
the CPU the test runs on, so the kernel cannot move the contention away.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest

from transport import pollguard, spinloop
from transport.spinloop import SpinSelector

_WHY_NOT = pollguard.available()
pytestmark = pytest.mark.skipif(_WHY_NOT is not None, reason=f"no idle-priority polls: {_WHY_NOT}")


@pytest.fixture
def one_cpu() -> Iterator[int]:
    """Pin this thread to one CPU (children inherit it); restore afterwards."""
    before = os.sched_getaffinity(0)
    cpu = min(before)
    os.sched_setaffinity(0, {cpu})
    try:
        yield cpu
    finally:
        os.sched_setaffinity(0, before)


def _busy_child(seconds: float) -> int:
    """A nice-0 process that keeps the CPU busy for ``seconds``."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            pass
        os._exit(0)
    return pid


def test_a_poll_runs_at_sched_idle_and_a_task_on_its_cpu_goes_first(one_cpu: int) -> None:
    """A busy child on our CPU watches our scheduling policy and answers once it
    sees SCHED_IDLE: it can only run (and see it) while we poll, and it does at
    once; after the poll we are back at SCHED_OTHER. A poll at SCHED_OTHER would
    keep the CPU, and the child would give up after 2 s and answer 1."""
    pong = os.eventfd(0, os.EFD_NONBLOCK)
    parent = threading.get_native_id()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            end, answer = time.monotonic() + 2.0, 1
            while time.monotonic() < end:
                if os.sched_getscheduler(parent) == os.SCHED_IDLE:
                    answer = 2
                    break
            os.eventfd_write(pong, answer)
        finally:
            os._exit(0)
    sel = SpinSelector(4_000_000_000)
    try:
        sel.register(pong, 1)  # EVENT_READ
        sel.spin_ns = sel.max_spin_ns
        ready = sel.select(10.0)
        assert ready, "the child never answered"
        assert os.eventfd_read(pong) == 2, "the child did not see the poll at SCHED_IDLE"
        assert (sel.idle_polls, sel.spin_hits, sel.sleeps) == (1, 1, 0)
        assert os.sched_getscheduler(0) == os.SCHED_OTHER
    finally:
        sel.close()
        os.waitpid(pid, 0)
        os.close(pong)


def test_a_starved_poll_is_ended_by_the_guard_and_the_loop_backs_off(one_cpu: int) -> None:
    """Next to a busy task on our CPU a SCHED_IDLE poll gets ~0.3% of it (gaps of a
    second, measured): the guard puts it back to SCHED_OTHER, the poll ends soon
    after its budget, and the next polls run at SCHED_OTHER under the counting rules."""
    pid = _busy_child(3.0)
    sel = SpinSelector(2_000_000)  # a 2 ms budget
    try:
        time.sleep(0.01)  # the child is running
        sel.spin_ns = sel.max_spin_ns
        rescued = sel.rescued
        t0 = time.monotonic()
        assert sel.select(0.05) == []  # a 2 ms poll, then a 48 ms sleep
        took = time.monotonic() - t0
        assert sel.idle_polls == 1
        assert sel.rescued == rescued + 1
        assert took < 0.4, f"the starved poll lasted {took:.3f} s"
        assert os.sched_getscheduler(0) == os.SCHED_OTHER
        sel.spin_ns = sel.max_spin_ns
        sel.select(0.001)
        assert sel.idle_polls == 1, "polled at the idle priority again right after a rescue"
    finally:
        sel.close()
        os.kill(pid, 9)
        os.waitpid(pid, 0)


def test_no_idle_polls_where_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(pollguard.ENV, "0")
    assert pollguard.available() == f"{pollguard.ENV}=0"
    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(pollguard.for_this_thread()))
    t.start()
    t.join()
    assert got == [None]


def test_a_loop_polls_at_the_idle_priority_through_asyncio() -> None:
    """The daemon's and the cards' loop (spinloop.run) gets a guard of its own."""

    async def main() -> SpinSelector:
        import asyncio

        sel = asyncio.get_running_loop()._selector  # type: ignore[attr-defined]
        assert isinstance(sel, SpinSelector)
        for _ in range(20):
            await asyncio.sleep(0)  # a ready callback: no poll
            await asyncio.sleep(0.0001)  # a short sleep: the budget grows, then polls
        return sel

    # the loop's own timers wait 1 ms at least (epoll's resolution): a 5 ms budget grows
    sel = spinloop.run(main(), max_spin_ns=5_000_000)
    assert sel.idle_polls > 0
    assert sel.idle_polls <= sel.spins
