"""The write storm's on-disk format and the host-side durability check.

The guarantee under test (FLUSH, virtio 1.2 §5.2.6): *once a FLUSH completes,
every write acknowledged before the FLUSH was sent is on stable storage.*

How the host learns exactly which writes that covers, without trusting a card
that is about to be killed: the card app numbers its writes (``seq``), and
before sending each FLUSH it notes the acknowledged prefix ``P`` (every
``seq < P`` was acknowledged). Only after that FLUSH completed does it write
``(epoch, P)`` into sector 0 of a second disk (the journal). A journal record
the host finds is therefore true whenever it got there: the FLUSH it speaks
of had completed. So for the last record ``P``, every write ``seq < P`` must
be in the image — the check is exactly the guarantee, no more (writes after
``P`` may or may not have landed) and no less.

Writes are 4 KiB at a pseudo-random block (``Plan``), never two in flight to
the same block (concurrent overlapping writes have no defined order on any
disk; the first version of this test found exactly that reordering); every 512-byte sector
carries ``(magic, seed, seq, sector)`` and a filler derived from them, so a
sector is either zero (never written) or identifies the one write that put
it there. For each sector the check computes ``need`` = the last write with
``seq < P`` that covered it and requires the sector to be a valid sector of
a write with ``seq >= need`` (a later write, acknowledged or in flight at the
kill, may legitimately have replaced it; sectors are compared individually
because an in-flight 4 KiB write may land partially).
"""

from __future__ import annotations

import hashlib
import random
import struct
from dataclasses import dataclass

from bench.config import block, card

SECTOR = 512
BLOCK_SECTORS = 8
_MAGIC = 0x4D524F5453  # "STORM"
_SEC_HDR = struct.Struct("<QQQQ")  # magic, seed, seq, sector
_JOURNAL = struct.Struct("<QQQQ")  # magic, seed, epoch, prefix


class Plan:
    """Which block write ``seq`` goes to (deterministic from the seed)."""

    def __init__(self, seed: int, nblocks: int) -> None:
        self.seed = seed
        # block 0 is never written: a read of it must stay zero
        self.nblocks = nblocks
        self._blocks: list[int] = []
        self._rng = random.Random(seed)

    def block(self, seq: int) -> int:
        while len(self._blocks) <= seq:
            self._blocks.append(self._rng.randrange(1, self.nblocks))
        return self._blocks[seq]


def sector_bytes(seed: int, seq: int, sector: int) -> bytes:
    head = _SEC_HDR.pack(_MAGIC, seed, seq, sector)
    fill = hashlib.blake2b(head, digest_size=32).digest()
    return head + (fill * 16)[: SECTOR - len(head)]


def block_bytes(seed: int, seq: int, block: int) -> bytes:
    first = block * BLOCK_SECTORS
    return b"".join(sector_bytes(seed, seq, first + i) for i in range(BLOCK_SECTORS))


def journal_record(seed: int, epoch: int, prefix: int) -> bytes:
    return _JOURNAL.pack(_MAGIC, seed, epoch, prefix).ljust(SECTOR, b"\0")


def read_journal(data: bytes, seed: int) -> tuple[int, int]:
    """``(epoch, prefix)`` from the journal's sector 0; ``(0, 0)`` if none yet."""
    magic, s, epoch, prefix = _JOURNAL.unpack_from(data)
    if magic != _MAGIC or s != seed:
        return 0, 0
    return epoch, prefix


@dataclass
class Verdict:
    prefix: int
    checked_sectors: int
    newer_sectors: int  # sectors holding a write with seq >= need (later than required)
    problems: list[str]


def check_image(image: bytes, seed: int, prefix: int) -> Verdict:
    """Every write ``seq < prefix`` (or a later one over it) must be in ``image``."""
    nblocks = len(image) // (SECTOR * BLOCK_SECTORS)
    plan = Plan(seed, nblocks)
    need: dict[int, int] = {}
    for seq in range(prefix):
        b = plan.block(seq)
        for i in range(BLOCK_SECTORS):
            need[b * BLOCK_SECTORS + i] = seq
    problems: list[str] = []
    newer = 0
    zero = bytes(SECTOR)
    for sector in range(nblocks * BLOCK_SECTORS):
        got = image[sector * SECTOR : (sector + 1) * SECTOR]
        want_seq = need.get(sector)
        if got == zero:
            if want_seq is not None:
                problems.append(f"sector {sector}: zero, write {want_seq} was flushed")
            continue
        magic, s, seq, sec = _SEC_HDR.unpack_from(got)
        if (
            seq > prefix + 1_000_000
            or magic != _MAGIC
            or s != seed
            or sec != sector
            or got != sector_bytes(seed, seq, sector)
        ):
            problems.append(f"sector {sector}: garbage")
            continue
        if plan.block(seq) * BLOCK_SECTORS != sector - sector % BLOCK_SECTORS:
            problems.append(f"sector {sector}: write {seq} never targeted it")
        elif want_seq is not None and seq < want_seq:
            problems.append(f"sector {sector}: holds write {seq}, flushed write {want_seq} lost")
        elif want_seq is None or seq > want_seq:
            newer += 1
    return Verdict(prefix, len(need), newer, problems[:20])


def card_config(
    *, data: dict[str, object] | None = None, journal: dict[str, object] | None = None
) -> str:
    """The daemon config of a storm: card ``mic0`` (3 s heartbeat timeout) with the
    storm's two disks made in the state directory, ``data`` (8M) and ``journal``
    (64K); ``data`` and ``journal`` add options to each (``data_path``, ``num_queues``)."""
    return card(
        block("{state_dir}/data.img", name="data", size="8M", create=True, **(data or {})),
        block(
            "{state_dir}/journal.img", name="journal", size="64K", create=True, **(journal or {})
        ),
        card_ram=None,
        heartbeat_timeout=3.0,
    )
