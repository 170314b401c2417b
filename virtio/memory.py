"""The memory protocol the ring core works on, and a flat in-process memory.

The ring core never maps anything: it is handed an object that turns a bus
address and a length into a bounds- and permission-checked ``memoryview``.
``transport`` provides the real ones (memfd regions seen through PCIe windows);
:class:`FlatMemory` here is the plain one used by tests, benchmarks and
single-process pairs. The :class:`Memory` protocol and :class:`MemoryFault` are declared in
:mod:`virtio.memory_protocol` (kept interpreted when this module is compiled
with mypyc) and re-exported here. Must not import asyncio, the OS, or ``transport``.
"""

from __future__ import annotations

import bisect
from typing import Final

from mypy_extensions import mypyc_attr

from virtio.errors import LocalProtocolError, ResourceError
from virtio.memory_protocol import Memory, MemoryFault

__all__ = [
    "ADDRESS_LIMIT",
    "FirstFitAllocator",
    "FlatMemory",
    "Memory",
    "MemoryFault",
    "check_range",
]

#: Bus addresses are 64-bit; ``addr + length`` must not pass this.
ADDRESS_LIMIT: Final = 1 << 64


def check_range(addr: int, length: int, base: int, size: int, write: bool) -> int:
    """Return the offset of ``[addr, addr+length)`` inside ``[base, base+size)``.

    Raises:
        MemoryFault: negative or overflowing ranges, or ranges not fully inside.
    """
    if addr < 0 or length < 0:
        raise MemoryFault(addr, length, write, "negative address or length")
    end = addr + length
    if end > ADDRESS_LIMIT:
        raise MemoryFault(addr, length, write, "range overflows the 64-bit address space")
    if addr < base or end > base + size:
        raise MemoryFault(addr, length, write, f"outside [{base:#x}, {base + size:#x})")
    return addr - base


class FlatMemory:
    """One contiguous buffer at a bus base address; every access is bounds-checked.

    ``FlatMemory(65536)`` owns a zeroed bytearray; ``FlatMemory(buf, base=...)``
    wraps an existing writable buffer (an mmap, a shared-memory block) without
    copying it. ``read_only=True`` refuses writable views.
    """

    __slots__ = ("_mv", "base", "read_only", "size")

    def __init__(
        self, buf: int | bytearray | memoryview, *, base: int = 0, read_only: bool = False
    ) -> None:
        raw = bytearray(buf) if isinstance(buf, int) else buf
        self._mv = memoryview(raw).cast("B")
        self.base = base
        self.size = len(self._mv)
        self.read_only = read_only

    def view(self, addr: int, length: int, write: bool = False) -> memoryview:
        off = addr - self.base
        # hot path (one check per descriptor): the full diagnosis only on failure
        if off < 0 or length < 0 or off + length > self.size or (write and self.read_only):
            if write and self.read_only:
                raise MemoryFault(addr, length, write, "memory is read-only")
            check_range(addr, length, self.base, self.size, write)
        return self._mv[off : off + length]

    def raw(self) -> memoryview:
        """The whole buffer (for the owner, e.g. to zero or inspect it)."""
        return self._mv


# subclassed by the host's and the card's RAM allocators (interpreted code)
@mypyc_attr(allow_interpreted_subclasses=True)
class FirstFitAllocator:
    """First-fit allocator of blocks over addresses ``[start, end)``; adjacent free
    blocks are merged on :meth:`free`.

    Sizes round up to ``granule`` (the X100 DMA granule, 64 B, on the card; a
    page for the host's vrings); ``align`` defaults to the granule. One
    implementation for every heap in the system: host RAM (vrings), card RAM
    (driver buffers, used rings), accelerator queue heaps.
    """

    def __init__(self, start: int, end: int, *, granule: int = 64, what: str = "memory") -> None:
        """Raises: LocalProtocolError: a bad granule or range."""
        if granule <= 0 or granule & (granule - 1) or start % granule or end < start:
            raise LocalProtocolError(f"bad {what} range [{start:#x}, {end:#x}) for {granule} B")
        self.start = start
        self.end = end
        self.granule = granule
        self.what = what
        self._free: list[tuple[int, int]] = [(start, end - start)] if end > start else []
        self._used: dict[int, int] = {}  # addr -> block size

    @property
    def free_bytes(self) -> int:
        return sum(n for _, n in self._free)

    def alloc(self, size: int, align: int = 0) -> int:
        """A fresh block of ``size`` bytes (rounded up to the granule) aligned to
        ``align`` (default: the granule).

        Raises:
            LocalProtocolError: ``size`` <= 0 or ``align`` not a power of two.
            ResourceError: no free block is large enough.
        """
        align = align or self.granule
        if size <= 0 or align & (align - 1):
            raise LocalProtocolError(f"allocation of {size} B aligned {align}")
        g = self.granule
        size = -(-size // g) * g
        for i, (off, n) in enumerate(self._free):
            addr = -(-off // align) * align
            if addr + size <= off + n:
                del self._free[i]
                # keep the leading and trailing remainders free
                if addr > off:
                    bisect.insort(self._free, (off, addr - off))
                if addr + size < off + n:
                    bisect.insort(self._free, (addr + size, off + n - addr - size))
                self._used[addr] = size
                return addr
        raise ResourceError(f"{self.what} exhausted: no {size} B block aligned {align}")

    def free(self, addr: int) -> None:
        """Return a block.

        Raises:
            LocalProtocolError: ``addr`` is not an allocated block.
        """
        size = self._used.pop(addr, None)
        if size is None:
            raise LocalProtocolError(f"{addr:#x} is not an allocated block")
        free = self._free
        i = bisect.bisect_left(free, (addr, 0))
        free.insert(i, (addr, size))
        if i + 1 < len(free) and addr + size == free[i + 1][0]:
            free[i] = (addr, size + free[i + 1][1])
            del free[i + 1]
        if i > 0 and free[i - 1][0] + free[i - 1][1] == addr:
            free[i - 1] = (free[i - 1][0], free[i - 1][1] + free[i][1])
            del free[i]
