"""How a backend moves request data: by CPU copy, or with the card's DMA engine.

Linux's VOP (``drivers/misc/mic/vop/vop_vringh.c``, ``vop_virtio_copy_to_user``
and ``_from_user``) copied descriptor data with the MIC DMA engine through a
host bounce buffer (``vvr->buf``) when the card address was aligned to the
engine's 64 B granule and the length, rounded up to it, fitted the
descriptor; otherwise by CPU through the aperture, counted in
``tx_dst_unaligned`` / ``tx_len_unaligned``. This module does the same for
the block backend, per device, chosen by the option ``data_path``:

- ``cpu`` (the default): ``preadv``/``pwritev`` straight between the file and
  the chain's views of card memory. No engine is opened.
- ``dma``: a read goes file -> bounce buffer in host RAM (``preadv``) -> the
  DMA engine copies it into the chain's card memory; a write goes card memory
  -> bounce (DMA) -> file (``pwritev``). A request whose data segments are not
  all 64 B-aligned (address and length) is served by CPU and counted in
  ``dma_fallbacks``, as vop_vringh.c did.
- ``auto``: ``dma`` for aligned requests of at least ``dma_threshold`` bytes,
  ``cpu`` below it. The default threshold is :data:`AUTO_DMA_THRESHOLD`,
  measured by ``bench/datapath.py``: None, because on this emulator the DMA
  path never beat the CPU path (docs/block.md, *The DMA engine as the data
  path*), so ``auto`` is the CPU path unless a threshold is given.

The engine is the card's (``transport.dma.DmaEngine`` over the host's view of
card-physical addresses). It is opened when the first device that uses it
starts serving and closed when the last one stops (:class:`SharedDma`, held
by VOP); nothing opens it for ``cpu`` devices. Copies are submitted only to an
idle channel and never longer than the engine carries out inline, so each one
has landed when ``submit`` returns: a request is acknowledged only after its
data is in place, and a card crash or an engine closed under a request turns
that request into an I/O error, never into a success.

Does not import ``transport`` (the engine is reached through the protocols
below) or ``mic_card``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, runtime_checkable

from mic_host.config.limits import BLOCK_DATA_PATHS
from virtio.blk import REQ_HEADER
from virtio.constants import BlkReqType
from virtio.errors import ConfigError, MicError, ResourceError
from virtio.memory import FirstFitAllocator
from virtio.split import Chain

__all__ = [
    "AUTO_DMA_THRESHOLD",
    "BOUNCE_SIZE",
    "DATA_PATHS",
    "DEFAULT_DATA_PATH",
    "DMA_ALIGN",
    "BlockDataPath",
    "DmaEngineLike",
    "DmaLease",
    "DmaPlatform",
    "DmaProvider",
    "PlannedIo",
    "SharedDma",
    "check_data_path",
    "lease_dma",
]

#: The choices of the ``data_path`` device option.
DATA_PATHS = BLOCK_DATA_PATHS
#: What a device gets without the option: the faster path as measured (bench/datapath.py).
DEFAULT_DATA_PATH = "cpu"
#: ``auto``'s default threshold in bytes: None = never DMA (it never won; docs/block.md).
AUTO_DMA_THRESHOLD: int | None = None
#: The X100's DMA granule (transport.dma.DMA_ALIGN, drivers/dma/mic_x100_dma.h).
DMA_ALIGN = 64
#: One device's bounce buffer in host RAM; larger requests take the CPU path.
#: Also the engine's default ``inline_max``, so every copy completes in ``submit``.
BOUNCE_SIZE = 1 << 20


def check_data_path(value: object, where: str) -> str:
    """``value`` if it is one of :data:`DATA_PATHS`.

    Raises:
        ConfigError: naming ``where`` (the device) and the choices.
    """
    if value not in DATA_PATHS:
        raise ConfigError(f"{where}data_path {value!r}: expected one of {', '.join(DATA_PATHS)}")
    return str(value)


# -- what the engine looks like from here (transport.dma satisfies these) ------------------


class _Ticket(Protocol):
    def done(self) -> bool: ...

    def result(self) -> object: ...


class _Channel(Protocol):
    @property
    def pending(self) -> int: ...

    def submit(self, dst: int, src: int, length: int) -> _Ticket: ...


class _Policy(Protocol):
    @property
    def inline_max(self) -> int: ...


class DmaEngineLike(Protocol):
    """What a data path uses of ``transport.dma.DmaEngine``."""

    @property
    def channels(self) -> Sequence[_Channel]: ...

    @property
    def policy(self) -> _Policy: ...


@runtime_checkable
class DmaPlatform(Protocol):
    """A host platform that can open the card's DMA engine (``mic_host.card.session``)."""

    def dma(self) -> AbstractAsyncContextManager[DmaEngineLike]: ...


class DmaLease:
    """One device's use of the engine: a bounce buffer in host RAM and copies."""

    __slots__ = ("bounce", "bounce_bus", "engine")

    def __init__(self, engine: DmaEngineLike, bounce: memoryview, bounce_bus: int) -> None:
        self.engine = engine
        self.bounce = bounce  #: the host's view of the bounce buffer
        self.bounce_bus = bounce_bus  #: its card-physical address (through the SMPT)

    def idle_channel(self, length: int) -> _Channel | None:
        """A channel that carries out a copy of ``length`` bytes inside ``submit``, or None."""
        if length > self.engine.policy.inline_max:
            return None
        for ch in self.engine.channels:
            if not ch.pending:
                return ch
        return None


@runtime_checkable
class DmaProvider(Protocol):
    """A backend context that lends the card's DMA engine (``VopDevice``)."""

    def open_dma(self, bounce_size: int) -> AbstractAsyncContextManager[DmaLease]: ...


class SharedDma:
    """The card's engine, opened by the first lease and closed when the last one goes."""

    def __init__(self, opener: Callable[[], AbstractAsyncContextManager[DmaEngineLike]]) -> None:
        self._opener = opener
        self._stack: contextlib.AsyncExitStack | None = None  # holds the open engine
        self._engine: DmaEngineLike | None = None
        self._lock = asyncio.Lock()
        self.users = 0
        self.opens = 0  #: times the engine was started

    @property
    def running(self) -> bool:
        return self._engine is not None

    @contextlib.asynccontextmanager
    async def use(self) -> AsyncIterator[DmaEngineLike]:
        """The engine, for as long as the ``async with`` lasts."""
        async with self._lock:  # two devices starting at once open one engine
            engine = self._engine
            if engine is None:
                stack = contextlib.AsyncExitStack()
                engine = await stack.enter_async_context(self._opener())
                self._stack, self._engine = stack, engine
                self.opens += 1
            self.users += 1
        try:
            yield engine
        finally:
            self.users -= 1
            if not self.users and self._stack is not None:
                stack, self._stack, self._engine = self._stack, None, None
                await stack.aclose()

    def stats(self) -> dict[str, Any]:
        return {"running": self.running, "users": self.users, "opens": self.opens}


@contextlib.asynccontextmanager
async def lease_dma(
    shared: SharedDma | None,
    alloc: FirstFitAllocator,
    host_ram: memoryview,
    host_ram_bus: int,
    nbytes: int,
) -> AsyncIterator[DmaLease]:
    """A :class:`DmaLease` with an ``nbytes`` bounce buffer carved from host RAM
    (``alloc`` hands out offsets of ``host_ram``, which the card sees at
    ``host_ram_bus``); VOP's ``open_dma``.

    Raises:
        ResourceError: the platform has no DMA engine, or host RAM has no room.
    """
    if shared is None:
        raise ResourceError("this platform has no DMA engine")
    off = alloc.alloc(nbytes)
    try:
        async with shared.use() as engine:
            yield DmaLease(engine, host_ram[off : off + nbytes], host_ram_bus + off)
    finally:
        alloc.free(off)


# -- the block backend's data path ----------------------------------------------------------


class PlannedIo(Protocol):
    """A checked request as the block backend holds it (its ``_Io``)."""

    offset: int  #: bytes into the image
    dma: list[tuple[int, int]] | None  #: what :meth:`BlockDataPath.plan` returned


class BlockDataPath:
    """One block device's choice of data path, its DMA lease and its counters."""

    def __init__(self, mode: object, threshold: int | None, where: str) -> None:
        """Raises: ConfigError: an unknown mode or a threshold that is not a positive size."""
        self.mode = check_data_path(mode, where)
        if threshold is not None and (isinstance(threshold, bool) or int(threshold) <= 0):
            raise ConfigError(f"{where}dma_threshold {threshold!r}: expected a positive size")
        self.threshold = AUTO_DMA_THRESHOLD if threshold is None else int(threshold)
        #: the engine and bounce buffer while serving with ``dma``/``auto`` (else None)
        self.lease: DmaLease | None = None
        self.dma_requests = 0
        self.dma_bytes = 0
        self.dma_fallbacks = 0  # DMA wanted, data not 64 B-aligned: served by CPU
        self.cpu_requests = 0  # below auto's threshold, larger than the bounce, engine busy

    @property
    def uses_dma(self) -> bool:
        return self.mode == "dma" or (self.mode == "auto" and self.threshold is not None)

    @contextlib.asynccontextmanager
    async def bind(self, ctx: object, log: logging.Logger, name: str) -> AsyncIterator[None]:
        """Hold a DMA lease from ``ctx`` while the backend serves (if the mode uses one)."""
        async with contextlib.AsyncExitStack() as stack:
            if self.uses_dma:
                if not isinstance(ctx, DmaProvider):
                    log.warning("%s: data_path %s: no DMA engine here; CPU path", name, self.mode)
                else:
                    try:
                        self.lease = await stack.enter_async_context(ctx.open_dma(BOUNCE_SIZE))
                    except MicError as e:
                        log.warning("%s: data_path %s: %s; CPU path", name, self.mode, e)
            try:
                yield
            finally:
                self.lease = None

    def plan(self, chain: Chain, kind: int, length: int) -> list[tuple[int, int]] | None:
        """The card segments ``(addr, length)`` to DMA for a checked read or write
        of ``length`` data bytes, or None to use the CPU path (counted)."""
        lease = self.lease
        if lease is None or not length:
            return None
        t = self.threshold
        if self.mode == "auto" and (t is None or length < t):
            self.cpu_requests += 1
            return None
        if length > len(lease.bounce) or lease.idle_channel(length) is None:
            self.cpu_requests += 1
            return None
        want = kind == BlkReqType.IN
        skip = 0 if want else REQ_HEADER.size  # a write's data follows the header
        segs: list[tuple[int, int]] = []
        left = length
        for addr, n, writable in chain.segments:
            if writable != want:
                continue
            if skip:
                cut = min(skip, n)
                addr, n, skip = addr + cut, n - cut, skip - cut
                if not n:
                    continue
            n = min(n, left)
            if (addr | n) % DMA_ALIGN:
                self.dma_fallbacks += 1
                return None
            segs.append((addr, n))
            left -= n
            if not left:
                return segs
        self.dma_fallbacks += 1  # pragma: no cover - the backend checked the lengths
        return None

    def _copy(self, lease: DmaLease, dst: int, src: int, n: int) -> None:
        ch = lease.idle_channel(n)
        if ch is None:  # pragma: no cover - plan() checked, and nothing runs in between
            raise OSError(errno.EIO, "DMA engine busy")
        try:
            ticket = ch.submit(dst, src, n)
            ticket.result()  # raises the request's error; done: idle channel, inline size
        except MicError as e:
            raise OSError(errno.EIO, f"DMA copy failed: {e}") from e

    def read(self, fd: int, io: PlannedIo) -> None:
        """File -> bounce -> DMA into the card segments :meth:`plan` gave (``io.dma``).

        Raises: OSError: the read or a copy failed (nothing is acknowledged).
        """
        lease, segs, offset = self.lease, io.dma, io.offset
        if lease is None or segs is None:
            raise OSError(errno.EIO, "DMA engine closed")
        length = sum(n for _, n in segs)
        bounce = lease.bounce
        done = 0
        while done < length:
            got = os.preadv(fd, [bounce[done:length]], offset + done)
            if not got:  # file shrank under us: the rest reads as zeros
                bounce[done:length] = bytes(length - done)
                break
            done += got
        pos = 0
        for addr, n in segs:
            self._copy(lease, addr, lease.bounce_bus + pos, n)
            pos += n
        self.dma_requests += 1
        self.dma_bytes += length

    def write(self, fd: int, io: PlannedIo) -> None:
        """DMA the card segments :meth:`plan` gave (``io.dma``) -> bounce -> file.

        Raises: OSError: a copy or the write failed.
        """
        lease, segs, offset = self.lease, io.dma, io.offset
        if lease is None or segs is None:
            raise OSError(errno.EIO, "DMA engine closed")
        pos = 0
        for addr, n in segs:
            self._copy(lease, lease.bounce_bus + pos, addr, n)
            pos += n
        data = lease.bounce[:pos]
        done = 0
        while done < pos:
            done += os.pwritev(fd, [data[done:]], offset + done)
        self.dma_requests += 1
        self.dma_bytes += pos

    def stats(self) -> dict[str, Any]:
        return {
            "data_path": self.mode,
            "dma_requests": self.dma_requests,
            "dma_bytes": self.dma_bytes,
            "dma_fallbacks": self.dma_fallbacks,
            "cpu_requests": self.cpu_requests,
        }
