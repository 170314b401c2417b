"""A vhost-user front-end's memory table, mapped: the ring core's ``Memory`` protocol.

Owns :class:`GuestMemory`: the regions of SET_MEM_TABLE, each mmap'd from the
fd that came with it (``MAP_SHARED``, as libvhost-user maps them), seen by
guest-physical address (what descriptors carry) and translated from the
front-end's user addresses (what SET_VRING_ADDR carries). Every access is
checked, like the PCIe windows: a range that is not wholly inside one region
raises :class:`~virtio.memory.MemoryFault` and nothing is touched.

The table is checked before anything is mapped: zero-sized regions,
overlapping guest-physical or user ranges, and fds too small for
``mmap_offset + memory_size`` are refused with a
:class:`~virtio.errors.RemoteProtocolError` naming the region.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import mmap
import os
import stat

from transport.vhost_user.protocol import MemRegion
from virtio.errors import RemoteProtocolError
from virtio.memory import MemoryFault, check_range

__all__ = ["GuestMemory"]


def _overlap(spans: list[tuple[int, int, int]], what: str) -> None:
    spans = sorted(spans)
    for (a, n, i), (b, _, j) in itertools.pairwise(spans):
        if a + n > b:
            raise RemoteProtocolError(
                f"memory table: regions {i} and {j} overlap in {what} addresses",
                reason="vhost-user",
            )


class GuestMemory:
    """The front-end's regions, mapped; bus addresses are guest-physical.

    Built with :meth:`map`, released with :meth:`close` (views still held by
    someone keep their mapping alive until they are dropped).
    """

    def __init__(self, regions: list[MemRegion], maps: list[mmap.mmap], offsets: list[int]) -> None:
        order = sorted(range(len(regions)), key=lambda i: regions[i].guest_phys_addr)
        self.regions = [regions[i] for i in order]
        self._maps = [maps[i] for i in order]
        self._views = [
            memoryview(m)[off : off + r.memory_size]
            for m, off, r in zip(self._maps, (offsets[i] for i in order), self.regions, strict=True)
        ]
        self._starts = [r.guest_phys_addr for r in self.regions]

    @classmethod
    def map(cls, regions: list[MemRegion], fds: list[int]) -> GuestMemory:
        """Check the table and map every region from its fd (the fds stay the caller's).

        Raises:
            RemoteProtocolError: a zero-sized region, overlapping regions, an fd
                that is not a shareable file or is too small, or a failed mmap.
        """
        if len(regions) != len(fds):
            raise RemoteProtocolError(
                f"memory table: {len(regions)} regions but {len(fds)} fds", reason="vhost-user"
            )
        for i, r in enumerate(regions):
            if r.memory_size == 0:
                raise RemoteProtocolError(
                    f"memory table: region {i} is zero-sized", reason="vhost-user"
                )
        _overlap([(r.guest_phys_addr, r.memory_size, i) for i, r in enumerate(regions)], "guest")
        _overlap([(r.userspace_addr, r.memory_size, i) for i, r in enumerate(regions)], "user")
        maps: list[mmap.mmap] = []
        offsets: list[int] = []
        try:
            for i, (r, fd) in enumerate(zip(regions, fds, strict=True)):
                try:
                    st = os.fstat(fd)
                except OSError as e:
                    raise RemoteProtocolError(
                        f"memory table: region {i} fd: {e.strerror}", reason="vhost-user"
                    ) from e
                need = r.mmap_offset + r.memory_size
                if not stat.S_ISREG(st.st_mode):
                    raise RemoteProtocolError(
                        f"memory table: region {i} fd is not a memory file (memfd, shm, hugetlbfs)",
                        reason="vhost-user",
                    )
                if st.st_size < need:
                    raise RemoteProtocolError(
                        f"memory table: region {i} needs {need} B of its fd, "
                        f"which has {st.st_size}",
                        reason="vhost-user",
                    )
                # map from the largest granule-aligned offset (libvhost-user maps from 0)
                base = r.mmap_offset - r.mmap_offset % mmap.ALLOCATIONGRANULARITY
                try:
                    m = mmap.mmap(
                        fd,
                        need - base,
                        flags=mmap.MAP_SHARED,
                        prot=mmap.PROT_READ | mmap.PROT_WRITE,
                        offset=base,
                    )
                except (OSError, ValueError, OverflowError) as e:
                    raise RemoteProtocolError(
                        f"memory table: region {i} cannot be mapped: {e}", reason="vhost-user"
                    ) from e
                maps.append(m)
                offsets.append(r.mmap_offset - base)
        except BaseException:
            for m in maps:
                m.close()
            raise
        return cls(regions, maps, offsets)

    def view(self, addr: int, length: int, write: bool = False) -> memoryview:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            r = self.regions[i]
            off = addr - r.guest_phys_addr
            if length >= 0 and off + length <= r.memory_size:
                return self._views[i][off : off + length]
            check_range(addr, length, r.guest_phys_addr, r.memory_size, write)
        raise MemoryFault(addr, length, write, "not inside one region of the memory table")

    def uva_to_gpa(self, uva: int, length: int, what: str) -> int:
        """The guest-physical address of a front-end user range (SET_VRING_ADDR).

        Raises:
            RemoteProtocolError: the range is not wholly inside one region.
        """
        for r in self.regions:
            off = uva - r.userspace_addr
            if off >= 0 and off + length <= r.memory_size:
                return r.guest_phys_addr + off
        raise RemoteProtocolError(
            f"{what} at user address {uva:#x} (+{length} B) is outside the mapped regions",
            reason="vhost-user",
        )

    def close(self) -> None:
        """Release the mappings (one still viewed is unmapped once its views go)."""
        for v in self._views:
            with contextlib.suppress(BufferError):
                v.release()
        for m in self._maps:
            with contextlib.suppress(BufferError):
                m.close()
        self._views = []
        self._maps = []
        self._starts = []
        self.regions = []
