"""What the ring fuzzers of both formats share (``test_ring_hypothesis.py``,
``test_packed_hypothesis.py``): arbitrary bytes in a ring either parse into
valid chains/completions or raise the format's ``RingError`` that breaks the
queue -- never another exception, never an access outside memory.

- :class:`RecordingMemory`: every view it hands out must lie inside memory;
- :func:`attempt`, :func:`check_chain_valid`;
- device side: :func:`pop_all` (the pop/complete loop);
- driver side: :func:`add_lists` (the lists a driver added) and
  :func:`drain_used` (the ``get_used`` loop).

``ring`` arguments are :mod:`virtio.split` or :mod:`virtio.packed` (both
export ``Chain``, ``RingError``, ``RingFault``, ``QueueBroken``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import hypothesis.strategies as st

from virtio.errors import LocalProtocolError, WouldBlock
from virtio.memory import FlatMemory

#: Which popped chains the device completes (:func:`pop_all`).
COMPLETE = st.lists(st.booleans(), min_size=1, max_size=4)
#: The device queue's ``require_readable`` / ``require_writable``.
REQUIRE = st.tuples(st.booleans(), st.booleans())
#: The lists a driver adds (:func:`add_lists`): (readable, writable) counts, not both 0.
LISTS = st.lists(
    st.tuples(st.integers(0, 3), st.integers(0, 3)).filter(lambda t: sum(t) > 0), max_size=8
)


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

    def check_inside(self, size: int) -> None:
        """Every access it passed lay within ``[0, size)``."""
        for addr, length, _ in self.calls:
            assert addr >= 0
            assert addr + length <= size


def attempt(fn: Callable[[], object]) -> object:
    """Run ``fn``; return its result or the exception it raised (asserted by the caller)."""
    try:
        return fn()
    except Exception as e:  # the point is to see *any* exception
        return e


def check_chain_valid(chain: Any, size: int, mem: FlatMemory) -> None:
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


def pop_all(
    q: Any,
    ring: ModuleType,
    size: int,
    flat: FlatMemory,
    complete: list[bool],
    push: Callable[[Any], bool] | None = None,
) -> None:
    """The device-side fuzz loop: pop (one, then two at a time) for ``2 * size + 2``
    rounds -- every pop takes a slot or descriptor, so that ends any run -- and
    complete the chains ``complete`` picks. Every chain must be a valid
    ``ring.Chain`` (:func:`check_chain_valid`); anything else must be a
    ``ring.RingError`` with a ``ring.RingFault`` that leaves the queue broken
    (``ring``: :mod:`virtio.split` or :mod:`virtio.packed`). ``push(chain)``
    completes one and returns False to end the run (default: ``push_used``)."""
    for i in range(2 * size + 2):
        out = attempt(q.pop) if i % 2 else attempt(lambda: q.pop_many(2))
        if isinstance(out, BaseException):
            assert isinstance(out, ring.RingError), f"not a RingError: {out!r}"
            assert isinstance(out.fault, ring.RingFault)
            assert q.broken
            assert isinstance(attempt(q.pop), ring.QueueBroken)
            return
        chains = out if isinstance(out, list) else [out]
        if not chains or chains == [None]:
            return
        for c in chains:
            assert isinstance(c, ring.Chain)
            check_chain_valid(c, size, flat)
            if complete[(i + c.head) % len(complete)]:
                if push is None:
                    q.push_used(c.head, c.writable_len)
                elif not push(c):
                    return


@dataclass(slots=True)
class Added:
    """What :func:`add_lists` put on a driver queue, per token."""

    wlen: dict[int, int]  # writable bytes
    need: dict[int, int]  # descriptors / slots taken
    published: set[int]  # the tokens published before the rest were added


def add_lists(d: Any, lists: list[tuple[int, int]], publish: int) -> Added:
    """The driver-side fuzzers' setup: add one list per ``(readable, writable)``
    count pair (8-byte readable, 5-byte writable buffers; a full ring or a list
    longer than it is skipped), publishing once after the first ``publish``."""
    out = Added({}, {}, set())
    for token, (nr, nw) in enumerate(lists, start=1):
        if token == publish + 1:
            out.published |= set(out.wlen)
            assert isinstance(attempt(d.publish), bool)
        try:
            d.add([(0x100, 8)] * nr, [(0x200, 5)] * nw, token)
        except (WouldBlock, LocalProtocolError):
            continue
        out.wlen[token] = 5 * nw
        out.need[token] = 1 if nr + nw <= 2 else nr + nw
    return out


def drain_used(
    d: Any, ring: ModuleType, size: int, added: Added, allowed: set[int], faults: set[Any]
) -> None:
    """The driver-side fuzz loop: ``get_used`` until nothing is left. Each
    completion is a token in ``allowed``, once, with a length within its
    writable bytes, and the free count adds up; anything else must be a
    ``ring.RingError`` with one of ``faults`` that breaks the queue."""
    got: set[int] = set()
    for _ in range(size + 2):
        out = attempt(d.get_used)
        if isinstance(out, BaseException):
            assert isinstance(out, ring.RingError), f"not a RingError: {out!r}"
            assert out.fault in faults
            assert d.broken
            assert isinstance(attempt(d.get_used), ring.QueueBroken)
            return
        if out is None:
            return
        assert isinstance(out, tuple)
        token, length = out
        assert token in allowed, "a completion for a list the device never saw"
        assert token not in got
        got.add(token)
        assert 0 <= length <= added.wlen[token]
        in_use = sum(added.need[t] for t in added.wlen if t not in got)
        assert d.num_free + in_use == size
