"""Hypothesis fuzzing of the packed ring (the twin of ``test_ring_hypothesis.py``).

Arbitrary bytes in the descriptor ring, an indirect area and the driver event
word (device side), and in the used descriptors and the device event word
(driver side), either parse into valid lists/completions or raise
:class:`RingError` -- never another exception, never a loop (the number of
pops is bounded), never an access outside memory. The packed ring's model
(small, also odd sizes, so the wrap counters flip often) is in
``test_ring_model.py``, shared with the split ring.

Example counts are budgeted to keep ``make test`` quick.
"""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import given, settings

from tests.virtio.packed_pair import AVAIL, USED
from tests.virtio.ring_fuzz import (
    COMPLETE,
    LISTS,
    REQUIRE,
    RecordingMemory,
    add_lists,
    attempt,
    drain_used,
    pop_all,
)
from virtio import packed
from virtio.constants import Feature, PackedDescFlag
from virtio.memory import FlatMemory
from virtio.packed import (
    DESC,
    DESC_SIZE,
    Chain,
    DeviceQueue,
    DriverQueue,
    PackedLayout,
    RingError,
    RingFault,
)

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

    def push(c: Chain) -> bool:
        assert 0 <= c.head < size
        r = attempt(lambda: q.push_used(c.head, c.writable_len))
        if isinstance(r, BaseException):
            assert isinstance(r, RingError), f"not a RingError: {r!r}"
            assert r.fault in {RingFault.BAD_EVENT_FLAGS, RingFault.BAD_EVENT_OFFSET}
            return False
        return True

    pop_all(q, packed, size, flat, complete, push)
    mem.check_inside(MEM_SIZE)


@settings(max_examples=150, deadline=None)
@given(
    size=FUZZ_SIZES,
    features=st.sampled_from([0, int(Feature.INDIRECT_DESC), int(Feature.EVENT_IDX)]),
    data=st.data(),
    complete=COMPLETE,
    require=REQUIRE,
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
    complete=COMPLETE,
    require=REQUIRE,
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
    lists=LISTS,
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
    added = add_lists(d, lists, publish)  # device area is zero: ENABLE
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
    faults = {RingFault.USED_ID_OUT_OF_RANGE, RingFault.USED_ID_NOT_HEAD}
    drain_used(d, packed, size, added, added.published, faults)
    mem.check_inside(MEM_SIZE)
