"""Shared-memory regions: anonymous memfd files mapped into both processes.

Owns creation, sealing, adoption (from a received fd) and mapping of regions.
Nothing is ever named in /dev/shm: a memfd lives exactly as long as its last fd
or mapping, so a process that dies leaves nothing behind.

Regions are sealed against shrinking and growing (``F_SEAL_SHRINK|F_SEAL_GROW``)
before they are handed over, and the receiver checks the seals and the size:
otherwise a peer could truncate the file and turn every later access of ours
into a SIGBUS (memfd_create(2), "File sealing").
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
from types import TracebackType

from transport.errors import RegionError
from virtio.errors import ClosedResourceError

__all__ = ["PAGE_SIZE", "Region"]

PAGE_SIZE = 4096
_REQUIRED_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW


class Region:
    """A sized, memfd-backed, shared mapping.

    ``Region.create("card_ram", 64 << 20)`` makes a new one;
    ``Region.adopt("card_ram", fd, size)`` maps one received from the peer and
    takes ownership of ``fd``. ``view()`` is the whole mapping as a writable
    memoryview. ``close()`` drops the fd and the mapping; if sub-views are still
    alive the mapping stays until the last of them is released (mmap semantics),
    but the region refuses any further use.
    """

    __slots__ = ("_fd", "_mm", "_mv", "name", "size")

    def __init__(self, name: str, fd: int, size: int) -> None:
        self.name = name
        self.size = size
        self._fd: int | None = fd
        try:
            self._mm: mmap.mmap | None = mmap.mmap(fd, size, mmap.MAP_SHARED)
        except (OSError, ValueError) as e:
            os.close(fd)
            self._fd = None
            raise RegionError(f"cannot map region {name!r} ({size} B): {e}") from e
        self._mv: memoryview | None = memoryview(self._mm)

    @classmethod
    def create(cls, name: str, size: int) -> Region:
        """Create a zeroed, sealed region of ``size`` bytes (a multiple of 4 KiB).

        Raises:
            RegionError: bad size, or the kernel refused the memfd.
        """
        if size <= 0 or size % PAGE_SIZE:
            raise RegionError(f"region {name!r}: size {size} is not a positive multiple of 4 KiB")
        try:
            fd = os.memfd_create(f"mic-vop:{name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except OSError as e:
            raise RegionError(f"memfd_create({name!r}) failed: {e}") from e
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _REQUIRED_SEALS | fcntl.F_SEAL_SEAL)
        except OSError as e:
            os.close(fd)
            raise RegionError(f"cannot size/seal region {name!r}: {e}") from e
        return cls(name, fd, size)

    @classmethod
    def adopt(cls, name: str, fd: int, size: int) -> Region:
        """Map a region received from the peer; takes ownership of ``fd`` (closed on error).

        Raises:
            RegionError: not a sealed memfd of exactly ``size`` bytes.
        """
        try:
            st = os.fstat(fd)
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError as e:
            os.close(fd)
            raise RegionError(f"region {name!r}: fd {fd} is not a memfd: {e}") from e
        if st.st_size != size or size <= 0 or size % PAGE_SIZE:
            os.close(fd)
            raise RegionError(f"region {name!r}: file is {st.st_size} B, announced {size} B")
        if seals & _REQUIRED_SEALS != _REQUIRED_SEALS:
            os.close(fd)
            raise RegionError(f"region {name!r}: not sealed against shrink/grow (seals {seals:#x})")
        return cls(name, fd, size)

    @property
    def fd(self) -> int:
        """The memfd (for handing it to the peer). Raises ClosedResourceError after close."""
        if self._fd is None:
            raise ClosedResourceError(f"region {self.name!r} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._mv is None

    def view(self) -> memoryview:
        """A new writable view of the whole region (the caller may ``release()`` it).

        Raises:
            ClosedResourceError: the region is closed.
        """
        if self._mv is None:
            raise ClosedResourceError(f"region {self.name!r} is closed")
        return self._mv[:]

    def close(self) -> None:
        """Release the fd and the mapping (idempotent)."""
        if self._mv is not None:
            self._mv.release()
            self._mv = None
        if self._mm is not None:
            # Sub-views still exported: the kernel mapping lives until the last
            # one is garbage-collected; nothing leaks past that.
            with contextlib.suppress(BufferError):
                self._mm.close()
            self._mm = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Region:
        return self

    def __exit__(
        self,
        et: type[BaseException] | None,
        e: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._fd}"
        return f"Region({self.name!r}, size={self.size:#x}, {state})"
