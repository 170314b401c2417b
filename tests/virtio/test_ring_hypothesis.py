"""Hypothesis tests of the split ring (STYLE.md §7, rust-vmm virtio-queue fuzzing).

- :class:`RingMachine`: driver + device against a list model (FIFO avail order,
  tokens returned once with the clamped length, descriptor accounting, and no
  lost wake-up in either direction).
- Fuzz: arbitrary bytes in the descriptor table / avail ring (device side) and
  the used ring (driver side) either parse into valid chains/completions or
  raise :class:`RingError` -- never another exception, never an access
  outside memory (:class:`RecordingMemory` checks every ``view``).
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from tests.virtio.pair import RingPair
from virtio.constants import DescFlag, Feature
from virtio.errors import LocalProtocolError, WouldBlock
from virtio.memory import FlatMemory, MemoryFault
from virtio.split import (
    DESC,
    DESC_SIZE,
    Chain,
    DeviceQueue,
    DriverQueue,
    QueueBroken,
    RingError,
    RingFault,
    SplitLayout,
)

IND_MAX = 3

#: How a stateful run starts (``warm_up``): lists to add (1..4, each with a
#: readable buffer), pops (1..4), and the lengths of the chains to complete.
#: Runs that added / popped / completed a buffer, over 3 sessions of each
#: machine (``TestRingMachine``, ``TestPackedMachine``; ~150 runs a session):
#: without the warm-up split 30-57 / 2-15 / 1-7 and packed 50-79 / 14-18 /
#: 7-9; with it all but 0-6 runs a session do all three (the others end in
#: the initial draw). The long-run test below starts empty (no warm-up).
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


@dataclass(slots=True)
class Sent:
    head: int
    need: int
    data: bytes
    rlens: list[int]
    wlens: list[int]


def pattern(token: int, n: int) -> bytes:
    return bytes((token * 31 + i) & 0xFF for i in range(n))


class RingMachine(RuleBasedStateMachine):
    """Driver and device over one memory, checked against a plain model."""

    def __init__(self) -> None:
        super().__init__()
        self.p: RingPair

    @initialize(
        size=st.sampled_from([1, 2, 4, 8]),
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
        # DriverQueue clamps indirect_max to the size; mirror it for the model
        self.ind_max = min(IND_MAX, size)
        self.p = RingPair(
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
        self.popped: dict[int, tuple[int, Chain]] = {}  # head -> (token, chain)
        self.staged: list[tuple[int, int]] = []  # add_used, not published
        self.used: deque[tuple[int, int]] = deque()  # published used entries
        self.returned: set[int] = set()
        self.next_token = 1
        # "This side looked, found nothing and may now sleep": the next new
        # work from the peer must come with a kick/interrupt.
        self.dev_waiting = False
        self.drv_waiting = False

    # -- driver ------------------------------------------------------------
    @rule(
        rlens=st.lists(st.integers(1, 48), max_size=4),
        wlens=st.lists(st.integers(1, 48), max_size=4),
    )
    def add(self, rlens: list[int], wlens: list[int]) -> None:
        nseg = len(rlens) + len(wlens)
        assume(nseg > 0)
        d = self.p.driver
        need = 1 if nseg == 1 or (d.indirect and nseg <= self.ind_max) else nseg
        token = self.next_token
        self.next_token += 1
        readable = [pattern(token + i, n) for i, n in enumerate(rlens)]
        if nseg > d.size:
            with pytest.raises(LocalProtocolError):
                self.p.add(readable, wlens, token)
            return
        if need > d.num_free:
            with pytest.raises(WouldBlock):
                self.p.add(readable, wlens, token)
            return
        _, head = self.p.add(readable, wlens, token)
        self.sent[token] = Sent(head, need, b"".join(readable), rlens, wlens)
        self.unpublished.append(token)

    @rule()
    def publish(self) -> None:
        kick = self.p.driver.publish()
        if not self.unpublished:
            assert not kick
            return
        if self.dev_waiting:
            assert kick, "lost wake-up: the device is waiting and publish() did not kick"
        if not self.p.driver.event_idx:
            assert kick == self.p.device.notify_enabled
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
        assert chain.head == s.head
        assert chain.read() == s.data
        assert [n for _, n, w in chain.segments if not w] == s.rlens
        assert [n for _, n, w in chain.segments if w] == s.wlens
        assert chain.writable_len == sum(s.wlens)
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

    @rule(limit=st.integers(0, 9))
    def pop_many(self, limit: int) -> None:
        chains = self.p.device.pop_many(limit)
        assert len(chains) == min(limit, len(self.avail))
        for c in chains:
            self.check_chain(c)

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
        if not self.p.device.event_idx:
            assert irq == self.p.driver.interrupts_enabled
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
    def descriptors_add_up(self) -> None:
        d = self.p.driver
        assert d.num_free + sum(s.need for s in self.sent.values()) == d.size
        assert d.outstanding == len(self.sent)

    @invariant()
    def device_counts_match(self) -> None:
        v = self.p.device
        assert v.in_flight == len(self.popped)
        assert v.pending() == len(self.avail)
        assert not v.broken
        assert not self.p.driver.broken


TestRingMachine = RingMachine.TestCase
TestRingMachine.settings = settings(
    max_examples=120,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# ---------------------------------------------------------------------------
# fuzz: arbitrary bytes in the rings


class RecordingMemory:
    """Wraps a FlatMemory; every view it hands out must lie inside the memory."""

    def __init__(self, inner: FlatMemory) -> None:
        self.inner = inner
        self.calls: list[tuple[int, int, bool]] = []

    def view(self, addr: int, length: int, write: bool = False) -> memoryview:
        mv = self.inner.view(addr, length, write)  # raises MemoryFault if outside
        base, size = self.inner.base, self.inner.size
        assert base <= addr
        assert addr + length <= base + size
        assert len(mv) == length
        self.calls.append((addr, length, write))
        return mv


def attempt(fn: Callable[[], object]) -> object:
    """Run ``fn``; return its result or the exception it raised (asserted by the caller)."""
    try:
        return fn()
    except Exception as e:  # the point is to see *any* exception
        return e


MEM_SIZE = 0x2000
RING_AT = 0x1000
TABLE_AT = 0x800
FUZZ_SIZES = st.sampled_from([1, 2, 4, 8])


def check_chain_valid(chain: Chain, size: int, mem: FlatMemory) -> None:
    assert 1 <= len(chain.segments) <= size
    seen_w = False
    for addr, length, w in chain.segments:
        assert length > 0
        assert mem.base <= addr
        assert addr + length <= mem.base + mem.size
        assert w or not seen_w, "readable after writable"
        seen_w = seen_w or w
    assert chain.readable_len == sum(n for _, n, w in chain.segments if not w)
    assert chain.writable_len == sum(n for _, n, w in chain.segments if w)
    assert chain.readable_len + chain.writable_len < 1 << 32
    assert [len(m) for m in chain.readable] == [n for _, n, w in chain.segments if not w]
    assert [len(m) for m in chain.writable] == [n for _, n, w in chain.segments if w]


def fuzz_device(
    size: int,
    features: int,
    desc: bytes,
    avail: bytes,
    table: bytes,
    complete: list[bool],
    require: tuple[bool, bool],
) -> None:
    flat = FlatMemory(MEM_SIZE)
    mem = RecordingMemory(flat)
    layout = SplitLayout.contiguous(RING_AT, size, 16)
    q = DeviceQueue(mem, layout, features, require_readable=require[0], require_writable=require[1])
    q.activate()
    raw = flat.raw()
    raw[layout.desc : layout.desc + len(desc)] = desc
    raw[layout.avail : layout.avail + len(avail)] = avail
    raw[TABLE_AT : TABLE_AT + len(table)] = table
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
            check_chain_valid(c, size, flat)
            if complete[(i + c.head) % len(complete)]:
                q.push_used(c.head, c.writable_len)
    for addr, length, _ in mem.calls:
        assert addr >= 0
        assert addr + length <= MEM_SIZE


@settings(max_examples=300, deadline=None)
@given(
    size=FUZZ_SIZES,
    indirect=st.booleans(),
    data=st.data(),
    complete=st.lists(st.booleans(), min_size=1, max_size=4),
    require=st.tuples(st.booleans(), st.booleans()),
)
def test_fuzz_device_raw_bytes(
    size: int,
    indirect: bool,
    data: st.DataObject,
    complete: list[bool],
    require: tuple[bool, bool],
) -> None:
    """Pure random bytes in the descriptor table, the avail ring and an indirect area."""
    desc = data.draw(st.binary(min_size=DESC_SIZE * size, max_size=DESC_SIZE * size))
    avail = data.draw(st.binary(min_size=4 + 2 * size, max_size=6 + 2 * size))
    table = data.draw(st.binary(max_size=0x100))
    features = int(Feature.INDIRECT_DESC) if indirect else 0
    fuzz_device(size, features, desc, avail, table, complete, require)


def descriptor(size: int) -> st.SearchStrategy[bytes]:
    """A descriptor that is often almost valid: addresses in or near memory."""
    addr = st.one_of(
        st.integers(0, MEM_SIZE),
        st.just(TABLE_AT),
        st.integers(MEM_SIZE - 64, MEM_SIZE + 64),
        st.integers(0, (1 << 64) - 1),
        st.integers((1 << 64) - 64, (1 << 64) - 1),
    )
    length = st.one_of(
        st.integers(0, 64),
        st.sampled_from([16, 32, 48, 64, 128, 144]),
        st.integers(0, (1 << 32) - 1),
    )
    flags = st.one_of(st.integers(0, 7), st.integers(0, 0xFFFF))
    nxt = st.one_of(st.integers(0, size + 1), st.integers(0, 0xFFFF))
    return st.builds(DESC.pack, addr, length, flags, nxt)


@settings(max_examples=200, deadline=None)
@given(
    size=FUZZ_SIZES,
    indirect=st.booleans(),
    data=st.data(),
    complete=st.lists(st.booleans(), min_size=1, max_size=4),
    require=st.tuples(st.booleans(), st.booleans()),
)
def test_fuzz_device_structured(
    size: int,
    indirect: bool,
    data: st.DataObject,
    complete: list[bool],
    require: tuple[bool, bool],
) -> None:
    """Descriptors drawn near the valid space (so the walk goes deep), then bytes flipped."""
    desc = b"".join(data.draw(st.lists(descriptor(size), min_size=size, max_size=size)))
    table = b"".join(data.draw(st.lists(descriptor(size + 1), max_size=size + 2)))
    heads = data.draw(st.lists(st.integers(0, size + 1), min_size=size, max_size=size))
    idx = data.draw(st.one_of(st.integers(0, size + 1), st.integers(0, 0xFFFF)))
    avail = struct.pack(f"<HH{size}H", 0, idx, *heads)
    if data.draw(st.booleans()):
        at = data.draw(st.integers(0, len(desc) - 1))
        desc = desc[:at] + data.draw(st.binary(max_size=8)) + desc[at:]
        desc = desc[: DESC_SIZE * size]
    features = int(Feature.INDIRECT_DESC) if indirect else 0
    fuzz_device(size, features, desc, avail, table, complete, require)


@settings(max_examples=300, deadline=None)
@given(
    size=FUZZ_SIZES,
    event_idx=st.booleans(),
    chains=st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 3)).filter(lambda t: sum(t) > 0),
        max_size=8,
    ),
    publish=st.integers(0, 8),
    used=st.data(),
)
def test_fuzz_driver_used_ring(
    size: int,
    event_idx: bool,
    chains: list[tuple[int, int]],
    publish: int,
    used: st.DataObject,
) -> None:
    """Random bytes in the used ring: completions are outstanding heads or a RingError."""
    flat = FlatMemory(MEM_SIZE)
    mem = RecordingMemory(flat)
    layout = SplitLayout.contiguous(RING_AT, size, 16)
    feats = int(Feature.INDIRECT_DESC) | (int(Feature.EVENT_IDX) if event_idx else 0)
    d: DriverQueue[int] = DriverQueue(mem, layout, feats, indirect_area=0x400, indirect_max=2)
    wlen: dict[int, int] = {}
    need: dict[int, int] = {}
    for token, (nr, nw) in enumerate(chains, start=1):
        if token == publish + 1:
            d.publish()  # the first ``publish`` chains are visible, the rest only added
        try:
            d.add([(0x100, 8)] * nr, [(0x200, 5)] * nw, token)
        except (WouldBlock, LocalProtocolError):
            continue  # full ring, or a chain longer than the ring
        wlen[token] = 5 * nw
        need[token] = 1 if nr + nw <= 2 else nr + nw
    raw = flat.raw()
    if used.draw(st.booleans()):
        blob = used.draw(st.binary(min_size=layout.used_bytes, max_size=layout.used_bytes))
        raw[layout.used : layout.used + layout.used_bytes] = blob
    else:  # plausible used elements: ids near the heads, lengths around the sizes
        for slot in range(size):
            head = used.draw(st.integers(0, size + 1))
            ln = used.draw(st.one_of(st.integers(0, 20), st.integers(0, (1 << 32) - 1)))
            struct.pack_into("<II", raw, layout.used + 4 + 8 * slot, head, ln)
        idx = used.draw(st.one_of(st.integers(0, size + 1), st.integers(0, 0xFFFF)))
        struct.pack_into("<H", raw, layout.used + 2, idx)
    got: set[int] = set()
    for _ in range(size + 2):
        out = attempt(d.get_used)
        if isinstance(out, BaseException):
            assert isinstance(out, RingError), f"not a RingError: {out!r}"
            assert out.fault in {
                RingFault.USED_IDX_JUMP,
                RingFault.USED_ID_OUT_OF_RANGE,
                RingFault.USED_ID_NOT_HEAD,
            }
            assert d.broken
            assert isinstance(attempt(d.get_used), QueueBroken)
            break
        if out is None:
            break
        assert isinstance(out, tuple)
        token, length = out
        # Only "an outstanding head": a head added but not yet published is
        # accepted too (as Linux does; see test_driver_rejects_used_id_not_yet_published).
        assert token in wlen
        assert token not in got
        got.add(token)
        assert 0 <= length <= wlen[token]
        in_use = sum(need[t] for t in wlen if t not in got)
        assert d.num_free + in_use == size
    for addr, length, _ in mem.calls:
        assert addr + length <= MEM_SIZE


def test_memory_fault_is_what_recording_memory_passes_through() -> None:
    mem = RecordingMemory(FlatMemory(16))
    with pytest.raises(MemoryFault):
        mem.view(8, 16)
    assert mem.calls == []
    assert DescFlag.INDIRECT == 4  # the fuzzers' flag range 0..7 covers every flag
