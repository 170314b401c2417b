"""The memory protocol the ring core works on, and a flat in-process memory.

The ring core never maps anything: it is handed an object that turns a bus
address and a length into a bounds- and permission-checked ``memoryview``.
``transport`` provides the real ones (memfd regions seen through PCIe windows);
:class:`FlatMemory` here is the plain one used by tests, benchmarks and
single-process pairs. Must not import asyncio, the OS, or ``transport``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from virtio.errors import MicError

__all__ = ["ADDRESS_LIMIT", "FlatMemory", "Memory", "MemoryFault", "check_range"]

#: Bus addresses are 64-bit; ``addr + length`` must not pass this.
ADDRESS_LIMIT = 1 << 64


class MemoryFault(MicError):
    """An access outside the memory (or its open windows), or without permission.

    Attributes say exactly what was refused so a fault can be counted and
    reported; the access itself never happened.
    """

    def __init__(self, addr: int, length: int, write: bool, why: str) -> None:
        kind = "write" if write else "read"
        super().__init__(f"{kind} of {length} B at {addr:#x} refused: {why}")
        self.addr = addr
        self.length = length
        self.write = write
        self.why = why


@runtime_checkable
class Memory(Protocol):
    """Bus memory as one side sees it.

    ``view`` returns a writable-or-readonly memoryview of exactly ``length``
    bytes starting at bus address ``addr``, or raises :class:`MemoryFault`
    (outside memory, outside an open window, no permission, or address
    overflow). It never returns a shorter view.
    """

    def view(self, addr: int, length: int, write: bool = False) -> memoryview: ...


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
