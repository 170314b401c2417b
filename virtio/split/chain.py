"""A descriptor chain as the device sees it, and the one walk over a scatter list.

Owns :class:`Chain` (a popped chain: zero-copy views of the driver's
readable and writable buffers, plus their bus segments) and the scatter-list
helpers :func:`slice_segments`, :func:`gather_segments` and
:func:`scatter_segments` that the chain, the backends and the drivers use to
move bytes without joining buffers. Pure data: imports nothing of
``virtio``; must not import the other ``virtio.split`` modules, asyncio, the
OS or ``transport``.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["Chain", "gather_segments", "scatter_segments", "slice_segments"]


class Chain:
    """One descriptor chain popped by the device.

    ``readable``/``writable`` are zero-copy views of the driver's buffers, in
    chain order; ``segments`` holds ``(addr, length, is_writable)`` for users
    that move data with a DMA engine instead. Release the views (drop the chain)
    before the memory they point into is unmapped. Compared by identity (the
    endpoints key chains by ``id``). A plain class, not a dataclass: compiled
    with mypyc its constructor is then native too (a dataclass's generated
    ``__init__`` stays interpreted), and one is built per request.
    """

    __slots__ = ("head", "readable", "readable_len", "segments", "writable", "writable_len")

    def __init__(
        self,
        head: int,
        readable: list[memoryview],
        writable: list[memoryview],
        readable_len: int,
        writable_len: int,
        segments: list[tuple[int, int, bool]],
    ) -> None:
        self.head = head
        self.readable = readable
        self.writable = writable
        self.readable_len = readable_len
        self.writable_len = writable_len
        self.segments = segments

    def __repr__(self) -> str:
        return (
            f"Chain(head={self.head}, readable_len={self.readable_len}, "
            f"writable_len={self.writable_len}, segments={self.segments})"
        )

    def read(self) -> bytes:
        """All readable bytes, concatenated (one copy)."""
        if len(self.readable) == 1:
            return bytes(self.readable[0])
        return b"".join(self.readable)

    def read_into(self, dst: memoryview, offset: int = 0) -> int:
        """Copy readable bytes from ``offset`` into ``dst``; returns bytes copied."""
        return gather_segments(self.readable, dst, offset)

    def write(self, data: bytes | bytearray | memoryview, offset: int = 0) -> int:
        """Scatter ``data`` into the writable buffers from ``offset``; returns bytes written."""
        return scatter_segments(self.writable, data, offset)


def gather_segments(views: Sequence[memoryview], dst: memoryview, offset: int = 0) -> int:
    """Copy the scatter list's bytes from ``offset`` into ``dst`` (as many as fit);
    returns bytes copied. One copy, no join."""
    done = 0
    for seg in slice_segments(views, offset, len(dst)):
        n = len(seg)
        dst[done : done + n] = seg
        done += n
    return done


def scatter_segments(
    views: Sequence[memoryview], data: bytes | bytearray | memoryview, offset: int = 0
) -> int:
    """Copy ``data`` into the scatter list from ``offset``; returns bytes written
    (fewer when the list ends first)."""
    src = memoryview(data).cast("B")
    done = 0
    for seg in slice_segments(views, offset, len(src)):
        n = len(seg)
        seg[:] = src[done : done + n]
        done += n
    return done


def slice_segments(views: Sequence[memoryview], start: int, length: int) -> list[memoryview]:
    """The byte range ``[start, start+length)`` of a scatter list, as views (no copy).

    Shorter than ``length`` when the list ends first. This is the one walk over
    a chain's buffers: :func:`gather_segments`, :func:`scatter_segments` and
    the backends (``preadv``/``pwritev`` straight into card memory) all use it.
    """
    out: list[memoryview] = []
    if length <= 0:
        return out
    for v in views:
        n = len(v)
        if start >= n:
            start -= n
            continue
        take = min(n - start, length)
        out.append(v[start : start + take])
        length -= take
        start = 0
        if not length:
            break
    return out
