"""The values a queue's requests are made of, and the memory they use.

:class:`Request` (what the session layer builds), :class:`Ticket` (one in
flight), :class:`Completion` (a finished one), :class:`SharedBuffer` (memory
shared with one queue, SVA) and :class:`BounceRing` (the bounce-pool
allocator: a circular log). Imports only :mod:`mic_card.accel.wire`; the
queue (:mod:`mic_card.accel.queue`) builds on it.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass
from typing import Any, Protocol

from mic_card.accel.wire import Alg, Op, Status, align

__all__ = [
    "BounceRing",
    "Completion",
    "CompletionSink",
    "Data",
    "Request",
    "SharedBuffer",
    "SharedHeap",
    "Ticket",
]


class SharedHeap(Protocol):
    """What a :class:`SharedBuffer` gives itself back to (its queue)."""

    def free_shared(self, buf: SharedBuffer) -> None: ...


class BounceRing:
    """Bounce-pool allocator: a circular log (completions come back mostly in order)."""

    __slots__ = ("blocks", "head", "size", "tail")

    def __init__(self, size: int) -> None:
        self.size = size
        self.head = 0
        self.tail = 0
        self.blocks: collections.deque[list[int]] = collections.deque()

    def alloc(self, n: int) -> list[int] | None:
        n = align(max(n, 1))
        size = self.size
        pos = self.head % size
        waste = size - pos if pos + n > size else 0
        if n > size or self.head + waste + n - self.tail > size:
            return None
        if waste:
            self.blocks.append([self.head, waste, 1])
            self.head += waste
        blk = [self.head, n, 0]
        self.blocks.append(blk)
        self.head += n
        return blk

    def free(self, blk: list[int]) -> None:
        blk[2] = 1
        blocks = self.blocks
        while blocks and blocks[0][2]:
            b = blocks.popleft()
            self.tail = b[0] + b[1]

    def reset(self) -> None:
        self.head = self.tail = 0
        self.blocks.clear()


@dataclass(eq=False, slots=True)
class SharedBuffer:
    """Memory shared with one queue (SVA mode): ``view`` is zero-copy, ``addr`` its bus address.

    Only the queue that made it can use it; another queue's engine refuses it
    (``Status.ACCESS_FAULT``). ``free()`` gives it back.
    """

    queue: SharedHeap
    addr: int
    size: int
    view: memoryview
    _off: int

    def free(self) -> None:
        self.queue.free_shared(self)

    def __len__(self) -> int:
        return self.size


Data = bytes | bytearray | memoryview


@dataclass(slots=True)
class Request:
    """One request as the session layer builds it (see ``wire.ReqHeader``).

    ``src``/``aad`` are bytes (copied through the bounce pool) or
    :class:`SharedBuffer` (zero copy, SVA); ``dst`` likewise, or None to get
    a bounce buffer of ``dst_len`` bytes whose content comes back as bytes.
    ``src_addr``/``dst_addr`` override the addresses (raw access, e.g. tests).
    """

    op: Op
    alg: Alg = Alg.NONE
    alg2: Alg = Alg.NONE
    level: int = 0
    flags: int = 0
    stream_id: int = 0
    key: bytes = b""
    iv: bytes = b""
    tag_len: int = 0
    src: Data | SharedBuffer = b""
    aad: Data | SharedBuffer = b""
    dst: SharedBuffer | None = None
    dst_len: int = 0
    src_addr: int | None = None
    dst_addr: int | None = None


class CompletionSink(Protocol):
    """Where a ticket's completion goes when nobody awaits it (a queue, a session)."""

    _ready: collections.deque[Completion]


@dataclass(eq=False, slots=True)
class Ticket:
    """An in-flight request: where its header and bounce buffers are, who waits for it."""

    slot: int
    owner: CompletionSink
    tag: Any
    dst: SharedBuffer | None
    dst_view: memoryview | None
    bounce: list[list[int]] | tuple[()]
    future: asyncio.Future[Completion] | None = None
    done: bool = False


@dataclass(slots=True)
class Completion:
    """A finished request: ``status`` and ``output`` (bytes, or a view of your SharedBuffer).

    A value, but not ``frozen``: one is made per request on the hot path and a
    frozen dataclass's ``__init__`` (``object.__setattr__`` per field) costs
    about 1.2 µs more, an eighth of the per-request budget. Treat it as read-only.
    """

    status: Status
    consumed: int
    produced: int
    output: bytes | memoryview
    tag: Any = None
    detail: int = 0

    @property
    def ok(self) -> bool:
        return self.status is Status.OK
