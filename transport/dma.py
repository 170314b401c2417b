"""The DMA engine: channels of asynchronous, ordered, checked copies in one address space.

Owns request validation, ordering, completion and statistics. Like the X100
engine (drivers/dma/mic_x100_dma.[ch]) it works on card-physical addresses, so
a host→card copy is ``copy(dst=<card RAM addr>, src=SMPT_BASE + off)``; the
engine is given the side's address space (``HostAddressSpace`` or
``CardAddressSpace``) and every address goes through its window checks.

- Channels complete their requests in submission order; ``fence=True`` makes a
  request wait for everything submitted before it on *all* channels
  (DMA_PREP_FENCE in mic_x100_dma.c).
- Completion is an awaitable :class:`DmaRequest` plus, optionally, a u64
  status word written into memory after the data (the X100 "status
  descriptor", mic_dma_prep_status_lock), so a peer can poll for it.
- The X100 needs source, destination and length aligned to 64 B
  (MIC_DMA_ALIGN_SHIFT = 6). Unaligned requests fall back to a CPU copy, as
  vop_vringh.c does through the aperture, counted in ``cpu_fallbacks``; or are
  refused with ``UnalignedPolicy.REFUSE``.
- Copies are zero-copy: ``dst_view[:] = src_view`` between the mapped regions.
  Copies at or above ``thread_threshold`` run in a worker thread; copies above
  ``chunk`` run in chunks that return to the event loop in between (see
  docs/transport.md "Performance" for which one wins on this machine).

An engine runs only where a data path uses it: nothing starts one at boot.
A data path opens one for as long as it needs it, ``async with
host.dma() as dma`` (:meth:`transport.pcie.PcieHost.dma`,
:meth:`transport.pcie.PcieCard.dma`), or ``async with DmaEngine(space)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Generator
from dataclasses import dataclass
from enum import IntEnum
from types import TracebackType

from transport.errors import DmaAlignmentError, DmaError, DmaFault, DmaOverlapError
from virtio.errors import ClosedResourceError, WouldBlock
from virtio.memory import Memory, MemoryFault

__all__ = [
    "DMA_ALIGN",
    "DmaChannel",
    "DmaCompletion",
    "DmaEngine",
    "DmaPath",
    "DmaPolicy",
    "DmaRequest",
    "DmaStats",
    "UnalignedPolicy",
]

DMA_ALIGN = 64  # drivers/dma/mic_x100_dma.h: MIC_DMA_ALIGN_SHIFT 6
_MASK64 = (1 << 64) - 1


class UnalignedPolicy(IntEnum):
    CPU = 0  #: copy with the CPU instead (vop_vringh.c's aperture fallback), counted
    REFUSE = 1  #: raise DmaAlignmentError


class DmaPath(IntEnum):
    """How a request was carried out."""

    DMA = 0  #: aligned, copied inline on the event loop
    CPU = 1  #: unaligned fallback
    THREAD = 2  #: aligned, large, copied in a worker thread
    FENCE = 3  #: an empty ordering marker


@dataclass(frozen=True, slots=True)
class DmaPolicy:
    """Engine configuration (local to one side)."""

    channels: int = 4
    unaligned: UnalignedPolicy = UnalignedPolicy.CPU
    #: copies of at least this many bytes run in ``asyncio.to_thread`` (None: never)
    thread_threshold: int | None = None
    #: queued copies above this size are split, returning to the loop between chunks
    chunk: int = 1 << 20
    #: an idle channel carries out requests up to this size inside ``submit`` (no
    #: task hop); bigger ones always go through the channel's worker task
    inline_max: int = 1 << 20

    def __post_init__(self) -> None:
        if not 1 <= self.channels <= 64 or self.chunk < DMA_ALIGN or self.inline_max < 0:
            raise ValueError(f"invalid DMA policy {self!r}")


@dataclass(frozen=True, slots=True)
class DmaStats:
    ops: int = 0
    bytes: int = 0
    faults: int = 0
    errors: int = 0
    cpu_fallbacks: int = 0
    thread_copies: int = 0
    status_writes: int = 0
    fences: int = 0


@dataclass(frozen=True, slots=True)
class DmaCompletion:
    cookie: int
    channel: int
    length: int
    path: DmaPath


class _Counters:
    __slots__ = (
        "bytes",
        "cpu_fallbacks",
        "errors",
        "faults",
        "fences",
        "ops",
        "status_writes",
        "thread_copies",
    )

    def __init__(self) -> None:
        self.ops = self.bytes = self.faults = self.errors = 0
        self.cpu_fallbacks = self.thread_copies = self.status_writes = self.fences = 0

    def snapshot(self) -> DmaStats:
        return DmaStats(
            ops=self.ops,
            bytes=self.bytes,
            faults=self.faults,
            errors=self.errors,
            cpu_fallbacks=self.cpu_fallbacks,
            thread_copies=self.thread_copies,
            status_writes=self.status_writes,
            fences=self.fences,
        )


class DmaRequest:
    """A submitted request; ``await req`` gives its :class:`DmaCompletion` or raises DmaError."""

    __slots__ = (
        "_fut",
        "channel",
        "cookie",
        "deps",
        "dst",
        "fence",
        "length",
        "src",
        "status_addr",
        "status_value",
    )

    def __init__(
        self,
        fut: asyncio.Future[DmaCompletion],
        cookie: int,
        channel: int,
        dst: int,
        src: int,
        length: int,
        status_addr: int | None,
        status_value: int,
        fence: bool,
    ) -> None:
        self._fut = fut
        self.cookie = cookie
        self.channel = channel
        self.dst = dst
        self.src = src
        self.length = length
        self.status_addr = status_addr
        self.status_value = status_value
        self.fence = fence
        self.deps: list[asyncio.Future[DmaCompletion]] = []

    def done(self) -> bool:
        return self._fut.done()

    def result(self) -> DmaCompletion:
        """The completion, or raise its error; WouldBlock if still in flight."""
        if not self._fut.done():
            raise WouldBlock(f"DMA request {self.cookie} is still in flight")
        return self._fut.result()

    def __await__(self) -> Generator[object, None, DmaCompletion]:
        return self._fut.__await__()


class DmaChannel:
    """One channel: an in-order queue of requests."""

    def __init__(self, engine: DmaEngine, index: int) -> None:
        self._engine = engine
        self.index = index
        self._queue: asyncio.Queue[DmaRequest | None] = asyncio.Queue()
        self._busy = 0  # submitted, not completed

    @property
    def pending(self) -> int:
        """Requests submitted and not yet completed."""
        return self._busy

    def submit(
        self,
        dst: int,
        src: int,
        length: int,
        *,
        status_addr: int | None = None,
        status_value: int = 1,
        fence: bool = False,
    ) -> DmaRequest:
        """Queue a copy of ``length`` bytes from ``src`` to ``dst``; returns at once.

        An idle channel carries out small requests immediately (the returned
        request is already done). ``status_addr`` (8-byte aligned) receives the
        u64 ``status_value`` after the data.

        Raises:
            DmaFault: an address is outside card RAM / the open windows.
            DmaOverlapError, DmaAlignmentError, DmaError: refused request.
            ClosedResourceError: the engine is closed.
        """
        return self._engine._submit(self, dst, src, length, status_addr, status_value, fence)

    async def copy(
        self,
        dst: int,
        src: int,
        length: int,
        *,
        status_addr: int | None = None,
        status_value: int = 1,
        fence: bool = False,
    ) -> DmaCompletion:
        """Submit and wait for completion (raises as :meth:`submit`, or DmaFault later)."""
        req = self.submit(
            dst, src, length, status_addr=status_addr, status_value=status_value, fence=fence
        )
        return await req

    async def fence(self) -> None:
        """Wait until everything submitted before, on every channel, has completed."""
        await self._engine._submit(self, 0, 0, 0, None, 0, True)


class DmaEngine:
    """DMA channels over one address space; an async context manager.

    ``async with DmaEngine(space) as dma: await dma.copy(dst, src, n)``.
    """

    def __init__(self, space: Memory, policy: DmaPolicy | None = None) -> None:
        self.space = space
        self.policy = policy or DmaPolicy()
        self._channels = tuple(DmaChannel(self, i) for i in range(self.policy.channels))
        self._cookies = itertools.count(1)
        self._stats = _Counters()
        self._outstanding: set[asyncio.Future[DmaCompletion]] = set()
        self._stack: contextlib.AsyncExitStack | None = None
        self._running = False
        self._closed = False

    # -- lifecycle -------------------------------------------------------------
    async def __aenter__(self) -> DmaEngine:
        if self._closed or self._stack is not None:
            raise ClosedResourceError("a DmaEngine can be entered once")
        stack = contextlib.AsyncExitStack()
        await stack.enter_async_context(self._workers())
        self._stack = stack
        return self

    @contextlib.asynccontextmanager
    async def _workers(self) -> AsyncIterator[None]:
        """One worker task per channel, for as long as the engine is open."""
        async with asyncio.TaskGroup() as tg:
            for ch in self._channels:
                tg.create_task(self._worker(ch), name=f"dma-ch{ch.index}")
            self._running = True
            try:
                yield
            finally:
                self._running = False
                for ch in self._channels:
                    ch._queue.put_nowait(None)  # each worker ends after what is queued

    async def __aexit__(
        self,
        et: type[BaseException] | None,
        e: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the channels; requests still queued fail with ClosedResourceError."""
        if self._closed:
            return
        self._closed = True
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()
        for fut in list(self._outstanding):
            if not fut.done():
                fut.set_exception(ClosedResourceError("DMA engine closed"))
                fut.exception()  # retrieved: nobody may be awaiting it
        self._outstanding.clear()

    # -- API -------------------------------------------------------------------
    @property
    def channels(self) -> tuple[DmaChannel, ...]:
        return self._channels

    def channel(self, i: int) -> DmaChannel:
        return self._channels[i]

    def stats(self) -> DmaStats:
        return self._stats.snapshot()

    async def copy(
        self,
        dst: int,
        src: int,
        length: int,
        *,
        channel: int = 0,
        status_addr: int | None = None,
        status_value: int = 1,
        fence: bool = False,
    ) -> DmaCompletion:
        """``channel(channel).copy(...)``."""
        return await self._channels[channel].copy(
            dst, src, length, status_addr=status_addr, status_value=status_value, fence=fence
        )

    async def drain(self) -> None:
        """Wait for every outstanding request (errors stay with their requests)."""
        if self._outstanding:
            await asyncio.wait(list(self._outstanding))

    # -- internals -------------------------------------------------------------
    def _views(self, req: DmaRequest) -> tuple[memoryview, memoryview]:
        try:
            src = self.space.view(req.src, req.length)
            dst = self.space.view(req.dst, req.length, write=True)
            if req.status_addr is not None:
                self.space.view(req.status_addr, 8, write=True)
        except MemoryFault as e:
            self._stats.faults += 1
            self._stats.errors += 1
            raise DmaFault(f"DMA request {req.cookie} refused: {e}", e) from e
        return dst, src

    def _submit(
        self,
        ch: DmaChannel,
        dst: int,
        src: int,
        length: int,
        status_addr: int | None,
        status_value: int,
        fence: bool,
    ) -> DmaRequest:
        if self._closed or not self._running:
            raise ClosedResourceError("DMA engine is not running (use `async with`)")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[DmaCompletion] = loop.create_future()
        req = DmaRequest(fut, next(self._cookies), ch.index, dst, src, length, status_addr,
                         status_value & _MASK64, fence)  # fmt: skip
        views = None
        if length:
            views = self._validate(req)
        elif not fence:
            self._stats.errors += 1
            raise DmaError("empty DMA transfer (length 0)")
        if fence:
            req.deps = [f for f in self._outstanding if not f.done()]
        elif views is not None and ch._busy == 0 and length <= self.policy.inline_max:
            # idle channel, small request: carry it out now (ordering is trivially kept)
            fut.set_result(self._finish(req, *views))
            return req
        ch._busy += 1
        self._outstanding.add(fut)
        fut.add_done_callback(self._outstanding.discard)
        ch._queue.put_nowait(req)
        return req

    def _validate(self, req: DmaRequest) -> tuple[memoryview, memoryview]:
        n = req.length
        if n < 0:
            self._stats.errors += 1
            raise DmaError(f"negative DMA length {n}")
        if req.src < req.dst + n and req.dst < req.src + n:
            self._stats.errors += 1
            raise DmaOverlapError(
                f"source [{req.src:#x}, +{n:#x}) overlaps destination [{req.dst:#x}, +{n:#x})"
            )
        if req.status_addr is not None and req.status_addr % 8:
            self._stats.errors += 1
            raise DmaError(f"status address {req.status_addr:#x} is not 8-byte aligned")
        if self.policy.unaligned is UnalignedPolicy.REFUSE and (req.src | req.dst | n) % DMA_ALIGN:
            self._stats.errors += 1
            raise DmaAlignmentError(
                f"src {req.src:#x}, dst {req.dst:#x}, length {n:#x} not {DMA_ALIGN} B-aligned"
            )
        return self._views(req)  # fail fast; re-translated if the request is queued

    def _aligned(self, req: DmaRequest) -> bool:
        return not (req.src | req.dst | req.length) % DMA_ALIGN

    def _threaded(self, req: DmaRequest) -> bool:
        t = self.policy.thread_threshold
        return t is not None and req.length >= t and self._aligned(req)

    def _finish(self, req: DmaRequest, dst: memoryview, src: memoryview) -> DmaCompletion:
        """Copy (if not done yet by a thread), write the status word, count."""
        path = DmaPath.DMA if self._aligned(req) else DmaPath.CPU
        dst[:] = src
        return self._complete(req, path)

    def _complete(self, req: DmaRequest, path: DmaPath) -> DmaCompletion:
        st = self._stats
        if path is DmaPath.CPU:
            st.cpu_fallbacks += 1
        elif path is DmaPath.THREAD:
            st.thread_copies += 1
        if req.status_addr is not None:
            try:
                sv = self.space.view(req.status_addr, 8, write=True).cast("Q")
            except MemoryFault as e:
                st.faults += 1
                st.errors += 1
                raise DmaFault(f"DMA request {req.cookie}: status write refused: {e}", e) from e
            sv[0] = req.status_value  # after the data: one 8-byte store (TSO keeps the order)
            st.status_writes += 1
        st.ops += 1
        st.bytes += req.length
        return DmaCompletion(req.cookie, req.channel, req.length, path)

    async def _run(self, req: DmaRequest) -> DmaCompletion:
        if req.fence:
            if req.deps:
                await asyncio.wait(req.deps)
            self._stats.fences += 1
            if not req.length:
                return DmaCompletion(req.cookie, req.channel, 0, DmaPath.FENCE)
        dst, src = self._views(req)
        if self._threaded(req):
            await asyncio.to_thread(_copy, dst, src, self.policy.chunk)
            return self._complete(req, DmaPath.THREAD)
        n, step = req.length, self.policy.chunk
        if n <= step:
            return self._finish(req, dst, src)
        for off in range(0, n, step):
            dst[off : off + step] = src[off : off + step]
            await asyncio.sleep(0)  # let the loop breathe between chunks
        return self._complete(req, DmaPath.DMA if self._aligned(req) else DmaPath.CPU)

    async def _worker(self, ch: DmaChannel) -> None:
        while True:
            req = await ch._queue.get()
            if req is None:
                return
            fut = req._fut
            try:
                comp = await self._run(req)
            except DmaError as e:
                if not fut.done():
                    fut.set_exception(e)
            else:
                if not fut.done():
                    fut.set_result(comp)
            finally:
                ch._busy -= 1


def _copy(dst: memoryview, src: memoryview, chunk: int) -> None:
    n = len(dst)
    for off in range(0, n, chunk):
        dst[off : off + chunk] = src[off : off + chunk]
