"""The packed ring core (virtio 1.2 §2.8): driver and device over one memory.

Round trips across feature sets, sizes (not only powers of two) and many
wraps; the bytes each side writes (wrap bits, ids, deferred heads, indirect
tables); out-of-order completion with list-length skips; event suppression
on both sides; misuse by the caller. The hostile-peer cases are in
``test_packed_rejects.py``, the model and fuzz tests in
``test_packed_hypothesis.py``.
"""

from __future__ import annotations

import struct

import pytest

from tests.virtio.packed_pair import AVAIL, USED, PackedPair
from virtio import layouts as L
from virtio.constants import Feature, PackedDescFlag, PackedEventFlag
from virtio.errors import LocalProtocolError, WouldBlock
from virtio.memory import FlatMemory
from virtio.packed import (
    DeviceQueue,
    DriverQueue,
    PackedLayout,
    QueueBroken,
    event_word,
    packed_need_event,
)

NEXT = int(PackedDescFlag.NEXT)
WRITE = int(PackedDescFlag.WRITE)
INDIRECT = int(PackedDescFlag.INDIRECT)
ENABLE = int(PackedEventFlag.ENABLE)
DISABLE = int(PackedEventFlag.DISABLE)
DESC = int(PackedEventFlag.DESC)


@pytest.fixture(params=[1, 3, 4, 5])
def psize(request: pytest.FixtureRequest) -> int:
    return request.param


# --- layouts: the struct twins against the construct declarations -----------


def test_body_twins_match_construct() -> None:
    flags_at = L.field_offset(L.PackedDesc, "flags")
    assert L.PACKED_DESC_BODY_STRUCT.size == flags_at == 14
    data = L.PackedDesc.build({"addr": 1 << 40, "len": 77, "id": 5, "flags": 0xFFFF})
    assert L.PACKED_DESC_BODY_STRUCT.unpack_from(data) == (1 << 40, 77, 5)
    at = L.field_offset(L.PackedDesc, "len")
    assert at == 8
    assert L.field_offset(L.PackedDesc, "id") == at + 4
    assert L.PACKED_USED_STRUCT.unpack_from(data, at) == (77, 5)


def test_event_word_matches_construct() -> None:
    word = event_word(DESC, 0x1234, 1)
    parsed = L.PackedEvent.parse(struct.pack("<I", word))
    assert parsed.off_wrap == 0x9234
    assert parsed.flags == DESC


# --- round trips ---------------------------------------------------------------


def test_round_trips_wrap_many_times(flags: tuple[bool, bool], psize: int) -> None:
    event_idx, indirect = flags
    p = PackedPair(psize, event_idx=event_idx, indirect=indirect, indirect_max=min(3, psize))
    shapes = [([b"ab"], [4]), ([b"a", b"bc"], [3]), ([b"abc"], []), ([], [5])]
    for i in range(4 * psize + 3):
        r, w = shapes[i % len(shapes)]
        if len(r) + len(w) > psize:
            r, w = [b"xy"], []
        kick, irq, chain, data = p.request(r, w)
        assert kick
        assert irq
        assert chain.read() == b"".join(r)
        assert data == b"".join(r).upper()[: sum(w)]
        assert p.driver.num_free == psize
        assert p.driver.outstanding == 0
        assert p.device.in_flight == 0


def test_driver_writes_consecutive_slots_with_wrap_bits_and_defers_the_head() -> None:
    p = PackedPair(3)
    _, bid = p.add([b"ab", b"cd"], [4])
    # the tail is written with lap-1 bits, the head not yet
    assert p.read_desc(0)[3] == 0
    assert p.read_desc(1)[2:] == (bid, NEXT | AVAIL)
    assert p.read_desc(2)[2:] == (bid, WRITE | AVAIL)
    assert p.device.pop() is None
    assert p.device.pending() == 0
    p.driver.publish()
    assert p.read_desc(0)[2:] == (bid, NEXT | AVAIL)
    assert p.device.pending() == 1
    chain = p.device.pop()
    assert chain is not None
    assert [s[1:] for s in chain.segments] == [(2, False), (2, False), (4, True)]
    p.device.push_used(chain.head, 4)
    # one used descriptor for the list; WRITE: the device wrote data (§2.8.3)
    assert p.read_desc(0)[1:] == (4, bid, AVAIL | USED | WRITE)
    assert p.driver.get_used() is not None
    # the next list starts at slot 0 of lap 0: AVAIL clear, USED set
    _, bid2 = p.add([b"x"], [])
    p.driver.publish()
    assert p.read_desc(0)[2:] == (bid2, USED)
    chain = p.device.pop()
    assert chain is not None
    p.device.push_used(chain.head, 0)
    assert p.read_desc(0)[3] == 0  # lap-0 used: both clear, and nothing written
    assert p.driver.get_used() is not None


def test_indirect_list_takes_one_slot() -> None:
    p = PackedPair(4, indirect=True, indirect_max=3)
    _, bid = p.add([b"ab", b"cd"], [4])
    p.driver.publish()
    addr, length, id_, flags = p.read_desc(0)
    assert (length, id_, flags) == (48, bid, INDIRECT | AVAIL)
    assert addr == p.indirect_area + bid * 3 * 16
    table = [L.PACKED_DESC_STRUCT.unpack_from(p.raw(), addr + 16 * i) for i in range(3)]
    assert [t[3] for t in table] == [0, 0, WRITE]  # §2.8.7: only WRITE in a table
    assert p.driver.num_free == 3
    chain = p.device.pop()
    assert chain is not None
    assert chain.read() == b"abcd"
    assert chain.writable_len == 4
    p.device.push_used(chain.head, 4)
    assert p.driver.get_used() == (1, 4)
    # one buffer or more than indirect_max buffers: direct
    p.add([b"a"] * 4, [])
    assert p.driver.num_free == 0


def test_out_of_order_completion_skips_by_list_length() -> None:
    p = PackedPair(6)
    ta, a = p.add([b"a1", b"a2"], [2])  # slots 0-2
    tb, b = p.add([b"b"], [])  # slot 3
    tc, c = p.add([b"c"], [1])  # slots 4-5
    p.driver.publish()
    chains = {ch.head: ch for ch in p.device.pop_many()}
    assert set(chains) == {a, b, c}
    assert p.device.in_flight == 3
    p.device.add_used(c, 1)  # written at slot 0, then the used slot moves by 2
    p.device.add_used(a, 2)  # at slot 2, moves by 3
    assert p.device.publish_used()
    p.device.push_used(b, 0)  # at slot 5, moves by 1: back to slot 0, lap 0
    assert p.read_desc(0)[1:3] == (1, c)
    assert p.read_desc(2)[1:3] == (2, a)
    assert p.read_desc(5)[1:3] == (0, b)
    assert p.driver.get_used_many() == [(tc, 1), (ta, 2), (tb, 0)]
    assert p.driver.num_free == 6
    # the ring keeps working in lap 0
    for _ in range(8):
        p.request([b"zz"], [2])


def test_length_is_clamped_to_the_writable_size() -> None:
    p = PackedPair(4)
    token, bid = p.add([b"q"], [3])
    p.driver.publish()
    chain = p.device.pop()
    assert chain is not None
    p.device.push_used(bid, 1000)
    assert p.driver.get_used() == (token, 3)


def test_non_power_of_two_ring_and_ids_reused() -> None:
    p = PackedPair(5)
    seen = set()
    for _ in range(12):
        seen.add(p.request([b"x"], [1])[2].head)
    assert seen == {0}  # the free-id stack hands the returned id out again
    tokens = [p.add([b"x"], [])[0] for _ in range(5)]
    with pytest.raises(WouldBlock):
        p.add([b"y"], [])
    p.driver.publish()
    assert sorted(c.head for c in p.device.pop_many()) == [0, 1, 2, 3, 4]
    assert p.device.pop_many() == []
    assert tokens


def test_pending_scan_stops_at_the_slots_in_flight() -> None:
    p = PackedPair(3)
    for _ in range(3):
        p.add([b"x"], [])
    p.driver.publish()
    assert p.device.pending() == 3  # the whole ring is available
    assert p.device.pop() is not None
    assert p.device.pending() == 2  # bounded by the two slots not in flight


def test_pop_many_limit_and_add_used_many() -> None:
    p = PackedPair(4)
    for _ in range(3):
        p.add([b"x"], [])
    p.driver.publish()
    assert len(p.device.pop_many(2)) == 2
    assert p.device.pending() == 1
    assert len(p.device.pop_many(5)) == 1
    p.device.add_used_many([(0, 0), (2, 0), (1, 0)])
    assert p.device.publish_used()
    assert [t for t, _ in p.driver.get_used_many(2)] == [1, 3]
    assert [t for t, _ in p.driver.get_used_many()] == [2]
    assert p.driver.get_used_many() == []


# --- event suppression ---------------------------------------------------------


def test_driver_kick_follows_the_device_event_word() -> None:
    p = PackedPair(4)
    p.device.disable_notifications()
    assert p.device_event == event_word(DISABLE)
    p.add([b"x"], [])
    assert not p.driver.publish()
    assert p.device.enable_notifications()  # a list arrived while disabled
    assert p.device_event == ENABLE
    p.add([b"y"], [])
    assert p.driver.publish()
    assert not p.driver.publish()  # nothing new: no kick


def test_event_idx_kick_and_interrupt_positions() -> None:
    p = PackedPair(4, event_idx=True)
    assert p.device_event == event_word(DESC, 0, 1)
    assert p.driver_event == event_word(DESC, 0, 1)
    p.add([b"x"], [1])  # slots 0-1
    assert p.driver.publish()  # slot 0, lap 1 was asked for
    p.add([b"y"], [1])  # slots 2-3
    assert not p.driver.publish()  # the device has not popped: it still asks for slot 0
    c1 = p.device.pop()
    assert p.device_event == event_word(DESC, 2, 1)
    c2 = p.device.pop()
    assert p.device_event == event_word(DESC, 0, 0)  # wrapped: slot 0 of lap 0
    assert c1 is not None
    assert c2 is not None
    assert p.device.push_used(c1.head, 1)  # the driver asked for slot 0
    assert not p.device.push_used(c2.head, 1)  # ... and has not read it yet
    assert p.driver.get_used() is not None
    assert p.driver_event == event_word(DESC, 2, 1)
    assert p.driver.get_used() is not None
    assert p.driver_event == event_word(DESC, 0, 0)
    p.driver.disable_interrupts()
    assert p.driver_event == event_word(DISABLE)
    kick, irq, _, _ = p.request([b"z"], [1])  # slots 0-1 of lap 0
    assert kick
    assert not irq  # interrupts disabled
    assert p.driver_event == event_word(DISABLE)  # get_used leaves DISABLE alone
    assert not p.driver.enable_interrupts()
    assert p.driver_event == event_word(DESC, 2, 0)
    p.device.disable_notifications()
    p.add([b"w"], [1])  # slots 2-3 of lap 0
    assert not p.driver.publish()
    assert p.device.pop() is not None
    assert p.device_event == event_word(DISABLE)  # pop keeps DISABLE while disabled
    assert not p.device.enable_notifications()
    assert p.device_event == event_word(DESC, 0, 1)  # wrapped again: slot 0 of lap 1


def test_enable_interrupts_reports_pending_completions(flags: tuple[bool, bool]) -> None:
    p = PackedPair(4, event_idx=flags[0], indirect=flags[1])
    p.driver.disable_interrupts()
    p.add([b"x"], [1])
    p.driver.publish()
    c = p.device.pop()
    assert c is not None
    assert not p.device.push_used(c.head, 1)
    assert p.driver.enable_interrupts()
    assert p.driver.get_used() is not None
    assert not p.driver.enable_interrupts()


@pytest.mark.parametrize(
    ("word", "wrap", "new", "old", "want"),
    [
        (event_word(ENABLE), 1, 1, 0, True),
        (event_word(DISABLE), 1, 1, 0, False),
        (event_word(DESC, 0, 1), 1, 1, 0, True),  # slot 0 of this lap was just moved
        (event_word(DESC, 1, 1), 1, 1, 0, False),  # slot 1 not yet
        (event_word(DESC, 3, 1), 0, 1, -1, True),  # slot 3 of the last lap, batch wrapped
        (event_word(DESC, 0, 0), 0, 1, -1, True),  # slot 0 of this lap, same batch
        (event_word(DESC, 1, 0), 0, 1, -1, False),
        (event_word(DESC, 0, 1), 0, 0, -4, True),  # the whole last lap in one batch
        (event_word(DESC, 0, 0), 0, 0, -4, False),  # slot 0 of this lap: not yet
        (event_word(DESC, 2, 0), 0, 0, -4, False),  # in this lap, not yet reached
    ],
)
def test_packed_need_event(word: int, wrap: int, new: int, old: int, want: bool) -> None:
    assert packed_need_event(word, 4, wrap, new, old) is want


# --- caller mistakes and lifecycle ----------------------------------------------


def test_driver_misuse() -> None:
    p = PackedPair(2)
    d = p.driver
    for r, w, token in (
        ([], [], 1),
        ([(0x100, 0)], [], 1),
        ([], [(0x100, -1)], 1),
        ([(0x100, 1)] * 3, [], 1),
        ([(0x100, 1 << 31), (0x200, 1 << 31)], [], 1),
        ([(0x100, 1)], [], None),
    ):
        with pytest.raises(LocalProtocolError):
            d.add(r, w, token)  # type: ignore[arg-type]
    d.add([(0x100, 1)], [(0x200, 1)], 1)
    with pytest.raises(WouldBlock):
        d.add([(0x100, 1)], [], 2)
    assert d.num_free == 0
    assert d.outstanding == 1


def test_driver_construction_errors() -> None:
    mem = FlatMemory(0x4000)
    ind = int(Feature.INDIRECT_DESC)
    with pytest.raises(LocalProtocolError):
        DriverQueue(mem, PackedLayout(0, 0x1000, 0x2000, 0x2004), 0)
    with pytest.raises(LocalProtocolError):
        DriverQueue(mem, PackedLayout.contiguous(0x3FF0, 4), 0)
    with pytest.raises(LocalProtocolError):
        DriverQueue(mem, PackedLayout.contiguous(0x1000, 4), ind, indirect_max=-1)
    with pytest.raises(LocalProtocolError):
        DriverQueue(
            mem, PackedLayout.contiguous(0x1000, 4), ind, indirect_area=0x2008, indirect_max=2
        )
    with pytest.raises(LocalProtocolError):
        DriverQueue(
            mem, PackedLayout.contiguous(0x1000, 4), ind, indirect_area=0x3F80, indirect_max=4
        )
    q: DriverQueue[int] = DriverQueue(
        mem, PackedLayout.contiguous(0x1000, 4), ind, indirect_area=0x2000, indirect_max=9
    )
    assert q.indirect
    assert q._ind_max == 4  # clamped to the queue size


def test_add_used_many_refuses_what_add_used_refuses() -> None:
    p = PackedPair(4)
    for _ in range(2):
        p.add([b"x"], [])
    p.driver.publish()
    a, b = p.device.pop_many()
    with pytest.raises(LocalProtocolError):
        p.device.add_used_many([(a.head, 0), (3, 0)])  # 3 is not in flight
    with pytest.raises(LocalProtocolError):
        p.device.add_used_many([(b.head, 1 << 32)])
    p.device.add_used_many([(b.head, 0)])  # the first entry above was staged
    assert p.device.in_flight == 0
    assert p.device.publish_used()
    assert len(p.driver.get_used_many()) == 2


def test_get_used_many_keeps_the_event_at_the_next_used_slot() -> None:
    p = PackedPair(3, event_idx=True)
    p.add([b"x"], [1])  # slots 0-1
    p.add([b"y"], [])  # slot 2
    p.driver.publish()
    p.device.add_used_many([(c.head, 1) for c in p.device.pop_many()])
    assert p.device.publish_used()
    assert len(p.driver.get_used_many()) == 2
    assert p.driver_event == event_word(DESC, 0, 0)  # 3 slots on a ring of 3: lap 0
    assert p.driver.get_used_many() == []


def test_device_misuse() -> None:
    p = PackedPair(4)
    v = p.device
    with pytest.raises(LocalProtocolError):
        v.add_used(0, 0)  # not in flight
    with pytest.raises(LocalProtocolError):
        v.add_used(4, 0)
    p.add([b"x"], [])
    p.driver.publish()
    c = v.pop()
    assert c is not None
    with pytest.raises(LocalProtocolError):
        v.add_used(c.head, 1 << 32)
    with pytest.raises(LocalProtocolError):
        v.add_used(c.head, -1)
    assert not v.publish_used()  # nothing staged
    v.reset()
    with pytest.raises(LocalProtocolError):
        v.pop()  # reset deactivates
    with pytest.raises(LocalProtocolError):
        v.pop_many()


def test_reset_both_sides_after_a_fault() -> None:
    p = PackedPair(3, event_idx=True)
    p.request([b"a", b"b"], [1])
    p.add([b"x"], [])
    p.driver.publish()
    p.write_desc(0, 0, 0, 7, 0)  # used (lap 0) id 7 on a ring of 3
    with pytest.raises(Exception):  # noqa: B017 - the fault itself is tested elsewhere
        p.driver.get_used()
    with pytest.raises(QueueBroken):
        p.driver.add([(0x100, 1)], [], 1)
    p.reset()
    assert not p.driver.broken
    assert p.driver.num_free == 3
    assert p.device.next_avail == 0
    assert p.device.avail_wrap == 1
    assert all(p.read_desc(i) == (0, 0, 0, 0) for i in range(3))
    for _ in range(5):
        p.request([b"q"], [1])


# --- save / restore -------------------------------------------------------------


def test_save_restore_carries_positions_in_flight_and_staged() -> None:
    p = PackedPair(3, event_idx=True)
    for _ in range(2):
        p.request([b"a"], [1])  # wrap the positions off zero
    ta, a = p.add([b"x"], [1])  # 2 slots, wraps around
    tb, _ = p.add([b"z"], [])  # 1 slot: the ring is full
    p.driver.publish()
    ca, cb = p.device.pop_many()
    p.device.add_used(cb.head, 0)  # staged, out of order, not published
    p.device.disable_notifications()
    state = p.device.save()
    assert state.inflight == ((a, 2),)
    assert len(state.staged) == 1
    q = DeviceQueue.restore(p.flat, state)
    assert p.device_event == event_word(DISABLE)
    assert q.in_flight == 1
    assert q.publish_used()
    assert p.driver.get_used() == (tb, 0)
    q.push_used(ca.head, 1)
    assert p.driver.get_used() == (ta, 1)
    p.device = q
    for _ in range(4):
        p.request([b"q"], [1])
    assert q.enable_notifications() is False
    assert p.device_event == event_word(DESC, q.next_avail, q.avail_wrap)


@pytest.mark.parametrize(
    "change",
    [
        {"next_avail": 3},
        {"used_wrap": 2},
        {"inflight": ((0, 1), (0, 1))},
        {"inflight": ((5, 1),)},
        {"inflight": ((0, 0),)},
        {"inflight": ((0, 2),)},  # the positions are 1 slot apart
        {"moved": 4},
        {"staged": ((3, 0),)},
        {"staged": ((0, 0x80),)},
    ],
)
def test_restore_refuses_an_inconsistent_state(change: dict[str, object]) -> None:
    import dataclasses

    p = PackedPair(3)
    p.add([b"x"], [])
    p.driver.publish()
    assert p.device.pop() is not None
    state = dataclasses.replace(p.device.save(), **change)  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        DeviceQueue.restore(p.flat, state)
    assert DeviceQueue.restore(p.flat, p.device.save()).in_flight == 1
