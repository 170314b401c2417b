"""Hypothesis tests of the packed ring (the twin of ``test_ring_hypothesis.py``).

- :class:`PackedMachine`: driver + device against one shared memory and a
  plain model, with small (also odd) queue sizes so the wrap counters flip
  often: FIFO avail order, out-of-order completions with list-length skips,
  tokens returned once with the clamped length, slot accounting, and no lost
  wake-up in either direction (flags and EVENT_IDX with wrap bits).
- Fuzz: arbitrary bytes in the descriptor ring, an indirect area and the
  driver event word (device side), and in the used descriptors and the device
  event word (driver side), either parse into valid lists/completions or
  raise :class:`RingError` -- never another exception, never a loop (the
  number of pops is bounded), never an access outside memory.

Example counts are budgeted to keep ``make test`` quick.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from tests.virtio.packed_pair import AVAIL, USED, PackedPair
from tests.virtio.test_ring_hypothesis import (
    WARM_UP,
    RecordingMemory,
    WarmUp,
    attempt,
    check_chain_valid,
    pattern,
)
from virtio.constants import Feature, PackedDescFlag
from virtio.errors import LocalProtocolError, WouldBlock
from virtio.memory import FlatMemory
from virtio.packed import (
    DESC,
    DESC_SIZE,
    Chain,
    DeviceQueue,
    DriverQueue,
    PackedLayout,
    QueueBroken,
    RingError,
    RingFault,
)

IND_MAX = 3


@dataclass(slots=True)
class Sent:
    bid: int
    need: int
    data: bytes
    rlens: list[int]
    wlens: list[int]


class PackedMachine(RuleBasedStateMachine):
    """Driver and device over one memory, checked against a plain model."""

    def __init__(self) -> None:
        super().__init__()
        self.p: PackedPair

    @initialize(
        size=st.sampled_from([1, 2, 3, 4, 5, 8]),
        event_idx=st.booleans(),
        indirect=st.booleans(),
        warm=WARM_UP,
    )
    def setup(
        self,
        size: int,
        event_idx: bool,
        indirect: bool,
        warm: WarmUp = ((), 0, ()),
    ) -> None:
        self.ind_max = min(IND_MAX, size)
        self.p = PackedPair(
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
        self.sent: dict[int, Sent] = {}
        self.unpublished: list[int] = []
        self.avail: deque[int] = deque()
        self.popped: dict[int, tuple[int, Chain]] = {}
        self.staged: list[tuple[int, int]] = []
        self.used: deque[tuple[int, int]] = deque()
        self.next_token = 1
        self.dev_waiting = False
        self.drv_waiting = False
        self.slots_free = self.p.size

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
        _, bid = self.p.add(readable, wlens, token)
        assert all(s.bid != bid for s in self.sent.values()), "buffer id handed out twice"
        self.slots_free -= need
        self.sent[token] = Sent(bid, need, b"".join(readable), rlens, wlens)
        self.unpublished.append(token)

    @rule()
    def publish(self) -> None:
        kick = self.p.driver.publish()
        if not self.unpublished:
            assert not kick
            return
        if self.dev_waiting:
            assert kick, "lost wake-up: the device is waiting and publish() did not kick"
        if not self.p.device.notify_enabled:
            assert not kick
        elif not self.p.driver.event_idx:
            assert kick
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
        self.slots_free += self.sent.pop(token).need
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
    def check_chain(self, chain: Chain) -> None:
        token = self.avail.popleft()
        s = self.sent[token]
        assert chain.head == s.bid
        assert chain.read() == s.data
        assert [n for _, n, w in chain.segments if not w] == s.rlens
        assert [n for _, n, w in chain.segments if w] == s.wlens
        self.popped[chain.head] = (token, chain)

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

    def drained(self) -> None:
        """After a pop that emptied the ring the device may sleep: the next
        list must kick (pop keeps the device's event at what it consumed)."""
        if not self.avail and self.p.device.notify_enabled:
            self.dev_waiting = True

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
        if self.drv_waiting:
            assert irq, "lost wake-up: the driver is waiting and publish_used() did not interrupt"
        if not self.p.driver.interrupts_enabled:
            assert not irq
        elif not self.p.device.event_idx:
            assert irq
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


TestPackedMachine = PackedMachine.TestCase
TestPackedMachine.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


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


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=st.sampled_from([1, 2, 3, 4, 5, 8]),
    event_idx=st.booleans(),
    indirect=st.booleans(),
    data=st.data(),
)
def test_packed_model_long_runs(
    size: int, event_idx: bool, indirect: bool, data: st.DataObject
) -> None:
    m = PackedMachine()
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


# ---------------------------------------------------------------------------
# fuzz: arbitrary bytes in the ring

MEM_SIZE = 0x2000
RING_AT = 0x1000
TABLE_AT = 0x800
FUZZ_SIZES = st.sampled_from([1, 2, 3, 4, 8])
_NEXT = int(PackedDescFlag.NEXT)


def fuzz_device(
    size: int,
    features: int,
    ring: bytes,
    table: bytes,
    driver_event: bytes,
    complete: list[bool],
    require: tuple[bool, bool],
) -> None:
    flat = FlatMemory(MEM_SIZE)
    mem = RecordingMemory(flat)
    layout = PackedLayout.contiguous(RING_AT, size)
    q = DeviceQueue(mem, layout, features, require_readable=require[0], require_writable=require[1])
    q.activate()
    raw = flat.raw()
    raw[layout.desc : layout.desc + len(ring)] = ring
    raw[TABLE_AT : TABLE_AT + len(table)] = table
    raw[layout.driver : layout.driver + len(driver_event)] = driver_event
    # every pop takes at least one slot, so 2 laps' worth of pops ends any run
    for i in range(2 * size + 2):
        out = attempt(q.pop) if i % 2 else attempt(lambda: q.pop_many(2))
        if isinstance(out, BaseException):
            assert isinstance(out, RingError), f"not a RingError: {out!r}"
            assert isinstance(out.fault, RingFault)
            assert q.broken
            assert isinstance(attempt(q.pop), QueueBroken)
            return
        chains = out if isinstance(out, list) else [out]
        if not chains or chains == [None]:
            return
        for c in chains:
            assert isinstance(c, Chain)
            assert 0 <= c.head < size
            check_chain_valid(c, size, flat)
            if complete[(i + c.head) % len(complete)]:
                r = attempt(lambda c=c: q.push_used(c.head, c.writable_len))  # type: ignore[misc]
                if isinstance(r, BaseException):
                    assert isinstance(r, RingError), f"not a RingError: {r!r}"
                    assert r.fault in {RingFault.BAD_EVENT_FLAGS, RingFault.BAD_EVENT_OFFSET}
                    return
    for addr, length, _ in mem.calls:
        assert addr >= 0
        assert addr + length <= MEM_SIZE


@settings(max_examples=150, deadline=None)
@given(
    size=FUZZ_SIZES,
    features=st.sampled_from([0, int(Feature.INDIRECT_DESC), int(Feature.EVENT_IDX)]),
    data=st.data(),
    complete=st.lists(st.booleans(), min_size=1, max_size=4),
    require=st.tuples(st.booleans(), st.booleans()),
)
def test_fuzz_device_raw_bytes(
    size: int, features: int, data: st.DataObject, complete: list[bool], require: tuple[bool, bool]
) -> None:
    """Pure random bytes in the descriptor ring, an indirect area and the driver event word."""
    ring = data.draw(st.binary(min_size=DESC_SIZE * size, max_size=DESC_SIZE * size))
    table = data.draw(st.binary(max_size=0x100))
    event = data.draw(st.binary(min_size=4, max_size=4))
    fuzz_device(size, features, ring, table, event, complete, require)


def descriptor(size: int) -> st.SearchStrategy[bytes]:
    """A descriptor that is often almost valid: in-memory addresses, lap-1 bits."""
    addr = st.one_of(
        st.integers(0, MEM_SIZE),
        st.just(TABLE_AT),
        st.integers(MEM_SIZE - 64, MEM_SIZE + 64),
        st.integers(0, (1 << 64) - 1),
    )
    length = st.one_of(
        st.integers(0, 64),
        st.sampled_from([16, 32, 48, 64, 144]),
        st.integers(0, (1 << 32) - 1),
    )
    bid = st.one_of(st.integers(0, size + 1), st.integers(0, 0xFFFF))
    flags = st.one_of(
        st.tuples(st.integers(0, 7), st.sampled_from([AVAIL, USED, 0, AVAIL | USED])).map(
            lambda t: t[0] | t[1]
        ),
        st.just(AVAIL),
        st.just(AVAIL | _NEXT),
        st.integers(0, 0xFFFF),
    )
    return st.builds(DESC.pack, addr, length, bid, flags)


@settings(max_examples=150, deadline=None)
@given(
    size=FUZZ_SIZES,
    features=st.sampled_from(
        [0, int(Feature.INDIRECT_DESC), int(Feature.INDIRECT_DESC | Feature.EVENT_IDX)]
    ),
    data=st.data(),
    complete=st.lists(st.booleans(), min_size=1, max_size=4),
    require=st.tuples(st.booleans(), st.booleans()),
)
def test_fuzz_device_structured(
    size: int, features: int, data: st.DataObject, complete: list[bool], require: tuple[bool, bool]
) -> None:
    """Descriptors drawn near the valid space (so the walk goes deep)."""
    ring = b"".join(data.draw(st.lists(descriptor(size), min_size=size, max_size=size)))
    table = b"".join(data.draw(st.lists(descriptor(size + 1), max_size=size + 2)))
    event = data.draw(
        st.one_of(
            st.sampled_from([b"\0\0\0\0", b"\0\0\1\0", b"\0\x80\2\0"]),
            st.binary(min_size=4, max_size=4),
        )
    )
    fuzz_device(size, features, ring, table, event, complete, require)


@settings(max_examples=150, deadline=None)
@given(
    size=FUZZ_SIZES,
    event_idx=st.booleans(),
    lists=st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 3)).filter(lambda t: sum(t) > 0), max_size=8
    ),
    publish=st.integers(0, 8),
    used=st.data(),
)
def test_fuzz_driver_used_descriptors(
    size: int,
    event_idx: bool,
    lists: list[tuple[int, int]],
    publish: int,
    used: st.DataObject,
) -> None:
    """Random used descriptors: completions are outstanding ids or a RingError."""
    flat = FlatMemory(MEM_SIZE)
    mem = RecordingMemory(flat)
    layout = PackedLayout.contiguous(RING_AT, size)
    feats = int(Feature.INDIRECT_DESC) | (int(Feature.EVENT_IDX) if event_idx else 0)
    d: DriverQueue[int] = DriverQueue(mem, layout, feats, indirect_area=0x400, indirect_max=2)
    wlen: dict[int, int] = {}
    need: dict[int, int] = {}
    published: set[int] = set()
    for token, (nr, nw) in enumerate(lists, start=1):
        if token == publish + 1:
            published |= set(wlen)
            assert isinstance(attempt(d.publish), bool)  # device area is zero: ENABLE
        try:
            d.add([(0x100, 8)] * nr, [(0x200, 5)] * nw, token)
        except (WouldBlock, LocalProtocolError):
            continue
        wlen[token] = 5 * nw
        need[token] = 1 if nr + nw <= 2 else nr + nw
    raw = flat.raw()
    if used.draw(st.booleans()):
        blob = used.draw(st.binary(min_size=layout.desc_bytes, max_size=layout.desc_bytes))
        raw[layout.desc : layout.desc + layout.desc_bytes] = blob
    else:  # plausible used descriptors: ids near the range, both wrap bits equal
        for slot in range(size):
            bid = used.draw(st.integers(0, size + 1))
            ln = used.draw(st.one_of(st.integers(0, 20), st.integers(0, (1 << 32) - 1)))
            bits = used.draw(st.sampled_from([AVAIL | USED, 0, AVAIL, USED]))
            DESC.pack_into(raw, layout.desc + slot * DESC_SIZE, 0, ln, bid, bits)
    got: set[int] = set()
    for _ in range(size + 2):
        out = attempt(d.get_used)
        if isinstance(out, BaseException):
            assert isinstance(out, RingError), f"not a RingError: {out!r}"
            assert out.fault in {RingFault.USED_ID_OUT_OF_RANGE, RingFault.USED_ID_NOT_HEAD}
            assert d.broken
            assert isinstance(attempt(d.get_used), QueueBroken)
            break
        if out is None:
            break
        assert isinstance(out, tuple)
        token, length = out
        assert token in published, "a completion for a list the device never saw"
        assert token not in got
        got.add(token)
        assert 0 <= length <= wlen[token]
        in_use = sum(need[t] for t in wlen if t not in got)
        assert d.num_free + in_use == size
    for addr, length, _ in mem.calls:
        assert addr + length <= MEM_SIZE
