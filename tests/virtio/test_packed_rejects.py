"""The packed ring's reject list: one test per way a hostile peer can break it.

Device side: a hostile driver writes raw descriptors (any AVAIL/USED bits)
and its event word. Driver side: a hostile device writes used descriptors and
its event word. Each test asserts the exact :class:`RingFault`, that the error
is a :class:`~virtio.errors.RemoteProtocolError`, and that the queue is latched
broken (the next call raises :class:`QueueBroken`). docs/ring.md lists them.
"""

from __future__ import annotations

import pytest

from tests.virtio.packed_pair import AVAIL, USED, HostilePackedDriver, PackedPair, avail_bits
from tests.virtio.test_rejects import HugeMemory
from virtio.constants import Feature, PackedDescFlag, PackedEventFlag
from virtio.errors import RemoteProtocolError
from virtio.memory import ADDRESS_LIMIT, FlatMemory
from virtio.packed import (
    DESC_SIZE,
    DeviceQueue,
    PackedLayout,
    QueueBroken,
    RingError,
    RingFault,
    event_word,
)

NEXT = int(PackedDescFlag.NEXT)
WRITE = int(PackedDescFlag.WRITE)
INDIRECT = int(PackedDescFlag.INDIRECT)
IND = int(Feature.INDIRECT_DESC)
EVT = int(Feature.EVENT_IDX)
D = HostilePackedDriver.DATA
T = HostilePackedDriver.TABLE


@pytest.fixture(params=["pop", "pop_many"])
def take(request: pytest.FixtureRequest) -> str:
    """Every device-side case is checked through ``pop()`` and ``pop_many()``."""
    return request.param


def latched(q: DeviceQueue) -> None:
    assert q.broken
    for call in (
        q.pop,
        lambda: q.pop_many(1),
        lambda: q.add_used(0, 0),
        lambda: q.add_used_many([(0, 0)]),
    ):
        with pytest.raises(QueueBroken):
            call()


def expect_fault(h: HostilePackedDriver, take: str, fault: RingFault) -> RingError:
    q = h.q
    call = q.pop if take == "pop" else lambda: q.pop_many(q.size)
    with pytest.raises(RingError) as exc:
        call()
    err = exc.value
    assert err.fault is fault
    assert isinstance(err, RemoteProtocolError)
    assert err.reason == fault.value
    assert str(err).startswith(fault.value)
    assert q.errors == 1
    latched(q)
    return err


# ---------------------------------------------------------------------------
# layout

MEM = FlatMemory(0x10000)


@pytest.mark.parametrize(
    ("layout", "fault"),
    [
        (PackedLayout(0, 0x1000, 0x2000, 0x2004), RingFault.BAD_SIZE),
        (PackedLayout(32769, 0x1000, 0x2000, 0x2004), RingFault.BAD_SIZE),
        (PackedLayout(8, 0x1008, 0x2000, 0x2004), RingFault.MISALIGNED),
        (PackedLayout(8, 0x1000, 0x2002, 0x2004), RingFault.MISALIGNED),
        (PackedLayout(8, 0x1000, 0x2000, 0x2006), RingFault.MISALIGNED),
        (PackedLayout(8, ADDRESS_LIMIT - 64, 0x2000, 0x2004), RingFault.ADDRESS_OVERFLOW),
        (PackedLayout(8, 0x1000, -4, 0x2004), RingFault.ADDRESS_OVERFLOW),
        (PackedLayout(8, 0xFFF0, 0x2000, 0x2004), RingFault.RING_OUT_OF_MEMORY),
        (PackedLayout(8, 0x1000, 0x2000, 0x10000), RingFault.RING_OUT_OF_MEMORY),
    ],
)
def test_reject_layout(layout: PackedLayout, fault: RingFault) -> None:
    with pytest.raises(RingError) as exc:
        DeviceQueue(MEM, layout, 0)
    assert exc.value.fault is fault


def test_reject_size_above_device_max() -> None:
    with pytest.raises(RingError) as exc:
        DeviceQueue(MEM, PackedLayout.contiguous(0x1000, 16), 0, max_size=8)
    assert exc.value.fault is RingFault.BAD_SIZE


# ---------------------------------------------------------------------------
# the list in the ring


def test_reject_list_longer_than_ring(take: str) -> None:
    h = HostilePackedDriver(4)
    for slot in range(4):  # every slot available, every one says NEXT: a loop
        h.desc(slot, D, 8, 0, NEXT | AVAIL)
    expect_fault(h, take, RingFault.CHAIN_TOO_LONG)


def test_reject_list_into_slots_in_flight(take: str) -> None:
    h = HostilePackedDriver(2)
    h.offer(0, [(D, 8, 0)])
    assert h.q.pop() is not None  # id 0 in flight on slot 0
    # a 2-descriptor list at slot 1 (lap 1) and slot 0 (lap 0): slot 0 is not back yet
    h.desc(0, D, 8, 1, avail_bits(0))
    h.desc(1, D, 8, 1, NEXT | avail_bits(1))
    expect_fault(h, take, RingFault.RING_OVERRUN)


@pytest.mark.parametrize("bits", [0, AVAIL | USED, USED])
def test_reject_tail_descriptor_not_available(take: str, bits: int) -> None:
    h = HostilePackedDriver(8)
    h.desc(1, D + 0x100, 8, 0, WRITE | bits)  # lap 1 needs AVAIL=1, USED=0
    h.desc(0, D, 8, 0, NEXT | AVAIL)
    err = expect_fault(h, take, RingFault.DESC_NOT_AVAILABLE)
    assert "descriptor 1" in str(err)


def test_reject_tail_descriptor_from_the_wrong_lap(take: str) -> None:
    h = HostilePackedDriver(2)
    h.offer(0, [(D, 8, 0)])
    assert h.q.pop() is not None
    h.q.push_used(0, 0)  # slot 0 used; the device now reads slot 1 of lap 1
    # a list at slot 1 (lap 1) wraps to slot 0, which must carry lap-0 bits, not lap-1
    h.desc(0, D, 8, 1, avail_bits(1))
    h.desc(1, D, 8, 1, NEXT | avail_bits(1))
    expect_fault(h, take, RingFault.DESC_NOT_AVAILABLE)


def test_head_with_wrong_bits_is_not_available() -> None:
    """A head whose AVAIL/USED bits do not say 'available in this lap' is
    indistinguishable from a stale descriptor: nothing to pop, no fault."""
    h = HostilePackedDriver(4)
    for bits in (0, AVAIL | USED, USED):
        h.desc(0, D, 8, 0, bits)
        assert h.q.pop() is None
        assert h.q.pop_many(4) == []
        assert h.q.pending() == 0
    assert not h.q.broken


def test_reject_buffer_id_out_of_range(take: str) -> None:
    h = HostilePackedDriver(4)
    h.offer(4, [(D, 8, 0)])
    expect_fault(h, take, RingFault.BUFFER_ID_OUT_OF_RANGE)


def test_buffer_id_is_read_from_the_last_descriptor(take: str) -> None:
    h = HostilePackedDriver(4)
    h.desc(1, D, 8, 9, avail_bits(1))  # last: id 9
    h.desc(0, D, 8, 0, NEXT | avail_bits(1))  # head: id 0 (ignored, §2.8.6)
    expect_fault(h, take, RingFault.BUFFER_ID_OUT_OF_RANGE)


def test_reject_buffer_id_in_flight(take: str) -> None:
    h = HostilePackedDriver(4)
    h.offer(2, [(D, 8, 0)])
    assert h.q.pop() is not None
    h.offer(2, [(D, 8, 0)])
    expect_fault(h, take, RingFault.BUFFER_ID_IN_USE)


def test_reject_zero_length(take: str) -> None:
    h = HostilePackedDriver(4)
    h.offer(0, [(D, 8, 0), (D, 0, WRITE)])
    expect_fault(h, take, RingFault.ZERO_LENGTH)


def test_reject_readable_after_writable(take: str) -> None:
    h = HostilePackedDriver(4)
    h.offer(0, [(D, 8, WRITE), (D + 8, 8, 0)])
    expect_fault(h, take, RingFault.READABLE_AFTER_WRITABLE)


def test_reject_buffer_outside_memory(take: str) -> None:
    h = HostilePackedDriver(4)
    h.offer(0, [(0xFFF8, 16, 0)])
    expect_fault(h, take, RingFault.BUFFER_OUT_OF_MEMORY)


def test_reject_buffer_address_overflow(take: str) -> None:
    h = HostilePackedDriver(4)
    h.offer(0, [(ADDRESS_LIMIT - 4, 16, 0)])
    expect_fault(h, take, RingFault.ADDRESS_OVERFLOW)


def test_reject_chain_of_4gib(take: str) -> None:
    h = HostilePackedDriver(4)
    h.q._mem = HugeMemory(h.flat)  # buffers above 2^40 are dummies: no 4 GiB allocated
    big = HugeMemory.HUGE
    h.offer(0, [(big, 1 << 31, 0), (big, 1 << 31, WRITE)])
    expect_fault(h, take, RingFault.CHAIN_TOO_BIG)


def test_reject_no_writable_when_required(take: str) -> None:
    h = HostilePackedDriver(4, require_writable=True)
    h.offer(0, [(D, 8, 0)])
    expect_fault(h, take, RingFault.NO_WRITABLE)


def test_reject_no_readable_when_required(take: str) -> None:
    h = HostilePackedDriver(4, require_readable=True)
    h.offer(0, [(D, 8, WRITE)])
    expect_fault(h, take, RingFault.NO_READABLE)


# ---------------------------------------------------------------------------
# indirect tables


def test_reject_indirect_not_negotiated(take: str) -> None:
    h = HostilePackedDriver(4)
    at, ln = h.table(T, [(D, 8, 0)])
    h.offer(0, [(at, ln, INDIRECT)])
    expect_fault(h, take, RingFault.INDIRECT_NOT_NEGOTIATED)


def test_reject_indirect_with_next(take: str) -> None:
    h = HostilePackedDriver(4, features=IND)
    at, ln = h.table(T, [(D, 8, 0)])
    h.desc(1, D, 8, 0, avail_bits(1))
    h.desc(0, at, ln, 0, INDIRECT | NEXT | avail_bits(1))
    expect_fault(h, take, RingFault.INDIRECT_WITH_NEXT)


def test_reject_indirect_inside_a_list(take: str) -> None:
    """§2.8 driver requirements: no INDIRECT descriptor in a list linked by NEXT."""
    h = HostilePackedDriver(4, features=IND)
    at, ln = h.table(T, [(D, 8, 0)])
    h.offer(0, [(D, 8, 0), (at, ln, INDIRECT)])
    expect_fault(h, take, RingFault.INDIRECT_IN_CHAIN)


@pytest.mark.parametrize("length", [0, 8, 24])
def test_reject_indirect_bad_length(take: str, length: int) -> None:
    h = HostilePackedDriver(4, features=IND)
    h.table(T, [(D, 8, 0), (D, 8, 0)])
    h.offer(0, [(T, length, INDIRECT)])
    expect_fault(h, take, RingFault.INDIRECT_BAD_LEN)


def test_reject_indirect_too_long(take: str) -> None:
    h = HostilePackedDriver(4, features=IND)
    at, ln = h.table(T, [(D, 8, 0)] * 5)
    h.offer(0, [(at, ln, INDIRECT)])
    expect_fault(h, take, RingFault.INDIRECT_TOO_LONG)


def test_reject_indirect_table_outside_memory(take: str) -> None:
    h = HostilePackedDriver(4, features=IND)
    h.offer(0, [(0xFFF0, 32, INDIRECT)])
    expect_fault(h, take, RingFault.BUFFER_OUT_OF_MEMORY)


def test_reject_indirect_table_address_overflow(take: str) -> None:
    h = HostilePackedDriver(4, features=IND)
    h.offer(0, [(ADDRESS_LIMIT - 16, 32, INDIRECT)])
    expect_fault(h, take, RingFault.ADDRESS_OVERFLOW)


def test_reject_nested_indirect(take: str) -> None:
    h = HostilePackedDriver(4, features=IND)
    at, ln = h.table(T, [(D, 8, 0), (T + 0x100, 16, INDIRECT)])
    h.offer(0, [(at, ln, INDIRECT)])
    expect_fault(h, take, RingFault.NESTED_INDIRECT)


@pytest.mark.parametrize(
    ("entries", "fault"),
    [
        ([(D, 0, 0)], RingFault.ZERO_LENGTH),
        ([(D, 8, WRITE), (D, 8, 0)], RingFault.READABLE_AFTER_WRITABLE),
        ([(0xFFFC, 8, 0)], RingFault.BUFFER_OUT_OF_MEMORY),
    ],
)
def test_reject_bad_entry_in_indirect_table(
    take: str, entries: list[tuple[int, int, int]], fault: RingFault
) -> None:
    h = HostilePackedDriver(4, features=IND)
    at, ln = h.table(T, entries)
    h.offer(0, [(at, ln, INDIRECT)])
    expect_fault(h, take, fault)


# ---------------------------------------------------------------------------
# the driver's event word, judged when the device publishes used descriptors


@pytest.mark.parametrize(
    ("features", "word", "fault"),
    [
        (0, event_word(3), RingFault.BAD_EVENT_FLAGS),
        (0, event_word(0x8000), RingFault.BAD_EVENT_FLAGS),
        (0, event_word(int(PackedEventFlag.DESC)), RingFault.BAD_EVENT_FLAGS),
        (EVT, event_word(int(PackedEventFlag.DESC), 4, 1), RingFault.BAD_EVENT_OFFSET),
        (EVT, event_word(int(PackedEventFlag.DESC), 0x7FFF, 0), RingFault.BAD_EVENT_OFFSET),
    ],
)
def test_reject_bad_driver_event_word(features: int, word: int, fault: RingFault) -> None:
    h = HostilePackedDriver(4, features=features)
    h.offer(0, [(D, 8, WRITE)])
    chain = h.q.pop()
    assert chain is not None
    h.set_driver_event(word)
    h.q.add_used(chain.head, 8)
    with pytest.raises(RingError) as exc:
        h.q.publish_used()
    assert exc.value.fault is fault
    latched(h.q)
    # the used descriptor was published before the word was judged
    assert h.used(0)[3] & (AVAIL | USED) == AVAIL | USED


# ---------------------------------------------------------------------------
# driver side: a hostile device writes used descriptors and its event word


@pytest.fixture(params=["get_used", "get_used_many"])
def reap(request: pytest.FixtureRequest) -> str:
    """Every driver-side case is checked through ``get_used()`` and ``get_used_many()``."""
    return request.param


def _expect_driver_fault(p: PackedPair, fault: RingFault, reap: str = "get_used") -> None:
    with pytest.raises(RingError) as exc:
        p.driver.get_used() if reap == "get_used" else p.driver.get_used_many()
    assert exc.value.fault is fault
    assert isinstance(exc.value, RemoteProtocolError)
    assert p.driver.broken
    for call in (p.driver.get_used, p.driver.get_used_many, lambda: p.driver.add([(0, 1)], [], 1)):
        with pytest.raises(QueueBroken):
            call()


def _used_at(p: PackedPair, slot: int, bid: int, length: int = 0, wrap: int = 1) -> None:
    p.write_desc(slot, 0, length, bid, (AVAIL | USED) if wrap else 0)


def test_driver_rejects_used_id_out_of_range(reap: str) -> None:
    p = PackedPair(4)
    p.add([b"x"], [])
    p.driver.publish()
    _used_at(p, 0, 4)
    _expect_driver_fault(p, RingFault.USED_ID_OUT_OF_RANGE, reap)


def test_driver_rejects_used_id_never_added(reap: str) -> None:
    p = PackedPair(4)
    _, bid = p.add([b"x"], [])
    p.driver.publish()
    _used_at(p, 0, bid + 1)
    _expect_driver_fault(p, RingFault.USED_ID_NOT_HEAD, reap)


def test_driver_rejects_used_id_added_but_not_published(reap: str) -> None:
    p = PackedPair(4)
    p.add([b"x"], [])
    p.driver.publish()
    _, second = p.add([b"y"], [])
    _used_at(p, 0, second)
    _expect_driver_fault(p, RingFault.USED_ID_NOT_HEAD, reap)


def test_driver_rejects_used_id_returned_twice(reap: str) -> None:
    p = PackedPair(4)
    _, bid = p.add([b"x"], [])
    p.driver.publish()
    _used_at(p, 0, bid)
    assert p.driver.get_used() is not None
    _used_at(p, 1, bid)  # the same id again, at the next slot
    _expect_driver_fault(p, RingFault.USED_ID_NOT_HEAD, reap)


def test_driver_rejects_a_used_descriptor_with_nothing_outstanding(reap: str) -> None:
    p = PackedPair(4)
    _used_at(p, 0, 0)
    _expect_driver_fault(p, RingFault.USED_ID_NOT_HEAD, reap)


@pytest.mark.parametrize(
    ("features", "word", "fault"),
    [
        (0, event_word(3), RingFault.BAD_EVENT_FLAGS),
        (0, event_word(int(PackedEventFlag.DESC)), RingFault.BAD_EVENT_FLAGS),
        (EVT, event_word(int(PackedEventFlag.DESC), 8, 1), RingFault.BAD_EVENT_OFFSET),
    ],
)
def test_driver_rejects_bad_device_event_word(features: int, word: int, fault: RingFault) -> None:
    p = PackedPair(8, event_idx=bool(features & EVT))
    p.set_device_event(word)
    p.add([b"x"], [])
    with pytest.raises(RingError) as exc:
        p.driver.publish()
    assert exc.value.fault is fault
    assert p.driver.broken
    # the list was exposed before the word was judged
    assert p.device.pop() is not None


def test_every_packed_fault_is_in_the_docs() -> None:
    from pathlib import Path

    text = (Path(__file__).parents[2] / "docs" / "ring.md").read_text()
    packed = text[text.index("## Packed ring") :]
    for fault in (
        RingFault.BUFFER_ID_OUT_OF_RANGE,
        RingFault.BUFFER_ID_IN_USE,
        RingFault.DESC_NOT_AVAILABLE,
        RingFault.RING_OVERRUN,
        RingFault.INDIRECT_IN_CHAIN,
        RingFault.BAD_EVENT_FLAGS,
        RingFault.BAD_EVENT_OFFSET,
        RingFault.CHAIN_TOO_LONG,
        RingFault.NESTED_INDIRECT,
        RingFault.INDIRECT_WITH_NEXT,
        RingFault.INDIRECT_BAD_LEN,
        RingFault.INDIRECT_TOO_LONG,
        RingFault.INDIRECT_NOT_NEGOTIATED,
        RingFault.USED_ID_OUT_OF_RANGE,
        RingFault.USED_ID_NOT_HEAD,
    ):
        assert f"`{fault.value}`" in packed, fault


assert DESC_SIZE == 16
