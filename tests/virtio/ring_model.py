"""The ring model both ring formats are checked against (STYLE.md §7, rust-vmm
virtio-queue fuzzing), and the fuzzers' shared checks.

- :class:`RingMachine`: driver + device over one memory against a plain model:
  FIFO avail order, out-of-order completions, tokens returned once with the
  clamped length, descriptor/slot accounting, buffer ids never handed out
  twice, and no lost wake-up in either direction. One rule set; a subclass
  names its ring format with a :class:`RingKind` (``SPLIT``, ``PACKED``), which
  says how to build the pair, which sizes to draw and where the formats'
  notification rules differ.
- :data:`WARM_UP`: every stateful run starts with work on the ring.
- :func:`long_run`: the same rules drawn as one long list of operations.

Used by ``test_ring_model.py``; the fuzzers' shared checks are in
:mod:`tests.virtio.ring_fuzz`. No processes, no asyncio.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import hypothesis.strategies as st
import pytest
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from tests.virtio.packed_pair import PackedPair
from tests.virtio.pair import QueuePair, RingPair
from virtio.errors import LocalProtocolError, WouldBlock

IND_MAX = 3

#: How a stateful run starts (:meth:`RingMachine.warm_up`): lists to add (1..4,
#: each with a readable buffer), pops (1..4), and the lengths of the chains to
#: complete. Runs that added / popped / completed a buffer, over 3 sessions of
#: each machine (~150 runs a session): without the warm-up split 30-57 / 2-15 /
#: 1-7 and packed 50-79 / 14-18 / 7-9; with it all but 0-6 runs a session do
#: all three (the others end in the initial draw). :func:`long_run` starts
#: empty (no warm-up).
WarmUp = tuple[Sequence[tuple[list[int], list[int]]], int, Sequence[int]]
WARM_UP: st.SearchStrategy[WarmUp] = st.tuples(
    st.lists(
        st.tuples(
            st.lists(st.integers(1, 48), min_size=1, max_size=3),
            st.lists(st.integers(1, 48), max_size=3),
        ),
        min_size=1,
        max_size=4,
    ),
    st.integers(1, 4),
    st.lists(st.integers(0, 100), min_size=1, max_size=4),
)


@dataclass(frozen=True, slots=True)
class RingKind:
    """What the model needs to know about one ring format.

    ``exact_suppression``: a side that disabled its peer's notifications is
    never notified, even with EVENT_IDX (packed: the flags override the event
    offset). On a split ring with EVENT_IDX only the event index counts, so a
    kick/interrupt may come while "disabled".

    Both formats keep a side's event at what it consumed (Linux
    ``virtqueue_get_buf`` stores ``used_event = last_used_idx``; the device
    side likewise), so a side that has just taken the last item may sleep and
    the next one must notify it: the model checks that on both.
    """

    name: str
    pair: Callable[..., QueuePair]
    sizes: tuple[int, ...]
    exact_suppression: bool


#: With EVENT_IDX a split ring's notifications follow the event index alone: a
#: side that disabled them may still be notified.
SPLIT = RingKind("split", RingPair, sizes=(1, 2, 4, 8), exact_suppression=False)
#: A packed ring's flags override its event offsets: a side that disabled
#: notifications is never notified, with EVENT_IDX or not. Small and odd sizes,
#: so the wrap counters flip often.
PACKED = RingKind("packed", PackedPair, sizes=(1, 2, 3, 4, 5, 8), exact_suppression=True)


@dataclass(slots=True)
class Sent:
    head: int  # the chain's head (split) or buffer id (packed)
    need: int  # descriptors / slots it takes
    data: bytes
    rlens: list[int]
    wlens: list[int]


def pattern(token: int, n: int) -> bytes:
    return bytes((token * 31 + i) & 0xFF for i in range(n))


class RingMachine(RuleBasedStateMachine):
    """Driver and device over one memory, checked against a plain model.

    Build one for a ring format with :func:`machine_for` (it sets :attr:`KIND`
    and draws the initial sizes from it).
    """

    KIND: ClassVar[RingKind]

    def __init__(self) -> None:
        super().__init__()
        self.p: Any

    def setup(
        self,
        size: int,
        event_idx: bool,
        indirect: bool,
        warm: WarmUp = ((), 0, ()),
    ) -> None:
        # DriverQueue clamps indirect_max to the size; mirror it for the model
        self.ind_max = min(IND_MAX, size)
        self.p = self.KIND.pair(
            size,
            event_idx=event_idx,
            indirect=indirect,
            indirect_max=self.ind_max,
            blocks=size * IND_MAX + 8,
        )
        self.clear_model()
        self.warm_up(*warm)

    def warm_up(
        self, lists: Sequence[tuple[list[int], list[int]]], pops: int, pushes: Sequence[int]
    ) -> None:
        """Start a run with work on the ring, through the rules themselves (every
        check applies): add ``lists``, publish, pop ``pops`` times, complete one
        popped chain per entry of ``pushes`` (its length), publish the used ones.

        Hypothesis' stateful runs are mostly a few steps long and the rules are
        drawn uniformly, so without this most runs never added a buffer (about
        a third did; see ``WARM_UP``).
        """
        n = self.p.driver.size
        for rlens, wlens in lists:
            # cut to what a ring this size takes, so the warm-up adds something
            self.add(rlens=rlens[:n], wlens=wlens[: n - len(rlens[:n])])
        self.publish()
        for _ in range(pops):
            self.pop()
        for i, length in enumerate(pushes):
            if self.popped:
                self.push(pick=i, length=length)
        self.publish_used()

    def clear_model(self) -> None:
        self.sent: dict[int, Sent] = {}  # every token the driver has not got back
        self.unpublished: list[int] = []
        self.avail: deque[int] = deque()  # published, not popped (FIFO)
        self.popped: dict[int, tuple[int, Any]] = {}  # head -> (token, chain)
        self.staged: list[tuple[int, int]] = []  # add_used, not published
        self.used: deque[tuple[int, int]] = deque()  # published used entries
        self.returned: set[int] = set()
        self.next_token = 1
        # "This side looked, found nothing and may now sleep": the next new
        # work from the peer must come with a kick/interrupt.
        self.dev_waiting = False
        self.drv_waiting = False

    @property
    def slots_free(self) -> int:
        return int(self.p.size) - sum(s.need for s in self.sent.values())

    # -- driver ------------------------------------------------------------
    @rule(
        rlens=st.lists(st.integers(1, 48), max_size=4),
        wlens=st.lists(st.integers(1, 48), max_size=4),
    )
    def add(self, rlens: list[int], wlens: list[int]) -> None:
        nseg = len(rlens) + len(wlens)
        if not nseg:
            rlens = [1]  # not assume(): that would throw the whole run away
            nseg = 1
        d = self.p.driver
        need = 1 if nseg == 1 or (d.indirect and nseg <= self.ind_max) else nseg
        token = self.next_token
        self.next_token += 1
        readable = [pattern(token + i, n) for i, n in enumerate(rlens)]
        if nseg > d.size:
            with pytest.raises(LocalProtocolError):
                self.p.add(readable, wlens, token)
            return
        if need > self.slots_free:
            with pytest.raises(WouldBlock):
                self.p.add(readable, wlens, token)
            return
        _, head = self.p.add(readable, wlens, token)
        assert all(s.head != head for s in self.sent.values()), "buffer id handed out twice"
        self.sent[token] = Sent(head, need, b"".join(readable), rlens, wlens)
        self.unpublished.append(token)

    @staticmethod
    def check_wake(
        fired: bool, waiting: bool, enabled: bool, event_idx: bool, exact: bool, what: str
    ) -> None:
        """A kick (interrupt) against the model: a waiting peer must get one; with
        the peer's notifications off none may come (``exact``) and without
        EVENT_IDX it comes exactly when they are on."""
        if waiting:
            assert fired, f"lost wake-up: {what}"
        if exact and not enabled:
            assert not fired
        elif not event_idx:
            assert fired == enabled

    @rule()
    def publish(self) -> None:
        kick = self.p.driver.publish()
        if not self.unpublished:
            assert not kick
            return
        v = self.p.device
        self.check_wake(
            kick,
            self.dev_waiting,
            v.notify_enabled,
            self.p.driver.event_idx,
            self.KIND.exact_suppression,
            "the device is waiting and publish() did not kick",
        )
        if kick:
            self.dev_waiting = False
        self.avail.extend(self.unpublished)
        self.unpublished.clear()

    @rule()
    def get_used(self) -> None:
        d = self.p.driver
        got = d.get_used()
        if not self.used:
            assert got is None
            if d.interrupts_enabled:
                self.drv_waiting = True
            return
        token, length = self.used.popleft()
        assert got == (token, length)
        assert token not in self.returned
        self.returned.add(token)
        del self.sent[token]
        self.p.release(token)
        # Drained: a driver may sleep now, so the next completion must interrupt
        # (stricter than waiting for a None: get_used keeps the event at last_used).
        if not self.used and d.interrupts_enabled:
            self.drv_waiting = True

    @rule()
    def disable_interrupts(self) -> None:
        self.p.driver.disable_interrupts()
        self.drv_waiting = False

    @rule()
    def enable_interrupts(self) -> None:
        pending = self.p.driver.enable_interrupts()
        assert pending == bool(self.used)
        if not pending:
            self.drv_waiting = True

    # -- device ------------------------------------------------------------
    def check_chain(self, chain: Any) -> None:
        token = self.avail.popleft()
        s = self.sent[token]
        assert chain.head == s.head
        assert chain.read() == s.data
        assert [n for _, n, w in chain.segments if not w] == s.rlens
        assert [n for _, n, w in chain.segments if w] == s.wlens
        assert chain.writable_len == sum(s.wlens)
        self.popped[chain.head] = (token, chain)

    def drained(self) -> None:
        """After a pop that emptied the ring the device may sleep: the next
        list must kick (pop keeps the device's event at what it consumed)."""
        if not self.avail and self.p.device.notify_enabled:
            self.dev_waiting = True

    @rule()
    def pop(self) -> None:
        v = self.p.device
        chain = v.pop()
        if not self.avail:
            assert chain is None
            if v.notify_enabled:
                self.dev_waiting = True
            return
        assert chain is not None
        self.check_chain(chain)
        self.drained()

    @rule(limit=st.integers(0, 9))
    def pop_many(self, limit: int) -> None:
        chains = self.p.device.pop_many(limit)
        assert len(chains) == min(limit, len(self.avail))
        for c in chains:
            self.check_chain(c)
        if chains:
            self.drained()

    @precondition(lambda self: self.popped)
    @rule(pick=st.integers(0, 1 << 16), length=st.integers(0, 100))
    def push(self, pick: int, length: int) -> None:
        heads = sorted(self.popped)
        head = heads[pick % len(heads)]  # completions out of order
        token, chain = self.popped.pop(head)
        written = chain.write(pattern(token, length))
        assert written == min(length, chain.writable_len)
        self.p.device.add_used(head, length)  # may overstate: the driver clamps
        self.staged.append((token, min(length, chain.writable_len)))

    @precondition(lambda self: self.popped)
    @rule(data=st.data())
    def push_many(self, data: st.DataObject) -> None:
        heads = data.draw(st.permutations(sorted(self.popped)))
        heads = heads[: data.draw(st.integers(1, len(heads)))]
        entries = []
        for head in heads:
            token, chain = self.popped.pop(head)
            entries.append((head, chain.writable_len))
            self.staged.append((token, chain.writable_len))
        self.p.device.add_used_many(entries)

    @rule()
    def publish_used(self) -> None:
        irq = self.p.device.publish_used()
        if not self.staged:
            assert not irq
            return
        self.check_wake(
            irq,
            self.drv_waiting,
            self.p.driver.interrupts_enabled,
            self.p.device.event_idx,
            self.KIND.exact_suppression,
            "the driver is waiting and publish_used() did not interrupt",
        )
        if irq:
            self.drv_waiting = False
        self.used.extend(self.staged)
        self.staged.clear()

    @rule()
    def disable_notifications(self) -> None:
        self.p.device.disable_notifications()
        self.dev_waiting = False

    @rule()
    def enable_notifications(self) -> None:
        pending = self.p.device.enable_notifications()
        assert pending == bool(self.avail)
        if not pending:
            self.dev_waiting = True

    @rule()
    def reset(self) -> None:
        self.p.reset()
        self.clear_model()

    # -- invariants ----------------------------------------------------------
    @invariant()
    def counts_match(self) -> None:
        d, v = self.p.driver, self.p.device
        assert d.num_free == self.slots_free
        assert d.outstanding == len(self.sent)
        assert v.in_flight == len(self.popped)
        assert v.pending() == len(self.avail)
        assert not v.broken
        assert not d.broken


def machine_for(kind: RingKind) -> type[RingMachine]:
    """The :class:`RingMachine` of ``kind``: its runs start on a ring of one of
    ``kind.sizes``, with or without EVENT_IDX and indirect descriptors, and
    :data:`WARM_UP` work on it."""

    class Machine(RingMachine):
        KIND = kind

        @initialize(
            size=st.sampled_from(kind.sizes),
            event_idx=st.booleans(),
            indirect=st.booleans(),
            warm=WARM_UP,
        )
        def start(self, size: int, event_idx: bool, indirect: bool, warm: WarmUp) -> None:
            self.setup(size, event_idx, indirect, warm)

    Machine.__name__ = Machine.__qualname__ = f"{kind.name.title()}Machine"
    return Machine


# Long runs of the same model: hypothesis' stateful runs are mostly a few
# steps long, and a lost wake-up needs a dozen. The same rules, drawn as one
# list of 30-80 operations (reset rarely), so every run wraps the small rings.
_OPS = (
    ["add"] * 4
    + ["publish"] * 3
    + ["pop", "pop_many", "push", "push_many", "publish_used", "get_used"] * 2
    + ["disable_interrupts", "enable_interrupts", "disable_notifications"]
    + ["enable_notifications"]
)


def long_run(
    machine: type[RingMachine], size: int, event_idx: bool, indirect: bool, data: st.DataObject
) -> None:
    """30-80 operations of ``machine`` from an empty ring, counts checked after each."""
    m = machine()
    m.setup(size=size, event_idx=event_idx, indirect=indirect)
    lens = st.lists(st.integers(1, 48), max_size=3)
    for op in data.draw(st.lists(st.sampled_from(_OPS), min_size=30, max_size=80)):
        if op == "add":
            m.add(rlens=data.draw(lens), wlens=data.draw(lens))
        elif op == "pop_many":
            m.pop_many(limit=data.draw(st.integers(0, 9)))
        elif op == "push":
            if m.popped:
                m.push(
                    pick=data.draw(st.integers(0, 1 << 16)), length=data.draw(st.integers(0, 60))
                )
        elif op == "push_many":
            if m.popped:
                m.push_many(data=data)
        else:
            getattr(m, op)()
        m.counts_match()
