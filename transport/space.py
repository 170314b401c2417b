"""Address spaces and SMPT windows: every access is bounds- and permission-checked.

Owns the card-physical address map and its translation (X100,
drivers/misc/mic/host/mic_x100.h and mic_smpt.c)::

    0 .. card_ram_size                     card RAM (the host reaches it through
                                           the aperture, BAR0, at the same addresses)
    SMPT_BASE + off (0x80_0000_0000 + off) host RAM offset ``off``, but only inside
                                           a window the host opened, with its perms

The real SMPT has 32 entries of 16 GiB; here a window is any 4 KiB-aligned
range of the host RAM region, placed at ``SMPT_BASE + host_offset`` (identity
plus base, which is what the 16 GiB pages give a host whose RAM fits in one
page). The table lives in the shared MMIO region (seqlock: the generation is
odd while the host rewrites an entry) so the card sees opens and closes at
once; the card caches its parsed copy per generation. The host's own checks
use its private copy, so a card that scribbles on the shared table cannot make
the host touch memory outside a window (the card itself is trusted only to
the extent that it holds the host-RAM fd: protection against bugs, not against
a hostile process of the same user).

A refused access raises :class:`~transport.errors.WindowFault`, is counted in
``faults`` and reported (log + callbacks); it never touches memory and never
brings the process down. A view obtained before a window closed stays usable
(an in-flight PCIe transaction), so callers take views per access.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntFlag

from transport.errors import WindowFault
from transport.mmio import H_SMPT_GEN, SMPT_ENTRIES, SMPT_ENTRY_WORDS, SMPT_WORD_BASE
from transport.region import PAGE_SIZE, Region
from virtio.errors import LocalProtocolError
from virtio.memory import ADDRESS_LIMIT, MemoryFault

__all__ = [
    "SMPT_BASE",
    "CardAddressSpace",
    "FaultLog",
    "HostAddressSpace",
    "Perm",
    "SharedRange",
    "SmptTable",
    "Window",
]

log = logging.getLogger(__name__)

#: Card-physical address of SMPT page 0 (mic_x100.c: mic_x100_smpt_hw_info.base = 0x8000000000).
SMPT_BASE = 0x80_0000_0000
_MASK64 = (1 << 64) - 1


class Perm(IntFlag):
    """What the card may do through a window."""

    NONE = 0
    READ = 1
    WRITE = 2
    RW = 3


@dataclass(frozen=True, slots=True)
class Window:
    """An open SMPT window: host RAM ``[host_offset, host_offset+size)`` at ``card_addr``."""

    index: int
    host_offset: int
    size: int
    perm: Perm

    @property
    def card_addr(self) -> int:
        """The card-physical (bus) address of the window's first byte."""
        return SMPT_BASE + self.host_offset

    def addr(self, offset: int = 0) -> int:
        """Bus address of ``offset`` bytes into the window."""
        return SMPT_BASE + self.host_offset + offset


@dataclass(frozen=True, slots=True)
class SharedRange:
    """A card-physical range backed by a shareable file: ``size`` bytes at ``bus``
    are bytes ``[offset, offset + size)`` of ``fd`` (a memfd; the fd stays its
    region's, a user that needs it longer dups it). What an external process
    must map to follow the card's descriptors (a vhost-user memory table).
    """

    bus: int
    size: int
    fd: int
    offset: int


class FaultLog:
    """Counts refused accesses and reports them (logger + callbacks)."""

    __slots__ = ("_callbacks", "count", "last", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.count = 0
        self.last: MemoryFault | None = None
        self._callbacks: list[Callable[[MemoryFault], None]] = []

    def add_callback(self, cb: Callable[[MemoryFault], None]) -> None:
        """Call ``cb(fault)`` for every refused access (must not raise)."""
        self._callbacks.append(cb)

    def record(self, fault: MemoryFault) -> MemoryFault:
        self.count += 1
        self.last = fault
        n = self.count
        if n <= 10 or n % 1000 == 0:
            log.warning("%s address space: fault #%d: %s", self.name, n, fault)
        for cb in self._callbacks:
            cb(fault)
        return fault


def _parse_table(w: memoryview, host_size: int) -> tuple[Window, ...]:
    out = []
    for i in range(SMPT_ENTRIES):
        b = SMPT_WORD_BASE + i * SMPT_ENTRY_WORDS
        off, size, perm, valid = w[b], w[b + 1], w[b + 2], w[b + 3]
        if valid and size and off + size <= host_size:
            out.append(Window(i, off, size, Perm(perm & Perm.RW)))
    return tuple(out)


_Range = tuple[int, int, bool, bool, int]  # host lo, host hi, readable, writable, slot


def _ranges(windows: tuple[Window, ...]) -> tuple[_Range, ...]:
    """Plain-int form of the windows for the hot path (IntFlag ops cost ~1 µs each)."""
    return tuple(
        (
            w.host_offset,
            w.host_offset + w.size,
            bool(w.perm & Perm.READ),
            bool(w.perm & Perm.WRITE),
            w.index,
        )
        for w in windows
    )


class SmptTable:
    """The host's SMPT: opens and closes windows into host RAM for the card.

    Writes the shared table (seqlock) and keeps a private copy for host-side
    checks. Windows are 4 KiB-aligned, inside host RAM, and never overlap.
    """

    def __init__(self, mmio_words: memoryview, host_ram_size: int) -> None:
        self._w = mmio_words
        self._host_size = host_ram_size
        self._windows: dict[int, Window] = {}
        self._snapshot: tuple[Window, ...] = ()
        self.ranges: tuple[_Range, ...] = ()

    @property
    def windows(self) -> tuple[Window, ...]:
        """The open windows, by slot (the host's authoritative copy)."""
        return self._snapshot

    @property
    def generation(self) -> int:
        return int(self._w[H_SMPT_GEN])

    def open(self, host_offset: int, size: int, perm: Perm = Perm.RW) -> Window:
        """Open a window on host RAM ``[host_offset, host_offset+size)`` for the card.

        Raises:
            LocalProtocolError: misaligned, empty, outside host RAM, overlapping an
                open window, or all 32 slots in use.
        """
        if host_offset % PAGE_SIZE or size % PAGE_SIZE or size <= 0 or host_offset < 0:
            raise LocalProtocolError(
                f"window [{host_offset:#x}, +{size:#x}) must be non-empty and 4 KiB-aligned"
            )
        if host_offset + size > self._host_size:
            raise LocalProtocolError(
                f"window [{host_offset:#x}, +{size:#x}) exceeds host RAM ({self._host_size:#x})"
            )
        for w in self._windows.values():
            if host_offset < w.host_offset + w.size and w.host_offset < host_offset + size:
                raise LocalProtocolError(f"window overlaps open window {w}")
        free = next((i for i in range(SMPT_ENTRIES) if i not in self._windows), None)
        if free is None:
            raise LocalProtocolError(f"all {SMPT_ENTRIES} SMPT entries are in use")
        win = Window(free, host_offset, size, Perm(perm & Perm.RW))
        self._write(free, win)
        return win

    def close(self, window: Window | int) -> None:
        """Close a window (by object or slot); later accesses through it fault.

        Raises:
            LocalProtocolError: the slot is not open.
        """
        idx = window if isinstance(window, int) else window.index
        if idx not in self._windows:
            raise LocalProtocolError(f"SMPT slot {idx} is not open")
        self._write(idx, None)

    def close_all(self) -> None:
        for idx in list(self._windows):
            self._write(idx, None)

    def _write(self, idx: int, win: Window | None) -> None:
        w = self._w
        b = SMPT_WORD_BASE + idx * SMPT_ENTRY_WORDS
        g = w[H_SMPT_GEN]
        w[H_SMPT_GEN] = (g + 1) & _MASK64  # odd: update in progress (seqlock writer)
        if win is None:
            w[b + 3] = 0
            w[b], w[b + 1], w[b + 2] = 0, 0, 0
            del self._windows[idx]
        else:
            w[b], w[b + 1], w[b + 2] = win.host_offset, win.size, int(win.perm)
            w[b + 3] = 1
            self._windows[idx] = win
        w[H_SMPT_GEN] = (g + 2) & _MASK64
        self._snapshot = tuple(self._windows[i] for i in sorted(self._windows))
        self.ranges = _ranges(self._snapshot)


class _Space:
    """Shared translation: card RAM at 0, host RAM through windows at SMPT_BASE."""

    name = "?"

    def __init__(self, card_ram: Region, host_ram: Region) -> None:
        self._card = card_ram.view()
        self._card_size = card_ram.size
        self._host = host_ram.view()
        self._host_size = host_ram.size
        self.faults = FaultLog(self.name)

    def _windows(self) -> tuple[Window, ...] | None:
        raise NotImplementedError

    def _ranges(self) -> tuple[_Range, ...] | None:
        raise NotImplementedError

    @property
    def windows(self) -> tuple[Window, ...]:
        """The windows this side currently honours."""
        return self._windows() or ()

    @property
    def card_ram_size(self) -> int:
        return self._card_size

    def _fault(self, addr: int, length: int, write: bool, why: str) -> WindowFault:
        f = WindowFault(addr, length, write, why, space=self.name)
        self.faults.record(f)
        return f

    def view(self, addr: int, length: int, write: bool = False) -> memoryview:
        """A view of exactly ``length`` bytes at card-physical ``addr``.

        Raises:
            WindowFault: outside card RAM and every open window, through a window
                without the needed permission, or a negative/overflowing range.
        """
        end = addr + length
        if addr < 0 or length < 0 or end > ADDRESS_LIMIT:
            raise self._fault(addr, length, write, "negative or overflowing range")
        if end <= self._card_size:
            return self._card[addr:end]
        if addr >= SMPT_BASE:
            off = addr - SMPT_BASE
            hi = off + length
            ranges = self._ranges()
            if ranges is None:  # host view without window enforcement
                if hi <= self._host_size:
                    return self._host[off:hi]
                raise self._fault(addr, length, write, "outside host RAM")
            for lo, top, readable, writable, idx in ranges:
                if lo <= off and hi <= top:
                    if write and not writable:
                        raise self._fault(addr, length, write, f"window {idx} is read-only")
                    if not write and not readable:
                        raise self._fault(addr, length, write, f"window {idx} is write-only")
                    mv = self._host[off:hi]
                    return mv if writable else mv.toreadonly()
            raise self._fault(addr, length, write, "not inside an open SMPT window")
        raise self._fault(addr, length, write, f"outside card RAM (size {self._card_size:#x})")

    def release(self) -> None:
        """Drop the views of the regions (call before closing them)."""
        self._card.release()
        self._host.release()


class HostAddressSpace(_Space):
    """The host's view of card-physical addresses (implements ``virtio.memory.Memory``).

    Card RAM through the aperture at ``0..card_ram_size``; the host's own RAM at
    ``SMPT_BASE + offset`` — by default only inside the windows opened for the
    card (``enforce_windows=True``), so an address the card wrote into a
    descriptor is honoured only if the card could legitimately have reached it.
    """

    name = "host"

    def __init__(
        self, card_ram: Region, host_ram: Region, smpt: SmptTable, *, enforce_windows: bool = True
    ) -> None:
        super().__init__(card_ram, host_ram)
        self._smpt = smpt
        self.enforce_windows = enforce_windows
        self._regions = (card_ram, host_ram)

    def shared_ranges(self) -> tuple[SharedRange, ...]:
        """What the card can reach for reading and writing, as file ranges: card RAM,
        then each read-write SMPT window (all of host RAM without enforcement).
        Read-only or write-only windows are left out: a file mapping cannot
        carry their restriction.

        Raises:
            ClosedResourceError: a region was closed.
        """
        card, host = self._regions
        out = [SharedRange(0, self._card_size, card.fd, 0)]
        wins = self._windows()
        if wins is None:
            out.append(SharedRange(SMPT_BASE, self._host_size, host.fd, 0))
        else:
            out.extend(
                SharedRange(w.card_addr, w.size, host.fd, w.host_offset)
                for w in wins
                if w.perm & Perm.RW == Perm.RW
            )
        return tuple(out)

    def _windows(self) -> tuple[Window, ...] | None:
        return self._smpt.windows if self.enforce_windows else None

    def _ranges(self) -> tuple[_Range, ...] | None:
        return self._smpt.ranges if self.enforce_windows else None


class CardAddressSpace(_Space):
    """The card's physical address space (implements ``virtio.memory.Memory``).

    Card RAM at ``0..card_ram_size``; host RAM only through the SMPT windows
    the host opened, read from the shared table (re-parsed when its
    generation changes).
    """

    name = "card"

    def __init__(self, card_ram: Region, host_ram: Region, mmio_words: memoryview) -> None:
        super().__init__(card_ram, host_ram)
        self._w = mmio_words
        self._gen = -1
        self._cache: tuple[Window, ...] = ()
        self._cache_ranges: tuple[_Range, ...] = ()

    def _ranges(self) -> tuple[_Range, ...]:
        if self._w[H_SMPT_GEN] != self._gen:
            self._reload()
        return self._cache_ranges

    def _windows(self) -> tuple[Window, ...]:
        if self._w[H_SMPT_GEN] != self._gen:
            self._reload()
        return self._cache

    def _reload(self) -> None:
        w = self._w
        for _ in range(10_000):
            g1 = w[H_SMPT_GEN]
            if g1 & 1:  # host is mid-update (seqlock)
                continue
            table = _parse_table(w, self._host_size)
            if w[H_SMPT_GEN] == g1:  # x86 TSO keeps the loads in order
                self._gen, self._cache, self._cache_ranges = g1, table, _ranges(table)
                return
        # a host stuck mid-update: no window is trustworthy
        self._cache, self._cache_ranges = (), ()
