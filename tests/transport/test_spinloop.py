"""The event loop of mic-host and mic-card polls before it sleeps, adaptively.

Real processes: a forked peer writes an eventfd while the loop is still
polling, and the loop must catch it without sleeping; an idle loop must stop
polling (the idle-cost goal of issue 19).

These are the rules of a poll at ``SCHED_OTHER`` (where ``transport.pollguard``
is not available, and after it backs off): every test here runs without the
guard. Polls at the idle priority: ``test_idle_poll.py``.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from transport import pollguard, spinloop
from transport.spinloop import GROW_START_NS, SpinSelector


@pytest.fixture(autouse=True)
def _polls_at_sched_other(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pollguard, "for_this_thread", lambda: None)


def test_budget_grows_after_short_sleeps_and_shrinks_after_long_ones() -> None:
    sel = SpinSelector(100_000)
    try:
        assert sel.spin_ns == 0  # a fresh loop does not spin: nothing says it would pay
        for _ in range(8):
            sel._adapt(50_000)  # woken within the maximum: a longer spin would have caught it
        assert sel.spin_ns == 100_000  # doubled from GROW_START_NS, capped at the maximum
        sel._adapt(10_000_000)  # a long sleep: halve
        assert sel.spin_ns == 50_000
        for _ in range(4):
            sel._adapt(10_000_000)
        assert sel.spin_ns == 0  # below GROW_START_NS it stops spinning altogether
        sel._adapt(30_000)
        assert sel.spin_ns == GROW_START_NS
    finally:
        sel.close()


def test_env_sets_the_budget_and_zero_gives_a_plain_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(spinloop.ENV, "0")
    loop = spinloop.new_event_loop()
    try:
        assert not isinstance(loop._selector, SpinSelector)  # type: ignore[attr-defined]
    finally:
        loop.close()
    monkeypatch.setenv(spinloop.ENV, "250")
    assert spinloop.spin_budget_from_env() == 250_000
    monkeypatch.setenv(spinloop.ENV, "nonsense")
    assert spinloop.spin_budget_from_env() == spinloop.DEFAULT_SPIN_US * 1000


def test_a_peer_process_is_caught_while_the_loop_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    """The child answers 2 ms after our ring; a 1 s budget catches every answer by polling
    (as on an idle machine: other engineers' load must not turn the poll off here)."""
    monkeypatch.setattr(SpinSelector, "_crowded", lambda self: False)
    monkeypatch.setattr(spinloop, "CONTENDED_NS", 10**12)
    ping, pong = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.set_blocking(ping, True)
            while os.eventfd_read(ping) < 1000:
                time.sleep(0.002)
                os.eventfd_write(pong, 1)
        finally:
            os._exit(0)

    async def main() -> SpinSelector:
        loop = asyncio.get_running_loop()
        sel = loop._selector  # type: ignore[attr-defined]
        assert isinstance(sel, SpinSelector)
        sel.spin_ns = sel.max_spin_ns  # as after a burst of activity
        got: asyncio.Queue[int] = asyncio.Queue()
        loop.add_reader(pong, lambda: got.put_nowait(os.eventfd_read(pong)))
        for _ in range(5):
            os.eventfd_write(ping, 1)
            await asyncio.wait_for(got.get(), 10)
        loop.remove_reader(pong)
        return sel

    try:
        sel = spinloop.run(main(), max_spin_ns=1_000_000_000)
    finally:
        os.eventfd_write(ping, 1000)
        os.waitpid(pid, 0)
        os.close(ping)
        os.close(pong)
    # Every answer arrived while the loop polled, so it never went to sleep. (Not
    # every answer is a spin_hit: a loop preempted for the child's 2 ms under load
    # finds the answer in the select(0) it makes while callbacks are ready.)
    assert sel.sleeps == 0
    assert sel.spin_hits >= 1


def test_an_idle_loop_stops_polling() -> None:
    async def main() -> tuple[int, int]:
        sel = asyncio.get_running_loop()._selector  # type: ignore[attr-defined]
        assert isinstance(sel, SpinSelector)
        sel.spin_ns = sel.max_spin_ns
        for _ in range(10):
            await asyncio.sleep(0.01)  # ten sleeps far longer than the maximum spin
        spins = sel.spins
        for _ in range(10):
            await asyncio.sleep(0.01)
        return sel.spin_ns, sel.spins - spins

    budget, more = spinloop.run(main(), max_spin_ns=100_000)
    assert budget == 0
    assert more == 0


def test_no_polling_while_tasks_wait_for_a_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """More runnable tasks than CPUs: the loop sleeps at once (a poll would queue behind them)."""
    monkeypatch.setattr(SpinSelector, "_crowded", lambda self: True)

    async def main() -> SpinSelector:
        sel = asyncio.get_running_loop()._selector  # type: ignore[attr-defined]
        assert isinstance(sel, SpinSelector)
        sel.spin_ns = sel.max_spin_ns
        for _ in range(5):
            await asyncio.sleep(0.001)
        return sel

    sel = spinloop.run(main(), max_spin_ns=1_000_000_000)
    assert sel.spins == 0
    assert sel.contended >= 5


def test_crowded_reads_the_running_count() -> None:
    sel = SpinSelector(100_000)
    try:
        assert isinstance(sel._crowded(), bool)  # parses this kernel's /proc/loadavg
    finally:
        sel.close()


def test_a_gap_in_the_poll_keeps_polling_when_the_cpu_is_free(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every poll looks preempted (``CONTENDED_NS`` below any gap) but no task waits
    for a CPU: the loop polls on with its budget and still catches every answer (it
    used to drop the budget to 0 and sleep, and the next requests paid wake-ups)."""
    monkeypatch.setattr(SpinSelector, "_crowded", lambda self: False)
    monkeypatch.setattr(spinloop, "CONTENDED_NS", -1)
    ping, pong = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.set_blocking(ping, True)
            while os.eventfd_read(ping) < 1000:
                time.sleep(0.002)
                os.eventfd_write(pong, 1)
        finally:
            os._exit(0)

    async def main() -> SpinSelector:
        loop = asyncio.get_running_loop()
        sel = loop._selector  # type: ignore[attr-defined]
        assert isinstance(sel, SpinSelector)
        sel.spin_ns = sel.max_spin_ns
        got: asyncio.Queue[int] = asyncio.Queue()
        loop.add_reader(pong, lambda: got.put_nowait(os.eventfd_read(pong)))
        for _ in range(5):
            os.eventfd_write(ping, 1)
            await asyncio.wait_for(got.get(), 10)
        loop.remove_reader(pong)
        return sel

    try:
        sel = spinloop.run(main(), max_spin_ns=1_000_000_000)
    finally:
        os.eventfd_write(ping, 1000)
        os.waitpid(pid, 0)
        os.close(ping)
        os.close(pong)
    assert sel.preempted > 0
    assert sel.sleeps == 0  # every answer caught without sleeping (see the test above)
    assert sel.spin_hits >= 1
    assert sel.spin_ns == sel.max_spin_ns


def test_a_gap_while_tasks_wait_sleeps_but_keeps_the_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = []

    def crowded(self: SpinSelector) -> bool:
        calls.append(1)
        return len(calls) > 1  # free when the poll begins, crowded after the gap

    monkeypatch.setattr(SpinSelector, "_crowded", crowded)
    monkeypatch.setattr(spinloop, "CONTENDED_NS", -1)
    sel = SpinSelector(1_000_000_000)
    try:
        sel.spin_ns = sel.max_spin_ns
        assert sel.select(0.002) == []
        assert (sel.spins, sel.preempted, sel.contended, sel.sleeps) == (1, 1, 1, 1)
        assert sel.spin_ns == sel.max_spin_ns  # a short sleep: nothing says polling stopped paying
    finally:
        sel.close()


class _Sched:
    """A scripted scheduler for :meth:`SpinSelector._crowded`: the running count and
    this thread's CPU and wait times."""

    def __init__(self, sel: SpinSelector, ncpu: int = 2) -> None:
        sel._ncpu = ncpu
        sel._exec_ns = sel._delay_ns = 0
        sel._judge_at = 0
        sel._seen = [0] * 8
        self.running = 0
        self.exec_ns = self.delay_ns = 0
        sel._running = lambda: self.running  # type: ignore[method-assign]
        sel._sched_times = lambda: (self.exec_ns, self.delay_ns)  # type: ignore[method-assign]


class _Clock:
    def __init__(self, sel: SpinSelector) -> None:
        self.ns = 10**12
        self.sel = sel
        sel._clock = lambda: self.ns

    def poll(self, ns: int) -> bool:
        """``ns`` of polling, read every CHECK_NS as the loop does; the last verdict."""
        end = self.ns + ns
        while self.ns + spinloop.CHECK_NS < end:
            self.ns += spinloop.CHECK_NS
            self.sel._crowded()
        self.ns = end
        return self.sel._crowded()


def test_a_runnable_task_that_never_takes_our_cpu_is_background() -> None:
    """A nice-19 hog next to a busy pair: three runnable on two CPUs in every reading,
    yet we hardly wait for a CPU. It stops counting as crowding; a task that arrives
    on top of it (a woken client) counts as any other one: after TOLERATE_NS, or at
    once with a second one."""
    sel = SpinSelector(100_000)
    try:
        s, clock = _Sched(sel), _Clock(sel)
        s.running = 3
        assert sel._crowded()  # nothing judged yet: three on two CPUs is crowded
        for _ in range(50):
            sel._crowded()
        s.exec_ns, s.delay_ns = 20_000_000, 200_000  # 1% of our CPU time spent waiting
        sel._judge_at = 0
        assert not sel._crowded()
        assert sel.background == 1
        s.running = 5  # two clients woken on top of the hog
        assert sel._crowded()
        assert clock.poll(spinloop.TOLERATE_NS + 1)
        s.running = 4  # one of them left, the other has been there too long
        assert clock.poll(1)
        s.running = 3
        assert not sel._crowded()
        s.running = 4  # a client woken on top of the hog: tolerated briefly
        assert not sel._crowded()
        assert clock.poll(spinloop.TOLERATE_NS + 1)
    finally:
        sel.close()


def test_tasks_that_take_turns_with_us_are_never_background() -> None:
    sel = SpinSelector(100_000)
    try:
        s = _Sched(sel)
        s.running = 3
        for _ in range(50):
            sel._crowded()
        s.exec_ns, s.delay_ns = 20_000_000, 8_000_000  # waited 40% of our CPU time
        sel._judge_at = 0
        assert sel._crowded()
        assert sel.background == 0
    finally:
        sel.close()


def test_a_task_present_now_and_then_is_not_background() -> None:
    """A client woken by every reply (runnable in a few readings): not persistent."""
    sel = SpinSelector(100_000)
    try:
        s, clock = _Sched(sel), _Clock(sel)
        for i in range(100):
            s.running = 3 if i % 5 == 0 else 2
            sel._crowded()
        s.exec_ns, s.delay_ns = 20_000_000, 0
        s.running = 3
        sel._judge_at = 0
        sel._crowded()
        assert sel.background == 0
        # not background: it crowds us once its grace is over
        assert clock.poll(spinloop.TOLERATE_NS + 1)
    finally:
        sel.close()


def test_no_judgement_on_too_little_cpu_time() -> None:
    sel = SpinSelector(100_000)
    try:
        s = _Sched(sel)
        s.running = 3
        s.exec_ns = spinloop.JUDGE_CPU_NS - 1
        assert sel._crowded()
        assert sel.background == 0
        assert 0 < sel._judge_at - time.perf_counter_ns() <= spinloop.JUDGE_NS // 10
    finally:
        sel.close()


def test_schedstat_is_read_for_the_loop_thread() -> None:
    sel = SpinSelector(100_000)
    try:
        exec_ns, delay_ns = sel._sched_times()
        assert exec_ns > 0  # this kernel has schedstats
        assert delay_ns >= 0
    finally:
        sel.close()


def _judged(sel: SpinSelector, s: _Sched, delay_ns: int) -> None:
    """One judgement on 20 ms of our CPU time of which ``delay_ns`` spent waiting."""
    s.exec_ns += 20_000_000
    s.delay_ns += delay_ns
    sel._judge_at = 0
    sel._crowded()


def test_one_task_more_is_tolerated_briefly_when_we_hardly_wait_for_a_cpu() -> None:
    """A keystroke wakes the client and the pty's kworker while the daemon and the
    card poll on the two CPUs: three runnable for a few µs. The poll goes on for
    up to TOLERATE_NS of it, then stands down (that task competes with us)."""
    sel = SpinSelector(100_000)
    try:
        s, clock = _Sched(sel), _Clock(sel)
        s.running = 2
        _judged(sel, s, 200_000)  # waited 1% of our CPU time
        s.running = 3
        assert not sel._crowded()  # the woken client: tolerated
        assert not clock.poll(spinloop.TOLERATE_NS)
        assert clock.poll(1)  # still there: it competes with us
        assert clock.poll(10 * spinloop.TOLERATE_NS)  # and stays crowding while it stays
        s.running = 2  # gone: the next one is tolerated again
        assert not clock.poll(1)
        s.running = 3
        assert not clock.poll(spinloop.TOLERATE_NS // 2)
        clock.ns += spinloop.TOLERATE_NS + 1  # no reading meanwhile (the loop slept):
        assert not sel._crowded()  # what ran in between is unknown, a new stretch begins
        assert sel.tolerated > 0
    finally:
        sel.close()


def test_two_tasks_more_stop_the_poll_at_once() -> None:
    sel = SpinSelector(100_000)
    try:
        s, _ = _Sched(sel), _Clock(sel)
        s.running = 2
        _judged(sel, s, 0)
        s.running = 4
        assert sel._crowded()
        assert sel.tolerated == 0
    finally:
        sel.close()


def test_no_tolerance_when_we_wait_for_a_cpu_or_before_any_judgement() -> None:
    """Under load (our own wait for a CPU a large share of our CPU time) the rule is
    strict again: a poller would queue behind the tasks at our priority."""
    sel = SpinSelector(100_000)
    try:
        s, _ = _Sched(sel), _Clock(sel)
        s.running = 3
        s.exec_ns = spinloop.JUDGE_CPU_NS - 1
        assert sel._crowded()  # nothing judged yet: strict
        s.running = 2
        _judged(sel, s, 200_000)
        s.running = 3
        assert not sel._crowded()  # quiet: tolerated
        s.running = 2
        _judged(sel, s, 8_000_000)  # then 40% of our CPU time waiting
        s.running = 3
        assert sel._crowded()
        assert sel.tolerated == 1
    finally:
        sel.close()


@pytest.mark.parametrize("waiting", [False, True])
def test_a_poll_next_to_one_task_more_stands_down_after_its_grace(waiting: bool) -> None:
    """Through select(): with one task more runnable for good, a loop that hardly
    waits for a CPU polls for TOLERATE_NS, then sleeps; one that waits does not poll."""
    sel = SpinSelector(1_000_000_000)
    try:
        s = _Sched(sel)
        s.running = 2
        _judged(sel, s, 8_000_000 if waiting else 200_000)
        sel.spin_ns = sel.max_spin_ns
        s.running = 3
        t0 = time.perf_counter_ns()
        assert sel.select(0.2) == []
        assert sel.sleeps == 1
        assert sel.contended == 1
        if waiting:
            assert sel.spins == 0
            assert sel.tolerated == 0
        else:
            assert sel.spins == 1
            assert sel.tolerated >= 1
            assert sel._over_since >= t0  # the stretch began in this poll ...
            assert sel._last_reading - sel._over_since > spinloop.TOLERATE_NS  # ... outlasted it
    finally:
        sel.close()
