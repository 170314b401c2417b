"""Unit tests of the split ring core through :class:`RingPair` (both sides, no processes)."""

from __future__ import annotations

import dataclasses

import pytest

from tests.virtio.pair import HostileDriver, RingPair
from virtio.constants import DescFlag, Feature, RingFlag
from virtio.errors import LocalProtocolError, WouldBlock
from virtio.memory import FlatMemory
from virtio.split import (
    DESC_SIZE,
    Chain,
    DeviceQueue,
    DriverQueue,
    QueueBroken,
    QueueState,
    RingError,
    RingFault,
    SplitLayout,
    gather_segments,
    need_event,
    scatter_segments,
    slice_segments,
)

# ---------------------------------------------------------------------------
# need_event and SplitLayout


@pytest.mark.parametrize(
    ("event", "new", "old", "expected"),
    [
        (0, 1, 0, True),  # event in (old, new]: 0 == new-1
        (1, 1, 0, False),
        (4, 5, 0, True),
        (5, 5, 0, False),
        (0, 5, 5, False),  # nothing new
        (0xFFFF, 0, 0xFFFF, True),  # across the 16-bit wrap
        (0xFFFE, 1, 0xFFFE, True),
        (0xFFFD, 1, 0xFFFE, False),
        (3, 2, 0xFFF0, False),
    ],
)
def test_need_event(event: int, new: int, old: int, expected: bool) -> None:
    assert need_event(event, new, old) is expected


def test_layout_sizes_and_contiguous() -> None:
    lay = SplitLayout.contiguous(0x1000, 8)
    assert (lay.desc, lay.avail, lay.used) == (0x1000, 0x1080, 0x2000)
    assert (lay.desc_bytes, lay.avail_bytes, lay.used_bytes) == (128, 22, 70)
    # Linux vring_size(256, 4096) == 10246 (desc 4096 + avail 518 -> 8192, used 2054)
    assert SplitLayout.contiguous_bytes(256, 4096) == 8192 + 6 + 8 * 256
    assert SplitLayout.contiguous_bytes(8, 16) == 0xA0 + 70
    assert lay.problem() is None


@pytest.mark.parametrize(
    ("layout", "max_size", "fault"),
    [
        (SplitLayout(0, 0, 0, 0), 32768, RingFault.BAD_SIZE),
        (SplitLayout(3, 0, 0x100, 0x200), 32768, RingFault.BAD_SIZE),
        (SplitLayout(65536, 0, 0x100000, 0x200000), 65536, RingFault.BAD_SIZE),
        (SplitLayout(16, 0, 0x100, 0x200), 8, RingFault.BAD_SIZE),
        (SplitLayout(8, 8, 0x100, 0x200), 32768, RingFault.MISALIGNED),
        (SplitLayout(8, 0, 0x101, 0x200), 32768, RingFault.MISALIGNED),
        (SplitLayout(8, 0, 0x100, 0x202), 32768, RingFault.MISALIGNED),
        (SplitLayout(8, -16, 0x100, 0x200), 32768, RingFault.ADDRESS_OVERFLOW),
        (SplitLayout(8, 0, (1 << 64) - 2, 0x200), 32768, RingFault.ADDRESS_OVERFLOW),
    ],
)
def test_layout_problem(layout: SplitLayout, max_size: int, fault: RingFault) -> None:
    bad = layout.problem(max_size)
    assert bad is not None
    assert bad[0] is fault


# ---------------------------------------------------------------------------
# round trips


def test_round_trip(pair: RingPair) -> None:
    rt = pair.request((b"hello",), (16,))
    assert rt.request == b"hello"
    assert rt.response == b"HELLO"
    assert rt.used_len == 5
    assert rt.kick  # a fresh device wants kicks
    assert rt.interrupt  # a fresh driver wants interrupts
    assert pair.driver.num_free == pair.size
    assert pair.driver.outstanding == 0
    assert pair.device.in_flight == 0


def test_many_round_trips_keep_rings_consistent(pair: RingPair) -> None:
    for i in range(3 * pair.size + 5):
        rt = pair.request((f"req{i}".encode(),), (8,))
        assert rt.response == f"REQ{i}".encode()
    assert pair.avail_idx == pair.used_idx == 3 * pair.size + 5
    assert pair.driver.num_free == pair.size


def test_multi_segment_round_trip(flags: tuple[bool, bool]) -> None:
    event_idx, indirect = flags
    p = RingPair(8, event_idx=event_idx, indirect=indirect, indirect_max=4)
    rt = p.request((b"ab", b"cde", b"f"), (2, 3, 10))
    assert rt.request == b"abcdef"
    assert rt.response == b"ABCDEF"
    assert [(n, w) for _, n, w in rt.segments] == [
        (2, False),
        (3, False),
        (1, False),
        (2, True),
        (3, True),
        (10, True),
    ]


def test_writable_only_and_readable_only_chains(pair: RingPair) -> None:
    token, head = pair.add((), (4,))
    pair.driver.publish()
    chain = pair.device.pop()
    assert chain is not None
    assert chain.readable == []
    assert chain.read() == b""
    assert chain.write(b"wxyz") == 4
    pair.device.push_used(head, 4)
    assert pair.driver.get_used() == (token, 4)
    assert pair.complete(token, 4) == b"wxyz"

    token, head = pair.add((b"only",), ())
    pair.driver.publish()
    chain = pair.device.pop()
    assert chain is not None
    assert chain.writable_len == 0
    assert chain.write(b"xx") == 0
    pair.device.push_used(head, 0)
    assert pair.driver.get_used() == (token, 0)


def test_indirect_chain_uses_one_descriptor() -> None:
    p = RingPair(4, indirect=True, indirect_max=3)
    assert p.driver.indirect
    token, head = p.add((b"ab", b"c"), (5,))
    assert p.driver.num_free == 3
    addr, length, flags, _ = p.read_desc(head)
    assert flags == DescFlag.INDIRECT
    assert length == 3 * DESC_SIZE
    assert addr == p.indirect_area + head * 3 * DESC_SIZE
    p.driver.publish()
    chain = p.device.pop()
    assert chain is not None
    assert chain.read() == b"abc"
    assert chain.readable_len == 3
    assert chain.writable_len == 5
    p.device.push_used(head, chain.write(b"12345"))
    assert p.driver.get_used() == (token, 5)
    assert p.driver.num_free == 4


def test_indirect_not_used_for_single_or_too_many_segments() -> None:
    p = RingPair(8, indirect=True, indirect_max=2)
    _, head = p.add((b"x",), ())
    assert p.read_desc(head)[2] == 0  # one segment: direct
    assert p.driver.num_free == 7
    _, head = p.add((b"a", b"b"), (1,))  # three > indirect_max: direct
    assert p.driver.num_free == 4
    assert p.read_desc(head)[2] == DescFlag.NEXT
    _, head = p.add((b"a",), (1,))  # two: indirect
    assert p.read_desc(head)[2] == DescFlag.INDIRECT
    assert p.driver.num_free == 3


def test_indirect_needs_area_and_feature() -> None:
    mem = FlatMemory(0x8000)
    lay = SplitLayout.contiguous(0x1000, 8)
    assert not DriverQueue(mem, lay, int(Feature.INDIRECT_DESC)).indirect
    assert not DriverQueue(mem, lay, 0, indirect_area=0x4000, indirect_max=4).indirect
    assert DriverQueue(mem, lay, int(Feature.INDIRECT_DESC), indirect_area=0x4000, indirect_max=4)
    with pytest.raises(LocalProtocolError):
        DriverQueue(mem, lay, int(Feature.INDIRECT_DESC), indirect_area=0x7F00, indirect_max=4)


def test_driver_refuses_bad_or_unreachable_layout() -> None:
    mem = FlatMemory(0x2000)
    with pytest.raises(LocalProtocolError):
        DriverQueue(mem, SplitLayout(6, 0, 0x100, 0x200), 0)
    with pytest.raises(LocalProtocolError):
        DriverQueue(mem, SplitLayout.contiguous(0x1000, 8), 0)  # used ring past the end


# ---------------------------------------------------------------------------
# batches and wrap-around


def test_batch_one_kick_one_interrupt_out_of_order(flags: tuple[bool, bool]) -> None:
    event_idx, indirect = flags
    p = RingPair(8 if indirect else 16, event_idx=event_idx, indirect=indirect)
    tokens = [p.add((bytes([65 + i]),), (1,))[0] for i in range(8)]  # fills the ring
    with pytest.raises(WouldBlock):
        p.add((b"z",), ())
    assert p.driver.outstanding == 8
    assert p.driver.publish()
    assert not p.driver.publish()  # nothing new
    chains = p.device.pop_many(5)
    assert [c.read() for c in chains] == [b"A", b"B", b"C", b"D", b"E"]
    chains += p.device.pop_many(100)
    assert len(chains) == 8
    assert p.device.pop_many(4) == []
    assert p.device.in_flight == 8
    done = list(reversed(chains))
    p.device.add_used_many((c.head, c.write(c.read().lower())) for c in done)
    assert p.device.publish_used()
    assert not p.device.publish_used()
    got = p.driver.get_used_many(3)
    got += p.driver.get_used_many()
    assert [t for t, _ in got] == list(reversed(tokens))
    assert [p.complete(t, n) for t, n in got] == [bytes([97 + i]) for i in reversed(range(8))]
    assert p.driver.get_used() is None


@pytest.mark.parametrize("event_idx", [False, True])
def test_wrap_around_16_bit_indices(event_idx: bool) -> None:
    """More than 65536 requests through an 8-entry ring: every index wraps."""
    p = RingPair(8, event_idx=event_idx)
    d, v = p.driver, p.device
    addr = p.pool.alloc(8)
    seg = [(addr, 4)]
    total = 0
    for batch in range(65536 // 8 + 10):
        base = batch * 8
        heads = [d.add((), seg, base + k) for k in range(8)]  # fills the ring
        d.publish()
        chains = v.pop_many()
        assert [c.head for c in chains] == heads
        v.add_used_many((c.head, 4) for c in chains)
        v.publish_used()
        assert d.get_used_many() == [(base + k, 4) for k in range(8)]
        total += 8
    assert total > 65536
    assert p.avail_idx == p.used_idx == total & 0xFFFF
    assert v.next_avail == total & 0xFFFF
    assert d.num_free == 8
    assert d.outstanding == 0
    rt = p.request((b"after",), (8,))
    assert rt.response == b"AFTER"


# ---------------------------------------------------------------------------
# notification (kick) decisions


def test_kick_without_event_idx() -> None:
    p = RingPair(8)
    assert not p.driver.publish()  # nothing to publish
    p.add((b"a",), ())
    assert p.driver.publish()
    p.device.disable_notifications()
    assert p.used_flags == RingFlag.NO_NOTIFY
    p.add((b"b",), ())
    assert not p.driver.publish()  # device said NO_NOTIFY
    assert p.device.enable_notifications()  # buffers arrived while disabled
    assert p.used_flags == 0
    assert p.device.pop_many(8)
    assert not p.device.enable_notifications()  # nothing pending: safe to sleep
    p.add((b"c",), ())
    assert p.driver.publish()


def test_kick_with_event_idx() -> None:
    p = RingPair(8, event_idx=True)
    p.add((b"a",), ())
    assert p.driver.publish()  # avail_event 0 in (0, 1]
    p.add((b"b",), ())
    assert not p.driver.publish()  # device has not caught up: already kicked
    assert len(p.device.pop_many(8)) == 2
    assert p.avail_event == 2  # pop keeps avail_event at what it consumed
    p.add((b"c",), ())
    assert p.driver.publish()
    # Disabling with EVENT_IDX never writes the flag: avail_event goes stale.
    p.device.disable_notifications()
    assert p.used_flags == 0
    assert p.device.pop() is not None
    assert p.avail_event == 2  # not moved while disabled
    p.add((b"d",), ())
    assert not p.driver.publish()  # 2 not in (3, 4]
    assert p.device.enable_notifications()  # and it re-checks: d is pending
    assert p.avail_event == 3
    assert p.device.pop() is not None
    assert not p.device.enable_notifications()
    p.add((b"e",), ())
    assert p.driver.publish()


def test_kick_with_event_idx_batches_within_one_kick() -> None:
    p = RingPair(8, event_idx=True)
    kicks = []
    for i in range(4):
        p.add((bytes([i + 1]),), ())
        kicks.append(p.driver.publish())
    assert kicks == [True, False, False, False]


def test_disable_notifications_event_idx_allows_at_most_one_more_kick() -> None:
    """With EVENT_IDX, disabling is a stale ``avail_event`` (as vhost_disable_notify)."""
    p = RingPair(8, event_idx=True)
    p.device.disable_notifications()
    kicks = []
    for i in range(4):
        p.add((bytes([i + 1]),), ())
        kicks.append(p.driver.publish())
    assert kicks == [True, False, False, False]


# ---------------------------------------------------------------------------
# interrupt decisions


def _popped(p: RingPair, n: int) -> list[Chain]:
    for _ in range(n):
        p.add((), (1,))
    p.driver.publish()
    chains = p.device.pop_many(n)
    assert len(chains) == n
    return chains


def test_interrupt_without_event_idx() -> None:
    p = RingPair(8)
    chains = _popped(p, 4)
    assert not p.device.publish_used()  # nothing staged
    assert p.device.push_used(chains[0].head, 1)
    p.driver.disable_interrupts()
    assert p.avail_flags == RingFlag.NO_INTERRUPT
    assert not p.device.push_used(chains[1].head, 1)
    assert len(p.driver.get_used_many()) == 2
    assert not p.driver.enable_interrupts()  # drained: nothing pending
    assert p.avail_flags == 0
    p.driver.disable_interrupts()
    assert not p.device.push_used(chains[2].head, 1)
    assert p.driver.enable_interrupts()  # completion arrived while disabled
    assert p.driver.get_used() is not None
    assert p.device.push_used(chains[3].head, 1)


def test_interrupt_with_event_idx() -> None:
    p = RingPair(8, event_idx=True)
    chains = _popped(p, 6)
    assert p.device.push_used(chains[0].head, 1)  # used_event 0 in (0, 1]
    assert not p.device.push_used(chains[1].head, 1)  # driver has not looked yet
    assert p.driver.get_used() is not None
    assert p.used_event == 1  # get_used moves used_event while enabled
    assert p.driver.get_used() is not None
    assert p.used_event == 2
    assert p.driver.get_used() is None
    assert p.device.push_used(chains[2].head, 1)
    p.driver.disable_interrupts()
    assert p.avail_flags == 0  # EVENT_IDX: no flag, used_event lags instead
    assert p.driver.get_used() is not None
    assert p.used_event == 2  # not moved while disabled
    assert not p.device.push_used(chains[3].head, 1)  # 2 not in (3, 4]
    assert p.driver.enable_interrupts()
    assert p.used_event == 3
    assert p.driver.get_used() is not None
    assert not p.driver.enable_interrupts()
    assert p.used_event == 4
    p.device.add_used(chains[4].head, 1)
    p.device.add_used(chains[5].head, 1)
    assert p.device.publish_used()  # 4 in (4, 6]


def test_enable_interrupts_event_idx_reports_pending() -> None:
    p = RingPair(4, event_idx=True)
    (c,) = _popped(p, 1)
    p.driver.disable_interrupts()
    p.device.push_used(c.head, 1)
    assert p.driver.enable_interrupts()


# ---------------------------------------------------------------------------
# WouldBlock and LocalProtocolError


def test_would_block_when_full(pair: RingPair) -> None:
    tokens = [pair.add((b"x",), (1,) if pair.driver.indirect else ())[0] for _ in range(pair.size)]
    assert pair.driver.num_free == 0
    with pytest.raises(WouldBlock):
        pair.add((b"y",), ())
    pair.driver.publish()
    c = pair.device.pop()
    assert c is not None
    pair.device.push_used(c.head, 0)
    assert pair.driver.get_used() == (tokens[0], 0)
    pair.add((b"y",), ())


def test_would_block_when_chain_needs_more_than_free() -> None:
    p = RingPair(4)
    p.add((b"a", b"b"), (1,))
    with pytest.raises(WouldBlock):
        p.add((b"a",), (1,))
    assert p.driver.num_free == 1
    p.add((b"a",), ())


def test_chain_longer_than_queue_is_a_local_error() -> None:
    p = RingPair(4)
    with pytest.raises(LocalProtocolError):
        p.add((b"a", b"b", b"c"), (1, 1))


def test_driver_never_writes_indirect_table_longer_than_queue() -> None:
    p = RingPair(2, indirect=True, indirect_max=4)
    try:
        p.add((b"a", b"b", b"c"), ())
    except LocalProtocolError:
        return  # refusing is fine
    p.driver.publish()
    assert p.device.pop() is not None  # raises RingError(INDIRECT_TOO_LONG)


def test_pop_before_activate() -> None:
    p = RingPair(4, activate=False)
    p.add((b"a",), ())
    p.driver.publish()
    with pytest.raises(LocalProtocolError):
        p.device.pop()
    assert not p.device.broken
    p.device.activate()
    assert p.device.pop() is not None


def test_add_used_misuse() -> None:
    p = RingPair(4)
    (c,) = _popped(p, 1)
    for head in (-1, 4, 1000, (c.head + 1) % 4):
        with pytest.raises(LocalProtocolError):
            p.device.add_used(head, 0)
    for length in (-1, 1 << 32):
        with pytest.raises(LocalProtocolError):
            p.device.add_used(c.head, length)
    p.device.add_used(c.head, (1 << 32) - 1)
    with pytest.raises(LocalProtocolError):
        p.device.add_used(c.head, 0)  # already pushed
    assert not p.device.broken


def test_add_misuse() -> None:
    p = RingPair(4)
    addr = p.pool.alloc(16)
    with pytest.raises(LocalProtocolError):
        p.driver.add([(addr, 1)], [], None)
    with pytest.raises(LocalProtocolError):
        p.driver.add([], [], 1)
    with pytest.raises(LocalProtocolError):
        p.driver.add([(addr, 0)], [], 1)
    with pytest.raises(LocalProtocolError):
        p.driver.add([(addr, 1)], [(addr, 0)], 1)
    with pytest.raises(LocalProtocolError):
        p.driver.add([(addr, 1)], [(addr, -4)], 1)
    with pytest.raises(LocalProtocolError):
        p.driver.add([(addr, 0xFFFFFFFF)], [(addr, 1)], 1)  # 2^32 bytes in all
    assert p.driver.num_free == 4
    assert p.driver.outstanding == 0
    assert not p.driver.broken


# ---------------------------------------------------------------------------
# Chain


def _chain(readable: list[bytes], writable: list[int]) -> Chain:
    r = [memoryview(bytearray(b)) for b in readable]
    w = [memoryview(bytearray(n)) for n in writable]
    return Chain(
        0,
        r,
        w,
        sum(map(len, readable)),
        sum(writable),
        [(0, len(b), False) for b in readable] + [(0, n, True) for n in writable],
    )


def test_chain_read() -> None:
    assert _chain([b"one"], []).read() == b"one"
    assert _chain([b"one", b"two"], []).read() == b"onetwo"
    assert _chain([], [3]).read() == b""


@pytest.mark.parametrize(
    ("offset", "room", "expected"),
    [
        (0, 20, b"abcdefghi"),
        (0, 4, b"abcd"),
        (2, 3, b"cde"),
        (3, 100, b"defghi"),  # skips the first segment entirely
        (5, 2, b"fg"),
        (9, 5, b""),  # offset at the end
        (50, 5, b""),
        (0, 0, b""),
    ],
)
def test_chain_read_into(offset: int, room: int, expected: bytes) -> None:
    c = _chain([b"abc", b"def", b"ghi"], [])
    dst = bytearray(room)
    n = c.read_into(memoryview(dst), offset)
    assert n == len(expected)
    assert bytes(dst[:n]) == expected


@pytest.mark.parametrize(
    ("data", "offset", "expected_n", "expected"),
    [
        (b"123456", 0, 6, [b"123", b"456", b"\0\0"]),
        (b"12345678", 0, 8, [b"123", b"456", b"78"]),
        (b"123456789", 0, 8, [b"123", b"456", b"78"]),  # truncated
        (b"xy", 3, 2, [b"\0\0\0", b"xy\0", b"\0\0"]),  # skips a segment
        (b"xyz", 5, 3, [b"\0\0\0", b"\0\0x", b"yz"]),
        (b"xyz", 8, 0, [b"\0\0\0", b"\0\0\0", b"\0\0"]),
        (b"", 0, 0, [b"\0\0\0", b"\0\0\0", b"\0\0"]),
    ],
)
def test_chain_write(data: bytes, offset: int, expected_n: int, expected: list[bytes]) -> None:
    c = _chain([], [3, 3, 2])
    assert c.write(data, offset) == expected_n
    assert [bytes(s) for s in c.writable] == expected


def test_chain_write_accepts_typed_memoryview() -> None:
    c = _chain([], [4])
    assert c.write(memoryview(bytearray(b"\x01\x00\x02\x00")).cast("H")) == 4
    assert bytes(c.writable[0]) == b"\x01\x00\x02\x00"


def test_driver_reset_clears_broken_latch() -> None:
    p = RingPair(8)
    p.set_used_idx(5)
    with pytest.raises(RingError):
        p.driver.get_used()
    p.reset()
    assert not p.driver.broken
    assert p.driver.num_free == 8
    assert p.request().response == b"PING"


# ---------------------------------------------------------------------------
# save / restore


def test_save_restore_continues_seamlessly(flags: tuple[bool, bool]) -> None:
    event_idx, indirect = flags
    p = RingPair(16, event_idx=event_idx, indirect=indirect)
    tokens = [p.add((bytes([65 + i]), b"-"), (4,))[0] for i in range(5)]
    p.driver.publish()
    chains = p.device.pop_many(3)
    p.device.push_used(chains[1].head, chains[1].write(b"done"))
    p.device.disable_notifications()
    state = p.device.save()
    assert state.next_avail == 3
    assert state.next_used == 1
    assert sorted(state.inflight) == sorted([chains[0].head, chains[2].head])
    assert state.ready
    assert not state.notify_enabled
    assert state.event_idx is event_idx
    assert state.indirect is indirect

    q = DeviceQueue.restore(p.mem, state)
    assert q.save() == state
    assert q.in_flight == 2
    assert q.next_avail == 3
    # the old in-flight chains complete on the new queue
    q.add_used(chains[0].head, 0)
    q.add_used(chains[2].head, 0)
    with pytest.raises(LocalProtocolError):
        q.add_used(chains[1].head, 0)  # completed before the move
    q.publish_used()
    rest = q.pop_many(8)
    assert [c.read() for c in rest] == [b"D-", b"E-"]
    q.add_used_many((c.head, c.write(b"ok")) for c in rest)
    q.publish_used()
    got = dict(p.driver.get_used_many())
    assert set(got) == set(tokens)
    assert got[tokens[1]] == 4
    assert p.complete(tokens[1], 4) == b"done"
    assert got[tokens[3]] == 2
    assert q.enable_notifications() is False


def test_restore_passes_kwargs_and_revalidates_layout() -> None:
    p = RingPair(8)
    state = p.device.save()
    q = DeviceQueue.restore(p.mem, state, require_writable=True)
    assert q.require_writable
    with pytest.raises(RingError) as exc:
        DeviceQueue.restore(p.mem, state, max_size=4)
    assert exc.value.fault is RingFault.BAD_SIZE
    with pytest.raises(RingError) as exc:
        DeviceQueue.restore(FlatMemory(0x1800), state)
    assert exc.value.fault is RingFault.RING_OUT_OF_MEMORY


@pytest.mark.parametrize(
    "change",
    [
        {"inflight": (1,)},  # count does not add up (0 in flight)
        {"next_avail": 2, "next_used": 0, "inflight": (1,)},
        {"next_avail": 1, "next_used": 0, "inflight": (8,)},  # head out of range
        {"next_avail": 1, "next_used": 0, "inflight": (-1,)},
        {"next_avail": 0, "next_used": 0xFFFF, "inflight": ()},  # wrapped: 1 in flight
    ],
)
def test_restore_refuses_inconsistent_state(change: dict[str, object]) -> None:
    p = RingPair(8)
    state = dataclasses.replace(p.device.save(), **change)  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        DeviceQueue.restore(p.mem, state)


def test_restore_wrapped_indices() -> None:
    p = RingPair(8)
    state = QueueState(
        layout=p.layout,
        next_avail=1,
        next_used=0xFFFF,
        event_idx=False,
        indirect=False,
        ready=True,
        inflight=(3, 5),
    )
    q = DeviceQueue.restore(p.mem, state)
    assert q.in_flight == 2
    assert q.save() == dataclasses.replace(state, published_used=0xFFFF)


def test_restore_refuses_duplicate_inflight_heads() -> None:
    p = RingPair(8)
    state = dataclasses.replace(p.device.save(), next_avail=2, next_used=0, inflight=(3, 3))
    with pytest.raises(LocalProtocolError):
        DeviceQueue.restore(p.mem, state)


def test_restore_keeps_staged_used_entries() -> None:
    p = RingPair(8)
    token, _ = p.add((b"a",), (1,))
    p.driver.publish()
    c = p.device.pop()
    assert c is not None
    p.device.add_used(c.head, 1)  # staged, not published
    q = DeviceQueue.restore(p.mem, p.device.save())
    q.publish_used()
    assert p.driver.get_used() == (token, 1)


# ---------------------------------------------------------------------------
# reset


def test_device_reset() -> None:
    p = RingPair(8)
    _popped(p, 3)
    p.device.disable_notifications()
    p.device.reset()
    assert p.device.in_flight == 0
    assert p.device.next_avail == 0
    assert not p.device.ready
    assert p.device.notify_enabled
    assert not p.device.broken
    with pytest.raises(LocalProtocolError):
        p.device.pop()


def test_device_reset_clears_broken_latch() -> None:
    h = HostileDriver(4)
    h.desc(0, h.DATA, 0)
    h.offer(0)
    with pytest.raises(RingError):
        h.q.pop()
    assert h.q.errors == 1
    h.q.reset()
    assert not h.q.broken
    h.q.activate()
    h.desc(0, h.DATA, 4)
    h.idx = 0
    h.offer(0)
    c = h.q.pop()
    assert c is not None
    assert c.readable_len == 4


def test_driver_reset() -> None:
    p = RingPair(8, event_idx=False)
    for _ in range(3):
        p.add((b"ab",), (2,))
    p.driver.publish()
    p.driver.disable_interrupts()
    p.driver.reset()
    assert p.driver.num_free == 8
    assert p.driver.outstanding == 0
    assert p.driver.interrupts_enabled
    assert p.avail_idx == 0
    assert p.avail_flags == 0
    assert bytes(p.raw()[p.layout.desc : p.layout.desc + p.layout.desc_bytes]) == bytes(128)


@pytest.mark.parametrize("flags", [(False, False), (True, False)], ids=["plain", "event_idx"])
def test_reset_both_sides_then_continue(flags: tuple[bool, bool]) -> None:
    """With the ring memory re-initialised (as Linux does), a reset pair works again."""
    p = RingPair(4, event_idx=flags[0])
    for _ in range(6):
        p.request()
    p.device.disable_notifications()
    p.driver.disable_interrupts()
    p.reset()
    rt = p.request()
    assert rt.kick
    assert rt.interrupt


def test_reset_both_sides_without_scrubbing_memory() -> None:
    p = RingPair(4)
    for _ in range(3):
        p.request()
    p.driver.reset()
    p.device.reset()
    p.device.activate()
    assert p.driver.get_used() is None


def test_device_reset_clears_no_notify_flag() -> None:
    p = RingPair(4)
    p.device.disable_notifications()
    p.device.reset()
    p.device.activate()
    p.add((b"a",), ())
    assert p.driver.publish()


def test_driver_reset_clears_used_event() -> None:
    p = RingPair(4, event_idx=True)
    for _ in range(3):
        p.request()
    assert p.used_event == 3
    p.driver.reset()
    p.device.reset()
    # scrub what the device owns, so only the driver's stale used_event remains
    raw = p.raw()
    raw[p.layout.used : p.layout.used + p.layout.used_bytes] = bytes(p.layout.used_bytes)
    p.device.activate()
    assert p.request().interrupt


def test_size_one_ring() -> None:
    p = RingPair(1, event_idx=True)
    for i in range(5):
        token, head = p.add((bytes([i + 1]),), ())
        assert head == 0
        with pytest.raises(WouldBlock):
            p.add((b"x",), ())
        p.driver.publish()
        c = p.device.pop()
        assert c is not None
        assert c.read() == bytes([i + 1])
        p.device.push_used(c.head, 0)
        assert p.driver.get_used() == (token, 0)
        p.release(token)


def test_add_used_many_misuse_keeps_earlier_entries() -> None:
    p = RingPair(4)
    a, b = _popped(p, 2)
    with pytest.raises(LocalProtocolError):
        p.device.add_used_many([(a.head, 1), (b.head + 100, 1)])
    assert p.device.in_flight == 1  # the first entry was staged
    with pytest.raises(LocalProtocolError):
        p.device.add_used_many([(b.head, 1 << 32)])
    with pytest.raises(LocalProtocolError):
        p.device.add_used_many([(a.head, 1)])  # already staged
    p.device.add_used_many([(b.head, 1)])
    assert p.device.publish_used()
    assert len(p.driver.get_used_many()) == 2
    assert not p.device.broken


def test_check_usable_passes_on_an_active_queue() -> None:
    p = RingPair(4)
    p.device._check_usable()  # neither broken nor inactive: no error
    p.device.reset()
    with pytest.raises(LocalProtocolError):
        p.device._check_usable()


# -- get_used_many: the batched completion path ---------------------------------
def _ring(size: int = 8) -> tuple[FlatMemory, DriverQueue[int], DeviceQueue]:
    mem = FlatMemory(1 << 16)
    layout = SplitLayout.contiguous(0, size)
    drv: DriverQueue[int] = DriverQueue(mem, layout, 0)
    dev = DeviceQueue(mem, layout, 0)
    dev.activate()
    return mem, drv, dev


def test_get_used_many_mixes_long_chains_into_the_batch() -> None:
    _, drv, dev = _ring()
    drv.add([(0x8000, 8)], [], 1)
    drv.add([(0x8000, 8)], [(0x9000, 16), (0x9100, 16)], 2)  # three descriptors
    drv.add([], [(0x9200, 4)], 3)
    drv.publish()
    for c in dev.pop_many():
        dev.add_used(c.head, c.writable_len + 100)  # lengths are clamped
    dev.publish_used()
    assert drv.get_used_many() == [(1, 0), (2, 32), (3, 4)]
    assert drv.num_free == 8


def test_get_used_many_with_unpublished_chains_pending() -> None:
    _, drv, dev = _ring()
    drv.add([(0x8000, 8)], [], 1)
    drv.publish()
    (c,) = dev.pop_many()
    dev.push_used(c.head, 0)
    drv.add([(0x8000, 8)], [], 2)  # added, not published
    assert drv.get_used_many() == [(1, 0)]
    assert drv.outstanding == 1


def test_get_used_many_refuses_a_hostile_id_mid_batch() -> None:
    mem, drv, dev = _ring()
    for t in (1, 2):
        drv.add([(0x8000, 8)], [], t)
    drv.publish()
    for c in dev.pop_many():
        dev.add_used(c.head, 0)
    dev.publish_used()
    used = drv.layout.used
    mem.raw()[used + 4 + 8 : used + 8 + 8] = (7).to_bytes(4, "little")  # second id: never added
    with pytest.raises(RingError) as e:
        drv.get_used_many()
    assert e.value.fault is RingFault.USED_ID_NOT_HEAD
    assert drv.broken
    with pytest.raises(QueueBroken):
        drv.get_used_many()


def test_get_used_many_refuses_a_used_index_jump() -> None:
    mem, drv, _ = _ring()
    drv.add([(0x8000, 8)], [], 1)
    drv.publish()
    used = drv.layout.used
    mem.raw()[used + 2 : used + 4] = (5).to_bytes(2, "little")
    with pytest.raises(RingError) as e:
        drv.get_used_many()
    assert e.value.fault is RingFault.USED_IDX_JUMP


# -- slice_segments: the one walk over a scatter list -----------------------------
def test_slice_segments_takes_views_across_buffers() -> None:
    bufs = [memoryview(bytearray(b"abc")), memoryview(bytearray(b"defg")), memoryview(b"hi")]
    assert [bytes(v) for v in slice_segments(bufs, 2, 4)] == [b"c", b"def"]
    assert [bytes(v) for v in slice_segments(bufs, 7, 10)] == [b"hi"]  # list ends first
    assert slice_segments(bufs, 9, 1) == []  # start past the end
    assert slice_segments(bufs, 0, 0) == []
    out = slice_segments(bufs, 3, 2)
    out[0][:] = b"XY"  # views, not copies
    assert bytes(bufs[1]) == b"XYfg"


def test_gather_and_scatter_cross_buffer_boundaries() -> None:
    bufs = [memoryview(bytearray(3)), memoryview(bytearray(4)), memoryview(bytearray(2))]
    assert scatter_segments(bufs, b"abcdefghij", 1) == 8  # list ends first
    assert [bytes(b) for b in bufs] == [b"\0ab", b"cdef", b"gh"]
    dst = memoryview(bytearray(5))
    assert gather_segments(bufs, dst, 2) == 5
    assert bytes(dst) == b"bcdef"
    assert gather_segments(bufs, memoryview(bytearray(4)), 8) == 1  # past the end: what is left
