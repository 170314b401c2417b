"""The memory protocol the ring core works on (:class:`Memory`) and its fault.

Owns the :class:`Memory` protocol and :class:`MemoryFault` (which the
transport subclasses); :mod:`virtio.memory` re-exports both next to its
implementations, so ``from virtio.memory import Memory`` is the
public path. It lives apart because :mod:`virtio.memory` may be compiled
with mypyc (``tools/mypyc_build.py``), and a compiled module cannot define a
``runtime_checkable`` protocol: this module always stays interpreted, so
``isinstance(x, Memory)`` and subclasses of :class:`MemoryFault` work
either way. Imports only ``typing`` and :mod:`virtio.errors`; must
not import asyncio, the OS, or ``transport``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from virtio.errors import MicError

__all__ = ["Memory", "MemoryFault"]


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
    bytes starting at bus address ``addr``, or raises
    :class:`MemoryFault` (outside memory, outside an open
    window, no permission, or address overflow). It never returns a shorter view.
    """

    def view(self, addr: int, length: int, write: bool = False) -> memoryview: ...
