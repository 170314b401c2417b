"""The reject list: one test per way a hostile peer can break a split ring.

Device side: a hostile driver writes raw bytes (``struct``) into the
descriptor table and the avail ring. Driver side: a hostile device writes the
used ring. Each test asserts the exact :class:`RingFault`, that the error is a
:class:`~virtio.errors.RemoteProtocolError`, and that the queue is latched
broken (the next call raises :class:`QueueBroken`). The checks follow QEMU
``virtqueue_split_pop``, Linux ``vhost_get_vq_desc``/``vringh`` and
``virtqueue_get_buf_ctx_split`` (see the reference notes).
"""

from __future__ import annotations

import pytest

from tests.virtio.pair import HostileDriver, RingPair
from virtio.constants import DescFlag, Feature
from virtio.errors import RemoteProtocolError
from virtio.memory import ADDRESS_LIMIT, FlatMemory
from virtio.split import DESC_SIZE, DeviceQueue, QueueBroken, RingError, RingFault, SplitLayout

NEXT = int(DescFlag.NEXT)
WRITE = int(DescFlag.WRITE)
INDIRECT = int(DescFlag.INDIRECT)
IND = int(Feature.INDIRECT_DESC)


@pytest.fixture(params=["pop", "pop_many"])
def take(request: pytest.FixtureRequest) -> str:
    """Every device-side case is checked through ``pop()`` and ``pop_many()``."""
    return request.param


def expect_fault(h: HostileDriver, take: str, fault: RingFault) -> RingError:
    q = h.q
    call = q.pop if take == "pop" else lambda: q.pop_many(q.size)
    with pytest.raises(RingError) as exc:
        call()
    err = exc.value
    assert err.fault is fault
    assert isinstance(err, RemoteProtocolError)
    assert err.reason == fault.value
    assert str(err).startswith(fault.value)
    assert q.broken
    assert q.errors == 1
    with pytest.raises(QueueBroken):
        q.pop()
    with pytest.raises(QueueBroken):
        q.pop_many(1)
    with pytest.raises(QueueBroken):
        q.add_used(0, 0)
    with pytest.raises(QueueBroken):
        q.add_used_many([(0, 0)])
    return err


def expect_layout_fault(mem: FlatMemory, layout: SplitLayout, fault: RingFault, **kw: int) -> None:
    # A layout fault is raised by the constructor, so there is no queue object
    # left to inspect for the latch: the fault and its class are what we check.
    with pytest.raises(RingError) as exc:
        DeviceQueue(mem, layout, 0, **kw)
    assert exc.value.fault is fault
    assert isinstance(exc.value, RemoteProtocolError)
    assert exc.value.reason == fault.value


# ---------------------------------------------------------------------------
# layout (queue size, alignment, placement)

MEM = FlatMemory(0x10000)


def test_reject_size_not_power_of_two() -> None:
    expect_layout_fault(MEM, SplitLayout(12, 0x1000, 0x2000, 0x3000), RingFault.BAD_SIZE)


def test_reject_size_zero() -> None:
    expect_layout_fault(MEM, SplitLayout(0, 0x1000, 0x2000, 0x3000), RingFault.BAD_SIZE)


def test_reject_size_above_32768() -> None:
    lay = SplitLayout(65536, 0, 0x100000, 0x200000)
    expect_layout_fault(MEM, lay, RingFault.BAD_SIZE, max_size=65536)


def test_reject_size_above_device_max() -> None:
    lay = SplitLayout.contiguous(0x1000, 16)
    expect_layout_fault(MEM, lay, RingFault.BAD_SIZE, max_size=8)


def test_reject_misaligned_descriptor_table() -> None:
    expect_layout_fault(MEM, SplitLayout(8, 0x1008, 0x2000, 0x3000), RingFault.MISALIGNED)


def test_reject_misaligned_avail_ring() -> None:
    expect_layout_fault(MEM, SplitLayout(8, 0x1000, 0x2001, 0x3000), RingFault.MISALIGNED)


def test_reject_misaligned_used_ring() -> None:
    expect_layout_fault(MEM, SplitLayout(8, 0x1000, 0x2000, 0x3002), RingFault.MISALIGNED)


def test_reject_ring_outside_memory() -> None:
    expect_layout_fault(MEM, SplitLayout(8, 0x1000, 0x2000, 0xFFF0), RingFault.RING_OUT_OF_MEMORY)


def test_reject_ring_not_writable() -> None:
    ro = FlatMemory(0x10000, read_only=True)
    lay = SplitLayout(8, 0x1000, 0x2000, 0x3000)
    expect_layout_fault(ro, lay, RingFault.RING_OUT_OF_MEMORY)


def test_reject_ring_address_overflow() -> None:
    lay = SplitLayout(8, 0x1000, 0x2000, ADDRESS_LIMIT - 8)
    expect_layout_fault(MEM, lay, RingFault.ADDRESS_OVERFLOW)


# ---------------------------------------------------------------------------
# avail ring


def test_reject_avail_idx_jump(take: str) -> None:
    h = HostileDriver(8)
    h.desc(0, h.DATA, 4)
    h.set_avail_idx(9)
    expect_fault(h, take, RingFault.AVAIL_IDX_JUMP)


def test_avail_idx_jump_of_exactly_size_is_fine(take: str) -> None:
    h = HostileDriver(4)
    for i in range(4):
        h.desc(i, h.DATA + 16 * i, 4)
    h.offer(0, 1, 2, 3)
    assert h.q.pending() == 4
    got = h.q.pop_many(4) if take == "pop_many" else [h.q.pop() for _ in range(4)]
    assert [c.head for c in got if c is not None] == [0, 1, 2, 3]


def test_reject_avail_idx_jump_backwards(take: str) -> None:
    h = HostileDriver(8)
    h.set_avail_idx(0xFFFF)  # "moved back" by one == 65535 ahead
    expect_fault(h, take, RingFault.AVAIL_IDX_JUMP)


def test_pending_reports_and_rejects() -> None:
    h = HostileDriver(8)
    h.set_avail_idx(3)
    assert h.q.pending() == 3
    h.set_avail_idx(100)
    with pytest.raises(RingError) as exc:
        h.q.pending()
    assert exc.value.fault is RingFault.AVAIL_IDX_JUMP
    assert h.q.broken


def test_reject_head_out_of_range(take: str) -> None:
    h = HostileDriver(8)
    h.offer(8)
    expect_fault(h, take, RingFault.HEAD_OUT_OF_RANGE)


def test_reject_head_already_in_flight(take: str) -> None:
    h = HostileDriver(8)
    h.desc(2, h.DATA, 4)
    if take == "pop":
        h.offer(2)
        assert h.q.pop() is not None
        h.offer(2)
    else:
        h.offer(2, 2)  # in one batch
    expect_fault(h, take, RingFault.HEAD_IN_USE)


# ---------------------------------------------------------------------------
# chain structure


def test_reject_next_out_of_range(take: str) -> None:
    h = HostileDriver(8)
    h.desc(0, h.DATA, 4, NEXT, 8)
    h.offer(0)
    expect_fault(h, take, RingFault.NEXT_OUT_OF_RANGE)


def test_reject_next_out_of_range_in_indirect_table(take: str) -> None:
    h = HostileDriver(8, features=IND)
    at, n = h.table(0x3000, [(h.DATA, 4, NEXT, 2), (h.DATA, 4, 0, 0)])  # table of 2
    h.desc(0, at, n, INDIRECT)
    h.offer(0)
    expect_fault(h, take, RingFault.NEXT_OUT_OF_RANGE)


def test_reject_descriptor_loop(take: str) -> None:
    h = HostileDriver(8)
    h.desc(0, h.DATA, 4, NEXT, 1)
    h.desc(1, h.DATA, 4, NEXT, 2)
    h.desc(2, h.DATA, 4, NEXT, 0)
    h.offer(0)
    expect_fault(h, take, RingFault.CHAIN_TOO_LONG)


def test_reject_self_loop(take: str) -> None:
    h = HostileDriver(4)
    h.desc(3, h.DATA, 4, NEXT, 3)
    h.offer(3)
    expect_fault(h, take, RingFault.CHAIN_TOO_LONG)


def test_reject_chain_longer_than_queue_direct_plus_indirect(take: str) -> None:
    """3 direct + an indirect table of size-1 entries: size+2 buffers on a size ring."""
    n = 8
    h = HostileDriver(n, features=IND)
    entries = [(h.DATA + 16 * i, 4, NEXT, i + 1) for i in range(n - 1)]
    entries[-1] = (entries[-1][0], 4, 0, 0)
    at, ln = h.table(0x3000, entries)
    h.desc(0, h.DATA, 4, NEXT, 1)
    h.desc(1, h.DATA, 4, NEXT, 2)
    h.desc(2, h.DATA, 4, NEXT, 3)
    h.desc(3, at, ln, INDIRECT)
    h.offer(0)
    expect_fault(h, take, RingFault.CHAIN_TOO_LONG)


def test_direct_plus_indirect_up_to_queue_size_is_fine() -> None:
    """The spec's "zero or more chained descriptors followed by a single indirect"."""
    n = 8
    h = HostileDriver(n, features=IND)
    entries = [(h.DATA + 16 * i, 4, WRITE | NEXT, i + 1) for i in range(n - 2)]
    entries[-1] = (entries[-1][0], 4, WRITE, 0)
    at, ln = h.table(0x3000, entries)
    h.desc(5, h.DATA, 4, NEXT, 6)
    h.desc(6, h.DATA + 4, 4, NEXT, 7)
    h.desc(7, at, ln, INDIRECT)
    h.offer(5)
    c = h.q.pop()
    assert c is not None
    assert len(c.segments) == n
    assert (c.readable_len, c.writable_len) == (8, 4 * (n - 2))


def test_reject_nested_indirect(take: str) -> None:
    h = HostileDriver(8, features=IND)
    inner, iln = h.table(0x3100, [(h.DATA, 4, 0, 0)])
    at, ln = h.table(0x3000, [(h.DATA, 4, NEXT, 1), (inner, iln, INDIRECT, 0)])
    h.desc(0, at, ln, INDIRECT)
    h.offer(0)
    expect_fault(h, take, RingFault.NESTED_INDIRECT)


def test_reject_indirect_with_next(take: str) -> None:
    h = HostileDriver(8, features=IND)
    at, ln = h.table(0x3000, [(h.DATA, 4, 0, 0)])
    h.desc(0, at, ln, INDIRECT | NEXT, 1)
    h.desc(1, h.DATA, 4)
    h.offer(0)
    expect_fault(h, take, RingFault.INDIRECT_WITH_NEXT)


def test_reject_indirect_table_length_zero(take: str) -> None:
    h = HostileDriver(8, features=IND)
    h.desc(0, 0x3000, 0, INDIRECT)
    h.offer(0)
    expect_fault(h, take, RingFault.INDIRECT_BAD_LEN)


def test_reject_indirect_table_length_not_multiple_of_16(take: str) -> None:
    h = HostileDriver(8, features=IND)
    h.table(0x3000, [(h.DATA, 4, 0, 0), (h.DATA, 4, 0, 0)])
    h.desc(0, 0x3000, 24, INDIRECT)
    h.offer(0)
    expect_fault(h, take, RingFault.INDIRECT_BAD_LEN)


def test_reject_indirect_table_too_long(take: str) -> None:
    h = HostileDriver(8, features=IND)
    h.desc(0, 0x3000, 9 * DESC_SIZE, INDIRECT)
    h.offer(0)
    expect_fault(h, take, RingFault.INDIRECT_TOO_LONG)


def test_reject_indirect_not_negotiated(take: str) -> None:
    h = HostileDriver(8, features=0)
    at, ln = h.table(0x3000, [(h.DATA, 4, 0, 0)])
    h.desc(0, at, ln, INDIRECT)
    h.offer(0)
    expect_fault(h, take, RingFault.INDIRECT_NOT_NEGOTIATED)


def test_reject_readable_after_writable(take: str) -> None:
    h = HostileDriver(8)
    h.desc(0, h.DATA, 4, NEXT, 1)
    h.desc(1, h.DATA + 4, 4, WRITE | NEXT, 2)
    h.desc(2, h.DATA + 8, 4, 0)
    h.offer(0)
    expect_fault(h, take, RingFault.READABLE_AFTER_WRITABLE)


def test_reject_readable_after_writable_in_indirect_table(take: str) -> None:
    h = HostileDriver(8, features=IND)
    at, ln = h.table(0x3000, [(h.DATA, 4, WRITE | NEXT, 1), (h.DATA + 4, 4, 0, 0)])
    h.desc(0, at, ln, INDIRECT)
    h.offer(0)
    expect_fault(h, take, RingFault.READABLE_AFTER_WRITABLE)


def test_reject_readable_table_after_writable_direct(take: str) -> None:
    h = HostileDriver(8, features=IND)
    at, ln = h.table(0x3000, [(h.DATA + 4, 4, 0, 0)])
    h.desc(0, h.DATA, 4, WRITE | NEXT, 1)
    h.desc(1, at, ln, INDIRECT)
    h.offer(0)
    expect_fault(h, take, RingFault.READABLE_AFTER_WRITABLE)


# ---------------------------------------------------------------------------
# buffers


def test_reject_zero_length_buffer(take: str) -> None:
    h = HostileDriver(8)
    h.desc(0, h.DATA, 0)
    h.offer(0)
    expect_fault(h, take, RingFault.ZERO_LENGTH)


def test_reject_zero_length_buffer_in_chain(take: str) -> None:
    h = HostileDriver(8)
    h.desc(0, h.DATA, 4, NEXT, 1)
    h.desc(1, h.DATA, 0, WRITE)
    h.offer(0)
    expect_fault(h, take, RingFault.ZERO_LENGTH)


class HugeMemory:
    """FlatMemory below 4 GiB; above it, a dummy one-byte view for any range.

    Lets a chain of several near-4 GiB buffers be walked without allocating
    them; the ring core never looks at a view's length, only at the descriptor's.
    """

    HUGE = 1 << 40

    def __init__(self, inner: FlatMemory) -> None:
        self.inner = inner
        self.dummy = memoryview(bytearray(1))

    def view(self, addr: int, length: int, write: bool = False) -> memoryview:
        if addr >= self.HUGE:
            assert addr + length <= ADDRESS_LIMIT
            return self.dummy
        return self.inner.view(addr, length, write)


def _huge(size: int = 8, **kw: int) -> HostileDriver:
    inner = FlatMemory(0x10000)
    h = HostileDriver(size, memory=HugeMemory(inner), **kw)
    h.flat = inner  # the hostile driver writes the ring through the real buffer
    return h


def test_reject_chain_of_2_32_bytes_or_more(take: str) -> None:
    h = _huge()
    big = HugeMemory.HUGE
    h.desc(0, big, 0xFFFFFFF0, NEXT, 1)
    h.desc(1, big, 0xFFFFFFF0, WRITE | NEXT, 2)
    h.desc(2, big, 0xFFFFFFF0, WRITE)
    h.offer(0)
    expect_fault(h, take, RingFault.CHAIN_TOO_BIG)


def test_reject_chain_of_exactly_2_32_bytes(take: str) -> None:
    h = _huge()
    h.desc(0, HugeMemory.HUGE, 0xFFFFFFFF, NEXT, 1)
    h.desc(1, h.DATA, 1, WRITE)
    h.offer(0)
    expect_fault(h, take, RingFault.CHAIN_TOO_BIG)


def test_chain_just_below_2_32_bytes_is_fine() -> None:
    h = _huge()
    h.desc(0, HugeMemory.HUGE, 0xFFFFFFFE, NEXT, 1)
    h.desc(1, h.DATA, 1, WRITE)
    h.offer(0)
    c = h.q.pop()
    assert c is not None
    assert c.readable_len + c.writable_len == 0xFFFFFFFF


def test_reject_buffer_outside_memory(take: str) -> None:
    h = HostileDriver(8)
    h.desc(0, 0xFFF0, 0x20)  # single buffer: the fast path
    h.offer(0)
    expect_fault(h, take, RingFault.BUFFER_OUT_OF_MEMORY)


def test_reject_buffer_outside_memory_in_chain(take: str) -> None:
    h = HostileDriver(8)
    h.desc(0, h.DATA, 4, NEXT, 1)
    h.desc(1, 0x10000, 4, WRITE)
    h.offer(0)
    expect_fault(h, take, RingFault.BUFFER_OUT_OF_MEMORY)


def test_reject_writable_buffer_in_read_only_memory(take: str) -> None:
    h = HostileDriver(8)
    ro = FlatMemory(h.flat.raw(), read_only=True)
    # The device maps the ring through the writable memory but buffers through
    # a read-only one: a writable descriptor there must be refused.
    object.__setattr__(h.q, "_mem", ro)
    h.desc(0, h.DATA, 4, WRITE)
    h.offer(0)
    expect_fault(h, take, RingFault.BUFFER_OUT_OF_MEMORY)


def test_reject_buffer_address_overflow(take: str) -> None:
    h = HostileDriver(8)
    h.desc(0, ADDRESS_LIMIT - 2, 4)
    h.offer(0)
    expect_fault(h, take, RingFault.ADDRESS_OVERFLOW)


def test_reject_buffer_address_overflow_in_chain(take: str) -> None:
    h = HostileDriver(8)
    h.desc(0, h.DATA, 4, NEXT, 1)
    h.desc(1, ADDRESS_LIMIT - 1, 2, WRITE)
    h.offer(0)
    expect_fault(h, take, RingFault.ADDRESS_OVERFLOW)


def test_reject_indirect_table_outside_memory(take: str) -> None:
    h = HostileDriver(8, features=IND)
    h.desc(0, 0xFFF0, 2 * DESC_SIZE, INDIRECT)
    h.offer(0)
    expect_fault(h, take, RingFault.BUFFER_OUT_OF_MEMORY)


def test_reject_indirect_table_address_overflow(take: str) -> None:
    h = HostileDriver(8, features=IND)
    h.desc(0, ADDRESS_LIMIT - DESC_SIZE, 2 * DESC_SIZE, INDIRECT)
    h.offer(0)
    expect_fault(h, take, RingFault.ADDRESS_OVERFLOW)


# ---------------------------------------------------------------------------
# the device's requirements on a chain


def test_reject_no_writable_part(take: str) -> None:
    h = HostileDriver(8, require_writable=True)
    h.desc(0, h.DATA, 4)  # one readable buffer: the fast path falls through
    h.offer(0)
    expect_fault(h, take, RingFault.NO_WRITABLE)


def test_reject_no_writable_part_in_chain(take: str) -> None:
    h = HostileDriver(8, require_writable=True)
    h.desc(0, h.DATA, 4, NEXT, 1)
    h.desc(1, h.DATA, 4)
    h.offer(0)
    expect_fault(h, take, RingFault.NO_WRITABLE)


def test_reject_no_readable_part(take: str) -> None:
    h = HostileDriver(8, require_readable=True)
    h.desc(0, h.DATA, 4, WRITE)
    h.offer(0)
    expect_fault(h, take, RingFault.NO_READABLE)


def test_required_parts_present_are_fine() -> None:
    h = HostileDriver(8, require_readable=True, require_writable=True)
    h.desc(0, h.DATA, 4, NEXT, 1)
    h.desc(1, h.DATA + 4, 4, WRITE)
    h.offer(0)
    c = h.q.pop()
    assert c is not None
    assert (c.readable_len, c.writable_len) == (4, 4)
    h.desc(1, h.DATA, 4, WRITE)
    h.offer(1)
    with pytest.raises(RingError) as exc:
        h.q.pop()
    assert exc.value.fault is RingFault.NO_READABLE


def test_pop_many_keeps_earlier_chains_in_flight_when_one_is_bad() -> None:
    h = HostileDriver(8)
    h.desc(0, h.DATA, 4)
    h.desc(1, h.DATA, 0)
    h.offer(0, 1)
    with pytest.raises(RingError):
        h.q.pop_many()
    assert h.q.next_avail == 1
    assert h.q.in_flight == 1
    assert h.q.save().inflight == (0,)


# ---------------------------------------------------------------------------
# driver side: a hostile device writes the used ring
def _expect_driver_fault(p: RingPair, fault: RingFault) -> None:
    with pytest.raises(RingError) as exc:
        p.driver.get_used()
    assert exc.value.fault is fault
    assert isinstance(exc.value, RemoteProtocolError)
    assert exc.value.reason == fault.value
    assert p.driver.broken
    with pytest.raises(QueueBroken):
        p.driver.get_used()
    with pytest.raises(QueueBroken):
        p.add((b"x",), ())


def test_driver_rejects_used_idx_jump() -> None:
    p = RingPair(8)
    _, head = p.add((b"a",), ())
    p.add((b"b",), ())
    p.driver.publish()
    p.add((b"c",), ())  # added, not published: not outstanding to the device
    p.put_used(0, head, 0)
    p.set_used_idx(3)
    _expect_driver_fault(p, RingFault.USED_IDX_JUMP)


def test_driver_rejects_used_idx_when_nothing_published() -> None:
    p = RingPair(8)
    p.set_used_idx(1)
    _expect_driver_fault(p, RingFault.USED_IDX_JUMP)


def test_driver_rejects_used_id_out_of_range() -> None:
    p = RingPair(8)
    p.add((b"a",), ())
    p.driver.publish()
    p.put_used(0, 8, 0)
    p.set_used_idx(1)
    _expect_driver_fault(p, RingFault.USED_ID_OUT_OF_RANGE)


def test_driver_rejects_used_id_in_middle_of_chain() -> None:
    p = RingPair(8)
    _, head = p.add((b"a", b"b"), (1,))
    p.driver.publish()
    middle = p.read_desc(head)[3]
    p.put_used(0, middle, 1)
    p.set_used_idx(1)
    _expect_driver_fault(p, RingFault.USED_ID_NOT_HEAD)


def test_driver_rejects_head_returned_twice() -> None:
    p = RingPair(8)
    t1, h1 = p.add((b"a",), ())
    p.add((b"b",), ())
    p.driver.publish()
    p.put_used(0, h1, 0)
    p.put_used(1, h1, 0)
    p.set_used_idx(2)
    assert p.driver.get_used() == (t1, 0)
    _expect_driver_fault(p, RingFault.USED_ID_NOT_HEAD)


def test_driver_clamps_used_len_to_writable_size() -> None:
    p = RingPair(8)
    t1, h1 = p.add((b"a",), (3, 4))
    t2, h2 = p.add((b"b",), ())
    p.driver.publish()
    p.put_used(0, h1, 0xFFFFFFFF)
    p.put_used(1, h2, 100)
    p.set_used_idx(2)
    assert p.driver.get_used() == (t1, 7)
    assert p.driver.get_used() == (t2, 0)
    assert not p.driver.broken


def test_driver_rejects_used_id_not_yet_published() -> None:
    p = RingPair(8)
    p.add((b"a",), ())
    p.driver.publish()
    _, h2 = p.add((b"b",), ())  # added, not published
    p.put_used(0, h2, 0)
    p.set_used_idx(1)
    _expect_driver_fault(p, RingFault.USED_ID_NOT_HEAD)
