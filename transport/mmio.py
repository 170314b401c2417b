"""The emulated MMIO BAR: header, scratchpads, SMPT table, doorbell/vector banks.

Owns the byte layout of the shared MMIO region and the per-side object
(:class:`Mmio`) that exposes it: scratchpads, outgoing doorbells, incoming
interrupt vectors and their eventfds. The SMPT window *semantics* live in
``transport.space``; this module only reserves the table's place.

Layout (all words little-endian u64 unless said otherwise, offsets in bytes)::

    0x000  magic "MICMMIO1", layout version, #h2c doorbells, #c2h doorbells,
           #card vectors, #host vectors, #SMPT entries, SMPT generation (seqlock)
    0x040  SPAD0..SPAD15, u32 each (X100 SBOX scratchpads; the host writes the
           device-page address into SPAD14 (low) / SPAD15 (high), as
           mic_x100_write_spad(MIC_DPLO_SPAD/MIC_DPHI_SPAD) does in
           drivers/misc/mic/host/mic_boot.c — here as one 8-byte store)
    0x100  SMPT: 32 entries x 32 B {host_offset, size, perm, valid}
    0x800  bank h2c (host rings, card receives), then bank c2h:
             db_count[n_db]  (ringer)   db_ack[n_db] (receiver)
             db_route[n_db]  (receiver: doorbell -> vector)
             vectors[n_vec] x 64 B {count (ringer), armed, mask (receiver), pad}

Each word has exactly one writing side, so no cross-process read-modify-write
is ever needed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import IntEnum

from transport.errors import HandshakeError
from transport.notify import VEC_WORDS, Doorbell, NotifyPolicy, Vector
from transport.region import PAGE_SIZE, Region
from virtio.errors import ClosedResourceError, LocalProtocolError

__all__ = [
    "MMIO_MAGIC",
    "MMIO_VERSION",
    "NUM_SPADS",
    "SPAD_DPLO",
    "SPAD_DPHI",
    "SMPT_ENTRIES",
    "Direction",
    "Mmio",
    "MmioLayout",
    "Scratchpads",
    "Side",
]

MMIO_MAGIC = int.from_bytes(b"MICMMIO1", "little")
MMIO_VERSION = 1
NUM_SPADS = 16
SPAD_DPLO = 14  # drivers/misc/mic/host/mic_x100.h: MIC_DPLO_SPAD
SPAD_DPHI = 15  # MIC_DPHI_SPAD
SMPT_ENTRIES = 32  # X100: 32 SMPT entries (mic_x100.h MIC_X100_NUM_SMPT_ENTRIES)
MAX_DOORBELLS = 64
MAX_VECTORS = 64

# word indices of the header
H_MAGIC, H_VERSION, H_N_H2C, H_N_C2H, H_N_CARD_VEC, H_N_HOST_VEC, H_N_SMPT, H_SMPT_GEN = range(8)
SPAD_BYTE_OFFSET = 0x40
SMPT_WORD_BASE = 0x100 // 8
SMPT_ENTRY_WORDS = 4
_BANK_WORD_BASE = 0x800 // 8


class Side(IntEnum):
    HOST = 0
    CARD = 1


class Direction(IntEnum):
    """A doorbell bank, named after who rings → who receives."""

    H2C = 0  #: rung by the host, received on card vectors
    C2H = 1  #: rung by the card, received on host (MSI-X) vectors


@dataclass(frozen=True, slots=True)
class BankLayout:
    n_db: int
    n_vec: int
    db_count: int  # word index of db_count[0]
    db_ack: int
    db_route: int
    vec_base: int
    end: int


@dataclass(frozen=True, slots=True)
class MmioLayout:
    """Sizes of the register banks (X100: 16 host→card, 4 card→host doorbells; default 16/16)."""

    h2c_doorbells: int = 16
    c2h_doorbells: int = 16
    card_vectors: int = 16
    host_vectors: int = 16

    def __post_init__(self) -> None:
        for name, n, top in (
            ("h2c_doorbells", self.h2c_doorbells, MAX_DOORBELLS),
            ("c2h_doorbells", self.c2h_doorbells, MAX_DOORBELLS),
            ("card_vectors", self.card_vectors, MAX_VECTORS),
            ("host_vectors", self.host_vectors, MAX_VECTORS),
        ):
            if not 1 <= n <= top:
                raise ValueError(f"{name} = {n}: must be in 1..{top}")

    @classmethod
    def single(cls) -> MmioLayout:
        """One doorbell and one vector each way (an accelerator queue, channel or mgmt unit)."""
        return cls(h2c_doorbells=1, c2h_doorbells=1, card_vectors=1, host_vectors=1)

    def bank(self, d: Direction) -> BankLayout:
        h2c = self._bank(_BANK_WORD_BASE, self.h2c_doorbells, self.card_vectors)
        if d is Direction.H2C:
            return h2c
        return self._bank(h2c.end, self.c2h_doorbells, self.host_vectors)

    @staticmethod
    def _bank(start: int, n_db: int, n_vec: int) -> BankLayout:
        db_count = start
        db_ack = db_count + n_db
        db_route = db_ack + n_db
        vec_base = (db_route + n_db + VEC_WORDS - 1) // VEC_WORDS * VEC_WORDS
        return BankLayout(
            n_db, n_vec, db_count, db_ack, db_route, vec_base, vec_base + n_vec * VEC_WORDS
        )

    @property
    def size(self) -> int:
        end = self.bank(Direction.C2H).end * 8
        return (end + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE

    def header(self) -> tuple[int, ...]:
        return (
            MMIO_MAGIC,
            MMIO_VERSION,
            self.h2c_doorbells,
            self.c2h_doorbells,
            self.card_vectors,
            self.host_vectors,
            SMPT_ENTRIES,
        )


class Scratchpads:
    """SPAD0..15 (u32 registers both sides can read and write)."""

    __slots__ = ("_u32", "_words")

    def __init__(self, region: Region) -> None:
        mv = region.view()
        self._u32 = mv[SPAD_BYTE_OFFSET : SPAD_BYTE_OFFSET + 4 * NUM_SPADS].cast("I")
        self._words = mv[SPAD_BYTE_OFFSET : SPAD_BYTE_OFFSET + 4 * NUM_SPADS].cast("Q")

    def __len__(self) -> int:
        return NUM_SPADS

    def read(self, i: int) -> int:
        """Read SPAD ``i`` (raises IndexError outside 0..15)."""
        return int(self._u32[i])

    def write(self, i: int, value: int) -> None:
        """Write SPAD ``i`` (u32; raises ValueError outside 0..2**32-1)."""
        if not 0 <= value < 1 << 32:
            raise ValueError(f"SPAD{i}: {value:#x} does not fit in 32 bits")
        self._u32[i] = value

    def set_device_page(self, addr: int) -> None:
        """Publish the device-page bus address in SPAD14/15 (one 8-byte store)."""
        if not 0 <= addr < 1 << 64:
            raise ValueError(f"device page address {addr:#x} is not a 64-bit address")
        self._words[SPAD_DPLO // 2] = addr

    def device_page(self) -> int:
        """The device-page address from SPAD14/15 (0 = not published yet)."""
        return int(self._words[SPAD_DPLO // 2])

    def release(self) -> None:
        self._u32.release()
        self._words.release()


class Mmio:
    """One side's view of the MMIO BAR.

    Host: ``Mmio.create(layout)`` makes the region and all eventfds (they are
    handed to the card in the handshake). Card: ``Mmio.adopt(region, layout,
    h2c_efds, c2h_efds)``. Outgoing doorbells (``doorbell(i).ring()``) are the
    h2c bank on the host and the c2h bank on the card; incoming vectors
    (``await vector(v).wait()``) the other one. By default doorbell *i* routes
    to vector ``i % n_vectors``; the receiver may re-route with :meth:`route`.
    """

    def __init__(
        self,
        side: Side,
        region: Region,
        layout: MmioLayout,
        h2c_efds: tuple[int, ...],
        c2h_efds: tuple[int, ...],
        policy: NotifyPolicy,
    ) -> None:
        self.side = side
        self.layout = layout
        self._region = region
        self._efds = (h2c_efds, c2h_efds)
        self.words = region.view().cast("Q")
        self.spad = Scratchpads(region)
        out_dir, in_dir = (
            (Direction.H2C, Direction.C2H) if side is Side.HOST else (Direction.C2H, Direction.H2C)
        )
        ob, ib = layout.bank(out_dir), layout.bank(in_dir)
        self._in_bank = ib
        self._doorbells = tuple(
            Doorbell(
                i,
                self.words,
                count_idx=ob.db_count + i,
                route_idx=ob.db_route + i,
                vec_base=ob.vec_base,
                efds=self._efds[out_dir],
            )
            for i in range(ob.n_db)
        )
        self._vectors = tuple(
            Vector(
                v,
                self.words,
                base=ib.vec_base + v * VEC_WORDS,
                efd=self._efds[in_dir][v],
                policy=policy,
            )
            for v in range(ib.n_vec)
        )
        self._closed = False

    @classmethod
    def create(cls, layout: MmioLayout, policy: NotifyPolicy | None = None) -> Mmio:
        """Host side: a fresh MMIO region, its header, default routes and eventfds."""
        region = Region.create("mmio", layout.size)
        efds: list[int] = []
        try:
            w = region.view().cast("Q")
            for i, value in enumerate(layout.header()):
                w[i] = value
            for d in Direction:
                b = layout.bank(d)
                for i in range(b.n_db):
                    w[b.db_route + i] = i % b.n_vec
            w.release()
            flags = os.EFD_NONBLOCK | os.EFD_CLOEXEC
            efds = [os.eventfd(0, flags) for _ in range(layout.card_vectors + layout.host_vectors)]
        except BaseException:
            for fd in efds:
                os.close(fd)
            region.close()
            raise
        h2c = tuple(efds[: layout.card_vectors])
        c2h = tuple(efds[layout.card_vectors :])
        return cls(Side.HOST, region, layout, h2c, c2h, policy or NotifyPolicy())

    @classmethod
    def adopt(
        cls,
        region: Region,
        layout: MmioLayout,
        h2c_efds: tuple[int, ...],
        c2h_efds: tuple[int, ...],
        policy: NotifyPolicy | None = None,
    ) -> Mmio:
        """Card side: check the header against the announced layout and wrap it.

        Takes ownership of ``region`` and the eventfds (closed on error too).

        Raises:
            HandshakeError: header, size or eventfd count does not match.
        """
        try:
            if region.size < layout.size:
                raise HandshakeError(f"MMIO region is {region.size} B, layout needs {layout.size}")
            w = region.view().cast("Q")
            header = tuple(w[: len(layout.header())])
            w.release()
            if header != layout.header():
                raise HandshakeError(
                    f"MMIO header {header} does not match the announced layout {layout.header()}"
                )
            if len(h2c_efds) != layout.card_vectors or len(c2h_efds) != layout.host_vectors:
                raise HandshakeError("eventfd count does not match the vector count")
        except BaseException:
            region.close()
            for fd in (*h2c_efds, *c2h_efds):
                os.close(fd)
            raise
        return cls(Side.CARD, region, layout, h2c_efds, c2h_efds, policy or NotifyPolicy())

    # -- accessors -----------------------------------------------------------
    @property
    def region(self) -> Region:
        return self._region

    @property
    def eventfds(self) -> tuple[int, ...]:
        """All eventfds, h2c (card vectors) first, then c2h (host vectors)."""
        return (*self._efds[0], *self._efds[1])

    @property
    def doorbells(self) -> tuple[Doorbell, ...]:
        return self._doorbells

    @property
    def vectors(self) -> tuple[Vector, ...]:
        return self._vectors

    def doorbell(self, i: int) -> Doorbell:
        """Outgoing doorbell ``i`` (IndexError if it does not exist)."""
        self._check()
        return self._doorbells[i]

    def vector(self, v: int) -> Vector:
        """Incoming interrupt vector ``v`` (IndexError if it does not exist)."""
        self._check()
        return self._vectors[v]

    def route(self, doorbell: int, vector: int) -> None:
        """Route incoming ``doorbell`` to our ``vector`` (takes effect on the next ring)."""
        b = self._in_bank
        if not (0 <= doorbell < b.n_db and 0 <= vector < b.n_vec):
            raise LocalProtocolError(f"route {doorbell} -> {vector}: out of range")
        self.words[b.db_route + doorbell] = vector

    def doorbell_status(self, vector: int | None = None) -> frozenset[int]:
        """Incoming doorbells rung since their last ack (optionally: routed to ``vector``)."""
        b, w = self._in_bank, self.words
        return frozenset(
            i
            for i in range(b.n_db)
            if w[b.db_count + i] != w[b.db_ack + i]
            and (vector is None or w[b.db_route + i] == vector)
        )

    def ack_doorbells(self, vector: int | None = None) -> frozenset[int]:
        """Read and clear the doorbell status (what an X100 ISR does); returns the set acked."""
        b, w = self._in_bank, self.words
        fired = set()
        for i in range(b.n_db):
            c = w[b.db_count + i]
            if c != w[b.db_ack + i] and (vector is None or w[b.db_route + i] == vector):
                w[b.db_ack + i] = c
                fired.add(i)
        return frozenset(fired)

    def fail(self, exc: BaseException) -> None:
        """Fail every current and future vector wait with ``exc`` (link lost)."""
        for v in self._vectors:
            v.fail(exc)

    def _check(self) -> None:
        if self._closed:
            raise ClosedResourceError("MMIO is closed")

    def close(self) -> None:
        """Close the vectors, the eventfds and the region (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for v in self._vectors:
            v.close()
        self.spad.release()
        self.words.release()
        for fd in self.eventfds:
            os.close(fd)
        self._region.close()
