"""Hypothesis fuzzing of the split ring (STYLE.md §7, rust-vmm virtio-queue fuzzing).

Arbitrary bytes in the descriptor table / avail ring (device side) and the
used ring (driver side) either parse into valid chains/completions or raise
:class:`RingError` -- never another exception, never an access outside memory
(:class:`RecordingMemory` checks every ``view``). The split ring's model
(driver + device against a list model) is in ``test_ring_model.py``, shared
with the packed ring.
"""

from __future__ import annotations

import struct

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from tests.virtio.ring_fuzz import (
    COMPLETE,
    LISTS,
    REQUIRE,
    RecordingMemory,
    add_lists,
    drain_used,
    pop_all,
)
from virtio import split
from virtio.constants import DescFlag, Feature
from virtio.memory import FlatMemory, MemoryFault
from virtio.split import (
    DESC,
    DESC_SIZE,
    DeviceQueue,
    DriverQueue,
    RingFault,
    SplitLayout,
)

MEM_SIZE = 0x2000
RING_AT = 0x1000
TABLE_AT = 0x800
FUZZ_SIZES = st.sampled_from([1, 2, 4, 8])


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
    pop_all(q, split, size, flat, complete)
    mem.check_inside(MEM_SIZE)


@settings(max_examples=300, deadline=None)
@given(
    size=FUZZ_SIZES,
    indirect=st.booleans(),
    data=st.data(),
    complete=COMPLETE,
    require=REQUIRE,
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
    complete=COMPLETE,
    require=REQUIRE,
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
    chains=LISTS,
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
    added = add_lists(d, chains, publish)
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
    # Only "an outstanding head": a head added but not yet published is accepted
    # too (as Linux does; see test_driver_rejects_used_id_not_yet_published).
    faults = {RingFault.USED_IDX_JUMP, RingFault.USED_ID_OUT_OF_RANGE, RingFault.USED_ID_NOT_HEAD}
    drain_used(d, split, size, added, set(added.wlen), faults)
    mem.check_inside(MEM_SIZE)


def test_memory_fault_is_what_recording_memory_passes_through() -> None:
    mem = RecordingMemory(FlatMemory(16))
    with pytest.raises(MemoryFault):
        mem.view(8, 16)
    assert mem.calls == []
    assert DescFlag.INDIRECT == 4  # the fuzzers' flag range 0..7 covers every flag
