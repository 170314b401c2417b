"""The packed ring against independent peers written from the references.

Our two sides are tested against each other elsewhere; a shared
misreading of the spec would pass those. Here each side meets a small peer
written straight from a reference instead:

- :class:`SpecDriver` is the driver example of virtio 1.2 §2.8 "Supplying Buffers" (the
  buffer id only in the last descriptor of a list, the head's flags last;
  the used side skips by its own list lengths), with Linux
  ``is_used_desc_packed`` for what is used and ``virtqueue_kick_prepare_packed``
  for kicks;
- :class:`QemuLikeDevice` follows QEMU ``virtqueue_packed_pop`` /
  ``virtqueue_packed_fill_desc`` (the id taken from the head, one used
  descriptor per list written at ``used_idx`` with ``id``/``len`` then the
  flags, ``used_idx`` moved by the list's descriptor count, 1 for indirect).

Both peers check nothing a hostile side could break: they are the
"well-behaved real software" our strict sides must accept.
"""

from __future__ import annotations

import struct

import hypothesis.strategies as st
from hypothesis import given, settings

from tests.virtio.packed_pair import AVAIL, USED, PackedPair
from virtio.constants import PackedDescFlag, PackedEventFlag
from virtio.memory import FlatMemory
from virtio.packed import DESC, DESC_SIZE, DeviceQueue, PackedLayout, packed_need_event

NEXT = int(PackedDescFlag.NEXT)
WRITE = int(PackedDescFlag.WRITE)
INDIRECT = int(PackedDescFlag.INDIRECT)
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


class SpecDriver:
    """The spec's example driver ("Supplying Buffers"), no EVENT_IDX, over raw bytes."""

    def __init__(self, raw: memoryview, layout: PackedLayout) -> None:
        self.raw, self.layout, self.size = raw, layout, layout.size
        self.next_avail, self.avail_wrap = 0, 1
        self.next_used, self.used_wrap = 0, 1
        self.free_ids = list(range(self.size))
        self.sgs: dict[int, int] = {}
        self.num_free = self.size
        self.added = 0

    def _desc_at(self, slot: int) -> int:
        return self.layout.desc + slot * DESC_SIZE

    def add(self, bufs: list[tuple[int, int, bool]]) -> int:
        bid = self.free_ids.pop(0)
        first = self.next_avail
        head_flags = 0
        last = first
        for k, (addr, length, w) in enumerate(bufs):
            at = self._desc_at(self.next_avail)
            struct.pack_into("<QI", self.raw, at, addr, length)  # id left as it was
            f = (WRITE if w else 0) | (AVAIL if self.avail_wrap else USED)
            if k < len(bufs) - 1:
                f |= NEXT
            if self.next_avail == first:
                head_flags = f
            else:
                _U16.pack_into(self.raw, at + 14, f)
            last = self.next_avail
            self.next_avail += 1
            if self.next_avail >= self.size:
                self.next_avail = 0
                self.avail_wrap ^= 1
        self.sgs[bid] = len(bufs)
        self.num_free -= len(bufs)
        self.added += len(bufs)
        _U16.pack_into(self.raw, self._desc_at(last) + 12, bid)  # ID in the last descriptor
        _U16.pack_into(self.raw, self._desc_at(first) + 14, head_flags)
        return bid

    def kick(self) -> bool:
        """Linux virtqueue_kick_prepare_packed."""
        new = self.next_avail
        old = new - self.added
        self.added = 0
        word = _U32.unpack_from(self.raw, self.layout.device)[0]
        return packed_need_event(word, self.size, self.avail_wrap, new, old)

    def get_used(self) -> tuple[int, int] | None:
        at = self._desc_at(self.next_used)
        flags = _U16.unpack_from(self.raw, at + 14)[0]
        # Linux is_used_desc_packed: AVAIL == USED == wrap. (The spec's example
        # tests only USED, which reads a stale tail of the last lap, AVAIL=1
        # USED=0, as used in lap 0: found by this test.)
        avail, used = bool(flags & AVAIL), bool(flags & USED)
        if avail != used or used != bool(self.used_wrap):
            return None
        bid = _U16.unpack_from(self.raw, at + 12)[0]
        length = _U32.unpack_from(self.raw, at + 8)[0]
        assert bid < self.size
        sgs = self.sgs.pop(bid)
        self.next_used += sgs
        if self.next_used >= self.size:
            self.next_used -= self.size
            self.used_wrap ^= 1
        self.free_ids.append(bid)
        self.num_free += sgs
        return bid, length


class QemuLikeDevice:
    """QEMU's packed pop/fill over raw bytes (no validation, no event suppression)."""

    def __init__(self, raw: memoryview, layout: PackedLayout) -> None:
        self.raw, self.layout, self.size = raw, layout, layout.size
        self.last_avail, self.avail_wrap = 0, 1
        self.used_idx, self.used_wrap = 0, 1
        self.ndescs: dict[int, int] = {}

    def _read(self, slot: int) -> tuple[int, int, int, int]:
        return DESC.unpack_from(self.raw, self.layout.desc + slot * DESC_SIZE)

    def pop(self) -> tuple[int, bytes, list[tuple[int, int]]] | None:
        """(id, readable bytes, writable (addr, len))."""
        addr, length, bid, flags = self._read(self.last_avail)
        avail, used = bool(flags & AVAIL), bool(flags & USED)
        if not (avail != used and avail == bool(self.avail_wrap)):
            return None
        if flags & INDIRECT:
            entries = [
                DESC.unpack_from(self.raw, addr + i * DESC_SIZE) for i in range(length // 16)
            ]
            count = 1
        else:
            entries, count, i = [], 0, self.last_avail
            while True:
                d = self._read(i)
                entries.append(d)
                count += 1
                i = (i + 1) % self.size
                if not d[3] & NEXT:
                    break
        data = b"".join(bytes(self.raw[a : a + n]) for a, n, _, f in entries if not f & WRITE)
        out = [(a, n) for a, n, _, f in entries if f & WRITE]
        self.last_avail += count
        if self.last_avail >= self.size:
            self.last_avail -= self.size
            self.avail_wrap ^= 1
        self.ndescs[bid] = count
        return bid, data, out

    def push(self, bid: int, length: int) -> None:
        at = self.layout.desc + self.used_idx * DESC_SIZE
        struct.pack_into("<IH", self.raw, at + 8, length, bid)
        flags = (AVAIL | USED) if self.used_wrap else 0
        _U16.pack_into(self.raw, at + 14, flags)
        self.used_idx += self.ndescs.pop(bid)
        if self.used_idx >= self.size:
            self.used_idx -= self.size
            self.used_wrap ^= 1


SHAPES = st.lists(
    st.tuples(st.integers(1, 3), st.integers(0, 2), st.booleans()),  # (readable, writable, done)
    min_size=1,
    max_size=40,
)


@settings(max_examples=40, deadline=None)
@given(size=st.sampled_from([1, 2, 3, 4, 7]), shapes=SHAPES, order=st.randoms())
def test_spec_driver_against_our_device(
    size: int, shapes: list[tuple[int, int, bool]], order: object
) -> None:
    flat = FlatMemory(0x8000)
    raw = flat.raw()
    layout = PackedLayout.contiguous(0x1000, size)
    dev = DeviceQueue(flat, layout, 0)
    dev.activate()
    drv = SpecDriver(raw, layout)
    sent: dict[int, bytes] = {}
    popped: list[int] = []
    for n_round, (nr, nw, _) in enumerate(shapes):
        nr = min(nr, size)
        nw = min(nw, size - nr)
        if nr + nw > drv.num_free:
            # drain: our device completes everything in a shuffled order
            popped += [c.head for c in dev.pop_many()]
            order.shuffle(popped)  # type: ignore[attr-defined]
            for bid in popped:
                dev.add_used(bid, 0)
            dev.publish_used()
            popped.clear()
            while (got := drv.get_used()) is not None:
                sent.pop(got[0])
        base = 0x4000 + 0x100 * (n_round % 32)
        payload = bytes([n_round & 0xFF]) * 8
        bufs = []
        for i in range(nr):
            raw[base + 16 * i : base + 16 * i + 8] = payload
            bufs.append((base + 16 * i, 8, False))
        bufs += [(base + 0x80 + 16 * i, 4, True) for i in range(nw)]
        bid = drv.add(bufs)
        assert drv.kick()  # the device event area is zero: ENABLE
        chain = dev.pop()
        assert chain is not None
        assert chain.head == bid
        assert chain.read() == payload * nr
        assert chain.writable_len == 4 * nw
        sent[bid] = payload
        popped.append(bid)
    assert dev.pop() is None


@settings(max_examples=40, deadline=None)
@given(size=st.sampled_from([1, 2, 3, 4, 7]), shapes=SHAPES, indirect=st.booleans())
def test_our_driver_against_a_qemu_like_device(
    size: int, shapes: list[tuple[int, int, bool]], indirect: bool
) -> None:
    p = PackedPair(size, indirect=indirect, indirect_max=min(3, size))
    dev = QemuLikeDevice(p.raw(), p.layout)
    held: list[tuple[int, int]] = []  # (id, length) popped, completion held back
    tokens: dict[int, int] = {}
    for nr, nw, done in shapes:
        nr = min(nr, size)
        nw = min(nw, size - nr)
        data = [bytes([nr * 16 + i]) * 5 for i in range(nr)]
        try:
            token, bid = p.add(data, [6] * nw)
        except Exception:
            # full: complete the held lists newest first (out of order), then reap
            for hid, ln in reversed(held):
                dev.push(hid, ln)
            held.clear()
            while (got := p.driver.get_used()) is not None:
                token_back, _ = got
                assert token_back in tokens.values()
                tokens = {k: v for k, v in tokens.items() if v != token_back}
                p.release(token_back)
            token, bid = p.add(data, [6] * nw)
        tokens[bid] = token
        p.driver.publish()
        popped = dev.pop()
        assert popped is not None
        qid, got_data, writable = popped
        assert qid == bid  # the id from the head works: ours is in every descriptor
        assert got_data == b"".join(data)
        assert [n for _, n in writable] == [6] * nw
        if done:
            dev.push(qid, 6 * nw)
            got = p.driver.get_used()
            assert got == (token, 6 * nw)
            tokens.pop(bid)
            p.release(token)
        else:
            held.append((qid, 6 * nw))
    assert not p.driver.broken
    assert dev.pop() is None
    assert PackedEventFlag.ENABLE == 0
