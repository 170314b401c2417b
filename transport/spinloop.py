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
poll and every :data:`CHECK_NS` during it, ~2 µs), the loop sleeps at once, as
KVM stops halt-polling when another task is runnable: a polling process only
queues behind the others (and spends its share), and a third process of ours
woken meanwhile (the pty reader, a client) would wait behind two pollers until
the scheduler's next tick (4 ms at ``HZ=250``), while a sleeper the kernel
wakes preempts them. Measured under load (load average 3-5 on the two CPUs)
before this rule: block QD1 p50 145-180 µs spinning against 100-105 µs not
spinning, with a third of the daemon's samples inside ``sched_yield``.

Two refinements (issue 19's tails, issue 14's isolation ratio):

- **Background tasks do not count.** A task that stays runnable all the time
  yet never takes the CPU from us (a niced CPU hog: the hostile card of
  ``bench/isolation.py`` at nice 19) is no reason to stop: it would not run
  while we poll anyway, and when we sleep the wake-up preempts it. Every
  :data:`JUDGE_NS` the loop looks at how long *it* waited for a CPU
  (its thread's ``schedstat`` run delay) against the CPU time it used:
  below :data:`WAIT_SHARE_MAX` the tasks that were runnable in nearly every
  reading (beyond ourselves and one peer of ours) are background, and are no
  longer counted as crowding; above it (other processes at our priority take
  turns with us) none are. A task that *arrives* (a client woken by a reply)
  still counts at once.
- **A preemption ends nothing by itself.** A gap of :data:`CONTENDED_NS`
  between two polls means something else had our CPU (an interrupt, a kernel
  thread, a woken process). The loop re-reads the running count and goes on
  polling if the CPU is free again; it used to drop its budget to 0 there,
  and the three to five requests that regrew it each paid a full wake-up,
  which is what made block QD1 p99 three times its p50.

A third refinement (issue 19, the console echo):

- **One task more is tolerated briefly.** A keystroke makes the client and
  the pty's kworker runnable for a few µs each while the daemon and the card
  poll on the two CPUs: with the rule above the card judged the CPUs crowded
  and was asleep when the keystroke reached it (``interrupt -> card_irq`` 42
  µs of a 117 µs echo). When the last judgement found that we hardly wait
  for a CPU (the same :data:`WAIT_SHARE_MAX` test), one runnable task beyond
  the CPUs and the background ones does not stop a poll for
  :data:`TOLERATE_NS` from the reading that first saw it; still there after
  that, it competes with us, and the loop stands down until a reading shows
  it gone (a task behind a poll waits at most that plus :data:`CHECK_NS`, not
  a scheduler tick). Two tasks more, or any under load (we wait for a CPU
  ourselves), stop the poll at once as before.

And the poll itself runs at the idle priority (issue 19, the console tail):

- **A poll gives its CPU to any task that wants it.** The rules above count
  runnable tasks, and cannot see the case that made the console echo's p99
  4-5x its p50: a task queued on *our* CPU while the other one idles. ``perf
  sched`` showed it: the daemon's write to the pty woke the kworker onto the
  daemon's vCPU (this VM's kernel packs wake-ups rather than wake a halted
  vCPU, and an idle CPU does not pull a task that ran within 0.5 ms), and the
  kworker waited 420 µs for the daemon's poll to end: two runnable tasks, two
  CPUs, nothing counted. Where :mod:`transport.pollguard` is available, a
  poll that lasts :data:`IDLE_AFTER_NS` (most hits at depth come sooner and
  then cost no change of policy) goes on at ``SCHED_IDLE``: a task woken on
  our CPU preempts it at once, the kernel places wake-ups on our CPU as on an
  idle one (no halted vCPU to wake), and the poll yields before each look,
  for the tasks queued before it went idle (the kworker our own write woke)
  and a poller of ours that shares the CPU (preemption covers only
  wake-ups). Such a poll reads no counts: whoever wants the CPU takes it.
  The guard of :mod:`transport.pollguard` ends a poll the kernel starves (a
  busy task on our CPU; :data:`IDLE_GRACE_NS` past its budget); polls then
  stay at ``SCHED_OTHER`` under the rules above for a backoff
  (:data:`IDLE_BACKOFF_MIN_NS`, doubling to :data:`IDLE_BACKOFF_NS` while it
  recurs), and for the longest while a background task is judged present
  (next to a niced hog an idle-priority poll would wait for it). Measured on
  the quiet machine (``docs/latency.md`` item 21): console echo p50 125-180
  -> 100-115 µs, its p99 4.2-5.0x -> 1.7-3.1x its p50.
  Counters: ``idle_polls``, ``rescued``.

``MIC_LOOP_SPIN_US`` (default :data:`DEFAULT_SPIN_US`) sets the maximum spin
of both processes; ``0`` turns spinning off (a plain asyncio loop).
``MIC_LOOP_IDLE_POLL=0`` keeps polls at ``SCHED_OTHER``.
"""

from __future__ import annotations

import asyncio
import os
import selectors
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from transport import pollguard

__all__ = [
    "CONTENDED_NS",
    "DEFAULT_SPIN_US",
    "ENV",
    "GROW_START_NS",
    "CHECK_NS",
    "IDLE_AFTER_NS",
    "IDLE_BACKOFF_MIN_NS",
    "IDLE_BACKOFF_NS",
    "IDLE_GRACE_NS",
    "JUDGE_CPU_NS",
    "JUDGE_NS",
    "TOLERATE_NS",
    "WAIT_SHARE_MAX",
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
#: How often the loop judges whether the tasks waiting for a CPU compete with it.
JUDGE_NS = 50_000_000
#: The least CPU time of ours (ns) a judgement rests on; less, and it waits longer.
JUDGE_CPU_NS = 5_000_000
#: Waiting for a CPU longer than this share of our own CPU time means the other
#: runnable tasks take turns with us (our priority): none of them is background.
#: Measured with an eventfd ping-pong next to a CPU hog on each CPU (load 6-8):
#: a nice-19 hog is preempted at once (run delay 0.1-2 µs per wake-up, p99 50
#: µs), a nice-0 one is not (28-57 µs per wake-up, p99 2.4-2.9 ms); a wake-up of
#: the daemon or the card costs 20-60 µs of CPU.
WAIT_SHARE_MAX = 0.25
#: A count of other runnable tasks seen in at least this share of the readings
#: of a judgement window is persistent (a transient client wake-up is not).
PERSISTENT_SHARE = 0.9
#: How long one runnable task more than the CPUs (beyond the background ones)
#: may stay before a poll stands down, when the last judgement found that we
#: hardly wait for a CPU. A keystroke makes a third and fourth process
#: runnable for a few µs each (the pty's kworker, the client); a task that
#: stays longer competes with us, and waits at most this plus
#: :data:`CHECK_NS` behind a poll.
TOLERATE_NS = 50_000
#: How long polls stay at ``SCHED_OTHER`` (under the counting rules) after the
#: kernel starved one at ``SCHED_IDLE``: :data:`IDLE_BACKOFF_MIN_NS` after a
#: burst of other work outlasted one poll, doubling up to
#: :data:`IDLE_BACKOFF_NS` while starving recurs (a busy task shares our CPU:
#: an idle-priority poll would wait for it until the guard ends it), and the
#: longest while a background task is judged (:meth:`SpinSelector._judge`).
IDLE_BACKOFF_NS = 500_000_000
IDLE_BACKOFF_MIN_NS = 20_000_000
#: A poll runs this long at ``SCHED_OTHER`` before it goes to the idle priority:
#: most hits come sooner (block at depth), and a hit then costs no change of
#: policy (two syscalls, ~3 µs); a task queued behind the poll waits this long.
#: Measured: 50 µs let the console's tail back (p99 4x its p50), 0 cost block
#: at depth 4-6% of its IOPS.
IDLE_AFTER_NS = 20_000
#: How long past its budget a poll at the idle priority may last before the
#: guard (:mod:`transport.pollguard`) puts it back to ``SCHED_OTHER``: a poll
#: that runs ends itself at its budget; one that does not is starved.
IDLE_GRACE_NS = 1_000_000


def _open_ro(path: str) -> int:
    """An fd to read ``path`` with ``pread``; -1 if it cannot be opened (not Linux)."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:  # pragma: no cover - not Linux
        return -1


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
    that found an event), ``contended`` (polls not begun or cut short because
    tasks waited for a CPU), ``preempted`` (gaps in a poll: something else had
    our CPU), ``sleeps`` (blocking selects), ``spin_ns`` (the current budget),
    ``background`` (runnable tasks currently judged background, not crowding),
    ``tolerated`` (readings where one task more was tolerated, :data:`TOLERATE_NS`),
    ``idle_polls`` (polls run at ``SCHED_IDLE``), ``rescued`` (of those, the ones
    the guard ended: the kernel starved them).
    """

    def __init__(self, max_spin_ns: int) -> None:
        super().__init__()
        self.max_spin_ns = max(0, int(max_spin_ns))
        self.spin_ns = 0
        self.contended = 0
        self.spins = 0
        self.spin_hits = 0
        self.sleeps = 0
        self.preempted = 0
        self.background = 0
        self.tolerated = 0
        self.idle_polls = 0
        #: polls at SCHED_IDLE with a guard (transport.pollguard), None: not here
        self._idle = pollguard.for_this_thread() if self.max_spin_ns else None
        self._rescued_seen = self._idle.rescued if self._idle is not None else 0
        #: no poll at the idle priority before this (perf_counter_ns)
        self._idle_off_until = 0
        self._backoff_ns = IDLE_BACKOFF_MIN_NS
        #: the last judgement found that we hardly wait for a CPU: one task more is tolerated
        self._tolerant = False
        #: since when one task more than we allow has been runnable (0: not now)
        self._over_since = 0
        self._last_reading = 0
        self._clock = time.perf_counter_ns  # a test scripts it
        self._ncpu = os.cpu_count() or 1
        self._loadavg = _open_ro("/proc/loadavg")
        # The loop's own thread: the selector is made on the thread that runs it.
        self._schedstat = _open_ro(f"/proc/self/task/{threading.get_native_id()}/schedstat")
        #: readings of the judgement window, by the number of *other* runnable tasks (capped)
        self._seen = [0] * 8
        self._judge_at = 0
        self._exec_ns, self._delay_ns = self._sched_times()

    @property
    def rescued(self) -> int:
        return self._idle.rescued if self._idle is not None else 0

    def close(self) -> None:
        for fd in (self._loadavg, self._schedstat):
            if fd >= 0:
                os.close(fd)
        self._loadavg = self._schedstat = -1
        super().close()

    def _running(self) -> int:
        """Tasks runnable now, system-wide, ourselves included (``/proc/loadavg``'s
        4th field); -1 if unknown."""
        if self._loadavg < 0:
            return -1
        try:
            return int(os.pread(self._loadavg, 64, 0).split()[3].split(b"/")[0])
        except (OSError, ValueError, IndexError):  # pragma: no cover - an odd kernel
            return -1

    def _sched_times(self) -> tuple[int, int]:
        """This thread's CPU time and time spent waiting for a CPU (ns); 0, 0 if unknown."""
        if self._schedstat < 0:
            return 0, 0
        try:
            f = os.pread(self._schedstat, 128, 0).split()
            return int(f[0]), int(f[1])
        except (OSError, ValueError, IndexError):  # pragma: no cover - no schedstats
            return 0, 0

    def _crowded(self) -> bool:
        """True when more tasks are runnable than there are CPUs, not counting
        the ones judged background (:meth:`_judge`), nor for :data:`TOLERATE_NS`
        one task more when the last judgement found us hardly waiting."""
        if self._ncpu < 2:
            return True  # our peer cannot run while we poll
        n = self._running()
        if n < 0:
            return False
        self._seen[min(7, max(0, n - 1))] += 1
        now = self._clock()
        if now >= self._judge_at:
            self._judge(now)
        extra = n - self._ncpu - self.background
        last, self._last_reading = self._last_reading, now
        if extra <= 0:
            self._over_since = 0
            return False
        if not self._over_since or now - last > TOLERATE_NS:
            # A stretch of readings above the CPUs begins (readings further
            # apart, around a sleep, say nothing of what ran in between).
            self._over_since = now
        if extra > 1 or not self._tolerant or now - self._over_since > TOLERATE_NS:
            return True
        self.tolerated += 1
        return False

    def _judge(self, now: int) -> None:
        """Which runnable tasks are background: the ones present in nearly every
        reading since the last judgement (beyond ourselves and one peer of ours),
        if we hardly waited for a CPU meanwhile; else none. Hardly waiting also
        lets :meth:`_crowded` tolerate one task more briefly."""
        exec_ns, delay_ns = self._sched_times()
        used, waited = exec_ns - self._exec_ns, delay_ns - self._delay_ns
        if used < JUDGE_CPU_NS:
            self._judge_at = now + JUDGE_NS // 10  # too little to go on: look again soon
            return
        seen, total = self._seen, sum(self._seen)
        persistent, tail = 0, 0
        for k in range(len(seen) - 1, 0, -1):  # the most others present in >= 90% of readings
            tail += seen[k]
            if tail >= PERSISTENT_SHARE * total:
                persistent = k
                break
        quiet = waited <= WAIT_SHARE_MAX * used
        self.background = min(self._ncpu, max(0, persistent - 1)) if quiet else 0
        self._tolerant = quiet
        self._seen = [0] * 8
        self._exec_ns, self._delay_ns = exec_ns, delay_ns
        self._judge_at = now + JUDGE_NS

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if self.max_spin_ns == 0 or (timeout is not None and timeout <= 0):
            return super().select(timeout)
        clock = time.perf_counter_ns
        budget = self.spin_ns
        t0 = clock()
        idle = self._idle_poll(t0) if budget else None
        if budget and idle is None and self._crowded():
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
            # Whoever wants this CPU takes it: no count decides (module doc),
            # once the poll has lasted IDLE_AFTER_NS (most hits come sooner,
            # and they then cost no change of policy).
            go_idle = t0 + IDLE_AFTER_NS if idle is not None else 0
            idling = False
            try:
                while True:
                    if idling:
                        # Tasks queued on this CPU before the poll began (the
                        # kworker our own write woke) or since (a poller of ours
                        # that shares it) go first: preemption covers only wake-ups.
                        os.sched_yield()
                    ready = poll(0)
                    if ready:
                        self.spin_hits += 1
                        return ready
                    now = clock()
                    if go_idle and now >= go_idle:
                        assert idle is not None
                        go_idle = 0
                        try:
                            idle.enter(deadline - now + IDLE_GRACE_NS)
                        except OSError:  # refused after all (a policy set from outside)
                            self._idle = None
                        else:
                            idling = True
                            self.idle_polls += 1
                    gap = now - last > CONTENDED_NS
                    if gap or now >= next_check:
                        # After a gap something else had our CPU (an interrupt,
                        # a kernel thread, a woken process): if tasks still wait
                        # for a CPU, sleep; if not, it is over: poll on, with the
                        # budget kept. At the idle priority that is the point.
                        if gap:
                            self.preempted += 1
                        if not idling and self._crowded():
                            self.contended += 1
                            break
                        now = clock()
                        next_check = now + CHECK_NS
                    if now >= deadline:
                        break
                    last = now
            finally:
                if idling:
                    assert idle is not None
                    try:
                        idle.leave()
                    except OSError:  # the guard restores the policy at the deadline
                        self._idle = None
            if timeout is not None:
                timeout = max(0.0, timeout - (now - t0) / 1e9)
        self.sleeps += 1
        ready = super().select(timeout)
        self._adapt(clock() - t0)
        return ready

    def _idle_poll(self, now: int) -> pollguard.IdlePoll | None:
        """The guard to poll at the idle priority with, or None: not available
        here, or backing off (:data:`IDLE_BACKOFF_NS`) since the kernel starved a
        poll (a busy task shares our CPU) or while a background task is judged."""
        idle = self._idle
        if idle is None:
            return None
        if idle.rescued != self._rescued_seen:
            # Starved: back off, twice as long as last time if the last backoff
            # ended within that long (a busy task that stays), else briefly (a
            # burst of other work that outlasted one poll).
            self._rescued_seen = idle.rescued
            recent = now - self._idle_off_until < self._backoff_ns
            self._backoff_ns = (
                min(IDLE_BACKOFF_NS, 2 * self._backoff_ns) if recent else IDLE_BACKOFF_MIN_NS
            )
            self._idle_off_until = now + self._backoff_ns
        if now < self._idle_off_until:
            return None
        if self.background:
            self._idle_off_until = now + IDLE_BACKOFF_NS
            return None
        return idle

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
