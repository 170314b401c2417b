"""virtio-blk driver for the card (virtio 1.2 §5.2): ``vda``, ``vdb``...

Each request is one chain: the 16-byte header (readable), the data
(readable for OUT, writable for IN) and the status byte (writable). Many
requests may be outstanding at once (the queue's depth); with
VIRTIO_BLK_F_MQ they are spread over every queue (the least busy one takes
the next request), so a device is as deep as ``num_queues * queue_size``.

Buffers live in card RAM, the only memory the host can reach. Two ways in:

- *buffered*: ``read`` returns ``bytes`` and ``write`` takes any bytes-like
  object; the driver copies through a bounce buffer in card RAM;
- *zero-copy*: :meth:`BlockDevice.buffer` hands out a :class:`DmaBuffer`
  (card RAM); ``read_into``/``write`` with it move data straight between the
  host's image and that buffer (Linux ``O_DIRECT``).

The device files the card shell shows (``/dev/vda``...) are these drivers:
``card.device("vda")``; :meth:`BlockDevice.info` is what ``blkinfo`` prints.

Must not import ``transport`` or ``mic_host``.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from mic_card.endpoint import DriverEndpoint
from virtio.blk import (
    DRIVER_FEATURES,
    ID_BYTES,
    STATUS_SIZE,
    WRITE_ZEROES_FLAG_UNMAP,
    build_segments,
    parse_config,
    status_name,
)
from virtio.blk import REQ_HEADER as _REQ_HEADER
from virtio.constants import SECTOR_SIZE, BlkFeature, BlkReqType, BlkStatus
from virtio.errors import BrokenResourceError, LocalProtocolError, MicError, RemoteProtocolError

if TYPE_CHECKING:
    from mic_card.bus import CardDevice

__all__ = ["ID_BYTES", "BlockDevice", "BlockIOError", "DmaBuffer"]

#: Bound by assignment so that ``REQ_HEADER.pack_into(...)`` compiles to
#: LOAD_METHOD (CPython 3.11 does not use it on names bound by an import).
REQ_HEADER = _REQ_HEADER
_ALIGN = 64  # the X100 DMA granule: requests are cache-line aligned
#: Largest data segment when the host does not say (no SIZE_MAX).
_DEFAULT_SIZE_MAX = 1 << 20
#: One request's header (16 B) and status byte, in a slot of their own cache line.
_SLOT = 64
_STATUS_AT = REQ_HEADER.size


class BlockIOError(MicError):
    """The host answered a block request with a non-OK status (``status``: 1 IOERR, 2 UNSUPP)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class _HeaderSlots:
    """Every request's header and status byte, carved from one card-RAM allocation.

    One slot per descriptor the device's rings hold (no more chains can be
    outstanding), so a request takes a slot and gives it back without a call
    to the card-RAM allocator, a memoryview or a closure of its own. The
    allocation is the device's (``alloc_tracked``): it is freed with the
    device's other card RAM once the host can no longer touch it.
    """

    __slots__ = ("addr", "free", "releases", "view")

    def __init__(self, dev: CardDevice, n: int) -> None:
        self.addr = dev.alloc_tracked(n * _SLOT, _ALIGN)
        self.view = dev.mem.view(self.addr, n * _SLOT, True)
        self.free = list(range(n - 1, -1, -1))
        #: ``releases[i]()`` gives slot ``i`` back (what the endpoint calls when a
        #: cancelled request completes or fails).
        self.releases: list[Callable[[], None]] = [
            functools.partial(self.free.append, i) for i in range(n)
        ]


class DmaBuffer:
    """A buffer in card RAM the host can read and write directly (zero-copy I/O).

    ``view`` is a writable memoryview of it. Free it with :meth:`close` (or use
    it as a context manager); a buffer must not be closed while a request
    using it is outstanding.
    """

    def __init__(self, dev: CardDevice, size: int) -> None:
        if size <= 0:
            raise LocalProtocolError(f"buffer of {size} B")
        self._dev: CardDevice | None = dev
        self.size = size
        self.addr = dev.alloc(size, _ALIGN)
        self.view = dev.mem.view(self.addr, size, True)

    def close(self) -> None:
        if self._dev is not None:
            dev, self._dev = self._dev, None
            self.view.release()
            dev.free(self.addr)

    def __enter__(self) -> DmaBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return self.size


class BlockDevice:
    """A virtio block device on the card.

    Attributes: ``capacity`` (512-byte sectors), ``blk_size`` (logical block
    size: requests are whole, aligned blocks), ``read_only``, ``num_queues``,
    ``size_max`` / ``seg_max`` (the host's segment limits), ``discard_supported``,
    ``write_zeroes_supported``, ``flush_supported``.
    """

    FEATURES: ClassVar[int] = DRIVER_FEATURES

    def __init__(self, dev: CardDevice) -> None:
        """Raises: RemoteProtocolError: the config space does not parse or is inconsistent."""
        self.dev = dev
        self.name = dev.name
        self.queues: list[DriverEndpoint] = list(dev.endpoints)
        self.queue: DriverEndpoint = self.queues[0]
        f = dev.features
        self.read_only = bool(f & BlkFeature.RO)
        self.flush_supported = bool(f & BlkFeature.FLUSH)
        self.discard_supported = bool(f & BlkFeature.DISCARD)
        self.write_zeroes_supported = bool(f & BlkFeature.WRITE_ZEROES)
        self.capacity = 0
        self.blk_size = SECTOR_SIZE
        self.physical_block_size = SECTOR_SIZE
        self.opt_io_size = 0
        self.size_max = _DEFAULT_SIZE_MAX
        self.seg_max = 0
        self.num_queues = 1
        self.max_discard_sectors = 0
        self.max_discard_seg = 1
        self.max_write_zeroes_sectors = 0
        self.max_write_zeroes_seg = 1
        self.write_zeroes_may_unmap = False
        self._closed: BrokenResourceError | None = None
        self.config_changes = 0
        self._limit = self.blk_size
        self._slots: _HeaderSlots | None = None
        self._slots_failed = False
        self._read_config()

    def _read_config(self) -> None:
        try:
            cfg = parse_config(self.dev.read_config())
        except RemoteProtocolError as e:
            raise RemoteProtocolError(f"{self.name}: {e}", reason="config") from e
        f = self.dev.features
        self.capacity = int(cfg.capacity)
        if f & BlkFeature.BLK_SIZE and cfg.blk_size:
            bs = int(cfg.blk_size)
            if bs < SECTOR_SIZE or bs & (bs - 1) or bs > 65536:
                raise RemoteProtocolError(f"{self.name}: blk_size {bs}", reason="config")
            self.blk_size = bs
        if f & BlkFeature.TOPOLOGY:
            t = cfg.topology
            self.physical_block_size = self.blk_size << min(int(t.physical_block_exp), 7)
            self.opt_io_size = int(t.opt_io_size) * self.blk_size
        if f & BlkFeature.SIZE_MAX and cfg.size_max:
            self.size_max = max(int(cfg.size_max), self.blk_size)
        if f & BlkFeature.SEG_MAX:
            self.seg_max = int(cfg.seg_max)
        if f & BlkFeature.MQ:
            n = int(cfg.num_queues)
            if not 1 <= n <= len(self.dev.endpoints):
                raise RemoteProtocolError(
                    f"{self.name}: num_queues {n} but {len(self.dev.endpoints)} vqs",
                    reason="config",
                )
            self.num_queues = n
        self.queues = list(self.dev.endpoints[: self.num_queues])
        if f & BlkFeature.DISCARD:
            self.max_discard_sectors = int(cfg.max_discard_sectors)
            self.max_discard_seg = max(1, int(cfg.max_discard_seg))
        if f & BlkFeature.WRITE_ZEROES:
            self.max_write_zeroes_sectors = int(cfg.max_write_zeroes_sectors)
            self.max_write_zeroes_seg = max(1, int(cfg.max_write_zeroes_seg))
            self.write_zeroes_may_unmap = bool(cfg.write_zeroes_may_unmap)
        self._limit = self._max_request()

    @property
    def size(self) -> int:
        """Capacity in bytes."""
        return self.capacity * SECTOR_SIZE

    # -- Driver --------------------------------------------------------------------
    def config_changed(self) -> None:
        """The host resized the disk (or changed other config): re-read it."""
        self.config_changes += 1
        try:
            self._read_config()
        except RemoteProtocolError:
            self.capacity = 0

    def detach(self, exc: BrokenResourceError) -> None:
        """The device went away: every later request raises ``exc``'s message."""
        self._closed = exc

    # -- buffers -------------------------------------------------------------------
    def buffer(self, size: int) -> DmaBuffer:
        """A card-RAM buffer for zero-copy ``read_into``/``write``.

        Raises:
            ResourceError: card RAM exhausted.
            LocalProtocolError: ``size`` <= 0.
        """
        return DmaBuffer(self.dev, size)

    # -- raw requests ------------------------------------------------------------------
    def _pick(self) -> DriverEndpoint:
        qs = self.queues
        if len(qs) == 1:
            return qs[0]
        return min(qs, key=lambda q: q.outstanding)

    def _data_segments(self, addr: int, length: int) -> list[tuple[int, int]]:
        step = self.size_max
        if length <= step:
            return [(addr, length)]
        return [(addr + o, min(step, length - o)) for o in range(0, length, step)]

    def _header_slots(self) -> _HeaderSlots | None:
        """The slots, made on the first request; None if card RAM could not hold them
        (then every request allocates its own header, as before)."""
        if self._slots is None and not self._slots_failed:
            n = sum(ep.size for ep in self.dev.endpoints)
            try:
                self._slots = _HeaderSlots(self.dev, n)
            except MicError:
                self._slots_failed = True
        return self._slots

    async def _submit(
        self,
        req_type: int,
        sector: int,
        out: tuple[int, int] | None,
        into: tuple[int, int] | None,
        extra_out: bytes = b"",
    ) -> int:
        """One chain: header (+ ``extra_out`` bytes) (+ data out) | (data in) + status.

        ``out``/``into`` are ``(card address, length)`` of caller-owned card RAM.
        Returns the status byte.
        """
        if self._closed is not None:
            raise BrokenResourceError(str(self._closed))
        slots = None if extra_out else (self._slots or self._header_slots())
        if slots is not None and slots.free:
            i = slots.free.pop()
            off = i * _SLOT
            view = slots.view
            haddr = slots.addr + off
            REQ_HEADER.pack_into(view, off, req_type, sector)
            view[off + _STATUS_AT] = 0xFF
            rd = [(haddr, _STATUS_AT)]
            wr: list[tuple[int, int]] = []
            if out is not None and out[1]:
                rd += self._data_segments(*out)
            if into is not None and into[1]:
                wr += self._data_segments(*into)
            wr.append((haddr + _STATUS_AT, STATUS_SIZE))
            # On an exception the endpoint has called releases[i] (slot given back).
            await self._pick().submit(rd, wr, release=slots.releases[i])
            status = view[off + _STATUS_AT]
            slots.free.append(i)
            return status
        dev = self.dev
        mem = dev.mem
        meta = REQ_HEADER.size + len(extra_out)
        addr = dev.alloc(meta + STATUS_SIZE, _ALIGN)
        try:
            hv = mem.view(addr, meta + STATUS_SIZE, True)
            REQ_HEADER.pack_into(hv, 0, req_type, sector)
            if extra_out:
                hv[REQ_HEADER.size : meta] = extra_out
            hv[meta] = 0xFF
        except BaseException:
            dev.free(addr)
            raise
        readable = [(addr, meta)]
        writable: list[tuple[int, int]] = []
        if out is not None and out[1]:
            readable += self._data_segments(*out)
        if into is not None and into[1]:
            writable += self._data_segments(*into)
        writable.append((addr + meta, STATUS_SIZE))
        await self._pick().submit(readable, writable, release=lambda: dev.free(addr))
        try:
            return int(mem.view(addr + meta, 1)[0])
        finally:
            dev.free(addr)

    async def request(
        self, req_type: int, sector: int = 0, data: bytes = b"", read_len: int = 0
    ) -> tuple[int, bytes]:
        """Send one raw request; returns ``(status, data read)``. No local checks
        (tests use it to send what a well-behaved driver never would).

        Raises:
            BrokenResourceError: the device was removed, reset or broken.
            ResourceError: card RAM exhausted.
        """
        if self._closed is not None:
            raise BrokenResourceError(str(self._closed))
        n = len(data) + read_len
        if not n:
            return await self._submit(req_type, sector, None, None), b""
        with self.buffer(n) as buf:
            buf.view[: len(data)] = data
            status = await self._submit(
                req_type,
                sector,
                (buf.addr, len(data)) if data else None,
                (buf.addr + len(data), read_len) if read_len else None,
            )
            return status, bytes(buf.view[len(data) :]) if read_len else b""

    def _check(self, op: str, status: int) -> None:
        if status != BlkStatus.OK:
            raise BlockIOError(f"{self.name}: {op} failed with {status_name(status)}", status)

    def _args(self, sector: int, nbytes: int) -> None:
        if sector < 0 or nbytes < 0:
            raise LocalProtocolError(f"{self.name}: negative sector or length")
        if nbytes % self.blk_size:
            raise LocalProtocolError(
                f"{self.name}: {nbytes} B is not whole {self.blk_size}-byte blocks"
            )

    def _max_request(self) -> int:
        """Largest data length one chain carries (seg_max segments of size_max)."""
        segs = self.seg_max or (self.queue.max_segments() - 2)
        segs = max(1, min(segs, self.queue.max_segments() - 2))
        return max(self.blk_size, segs * self.size_max // self.blk_size * self.blk_size)

    async def _rw(self, req_type: int, sector: int, addr: int, nbytes: int) -> None:
        """Read or write ``nbytes`` at ``sector`` from/into card RAM at ``addr``,
        split into requests the host accepts (concurrently)."""
        limit = self._limit
        if nbytes <= limit:  # one request: no closure, no gather
            seg = (addr, nbytes)
            if req_type == BlkReqType.IN:
                status = await self._submit(req_type, sector, None, seg)
            else:
                status = await self._submit(req_type, sector, seg, None)
            if status != BlkStatus.OK:
                op = "read" if req_type == BlkReqType.IN else "write"
                self._check(f"{op} of {nbytes // SECTOR_SIZE} sectors at {sector}", status)
            return
        op = "read" if req_type == BlkReqType.IN else "write"

        async def one(off: int, n: int) -> None:
            seg = (addr + off, n)
            s = sector + off // SECTOR_SIZE
            if req_type == BlkReqType.IN:
                status = await self._submit(req_type, s, None, seg)
            else:
                status = await self._submit(req_type, s, seg, None)
            self._check(f"{op} of {n // SECTOR_SIZE} sectors at {s}", status)

        await asyncio.gather(*(one(o, min(limit, nbytes - o)) for o in range(0, nbytes, limit)))

    # -- the API ---------------------------------------------------------------------
    async def read(self, sector: int, count: int) -> bytes:
        """Read ``count`` 512-byte sectors from ``sector``.

        Raises:
            LocalProtocolError: negative arguments, not whole logical blocks.
            BlockIOError: the host answered IOERR/UNSUPP (e.g. out of range).
            BrokenResourceError: the device went away.
            ResourceError: card RAM exhausted.
        """
        nbytes = count * SECTOR_SIZE
        self._args(sector, nbytes)
        if not nbytes:
            return b""
        with self.buffer(nbytes) as buf:
            await self._rw(BlkReqType.IN, sector, buf.addr, nbytes)
            return bytes(buf.view)

    async def read_into(self, sector: int, buf: DmaBuffer | memoryview | bytearray) -> int:
        """Fill ``buf`` (whole logical blocks) from ``sector``; returns its length.

        A :class:`DmaBuffer` is filled by the host directly (zero-copy); any
        other writable buffer goes through a bounce buffer.

        Raises: as :meth:`read`.
        """
        if isinstance(buf, DmaBuffer):
            self._args(sector, buf.size)
            await self._rw(BlkReqType.IN, sector, buf.addr, buf.size)
            return buf.size
        target = memoryview(buf).cast("B")
        n = len(target)
        self._args(sector, n)
        if n:
            with self.buffer(n) as bounce:
                await self._rw(BlkReqType.IN, sector, bounce.addr, n)
                target[:] = bounce.view
        return n

    async def write(self, sector: int, data: DmaBuffer | bytes | bytearray | memoryview) -> None:
        """Write ``data`` (whole logical blocks) at ``sector``.

        A :class:`DmaBuffer` is read by the host directly (zero-copy); other
        bytes-like data is copied into a bounce buffer first.

        Raises:
            LocalProtocolError: ``data`` is not whole blocks, negative sector.
            BlockIOError: the host refused (out of range, read-only image, I/O error).
            BrokenResourceError: the device went away.
        """
        if isinstance(data, DmaBuffer):
            self._args(sector, data.size)
            await self._rw(BlkReqType.OUT, sector, data.addr, data.size)
            return
        src = memoryview(data).cast("B")
        self._args(sector, len(src))
        if not len(src):
            return
        with self.buffer(len(src)) as bounce:
            bounce.view[:] = src
            await self._rw(BlkReqType.OUT, sector, bounce.addr, len(src))

    async def flush(self) -> None:
        """Make every write completed so far durable (the host ``fsync``s the image).

        Raises:
            BlockIOError: the host reported an error.
            BrokenResourceError: the device went away.
        """
        status = await self._submit(BlkReqType.FLUSH, 0, None, None)
        self._check("flush", status)

    async def get_id(self) -> bytes:
        """The device serial (up to 20 bytes, trailing NULs stripped).

        Raises: BlockIOError, BrokenResourceError.
        """
        status, data = await self.request(BlkReqType.GET_ID, read_len=ID_BYTES)
        self._check("get_id", status)
        return data.rstrip(b"\0")

    async def _ranges(
        self, req_type: int, ranges: Sequence[tuple[int, int]], flags: int, what: str
    ) -> None:
        if req_type == BlkReqType.DISCARD:
            supported, max_sectors, max_seg = (
                self.discard_supported,
                self.max_discard_sectors,
                self.max_discard_seg,
            )
        else:
            supported, max_sectors, max_seg = (
                self.write_zeroes_supported,
                self.max_write_zeroes_sectors,
                self.max_write_zeroes_seg,
            )
        if not supported:
            raise BlockIOError(f"{self.name}: {what} not supported by the device", BlkStatus.UNSUPP)
        segs: list[tuple[int, int]] = []
        for sector, count in ranges:
            self._args(sector, count * SECTOR_SIZE)
            step = max_sectors or count
            segs += [
                (s, min(step, sector + count - s)) for s in range(sector, sector + count, step)
            ]
        for i in range(0, len(segs), max_seg):
            chunk = segs[i : i + max_seg]
            payload = build_segments(chunk, flags)
            status = await self._submit(req_type, 0, None, None, extra_out=payload)
            self._check(f"{what} of {sum(n for _, n in chunk)} sectors", status)

    async def discard(self, sector: int, count: int) -> None:
        """Tell the host ``count`` sectors from ``sector`` are unused (it punches a hole;
        they read back as zeros).

        Raises:
            BlockIOError: not supported (UNSUPP), out of range or read-only (IOERR).
            LocalProtocolError: bad arguments.
        """
        if count:
            await self._ranges(BlkReqType.DISCARD, [(sector, count)], 0, "discard")

    async def discard_ranges(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Discard several ``(sector, count)`` ranges (up to ``max_discard_seg`` per request)."""
        await self._ranges(BlkReqType.DISCARD, [r for r in ranges if r[1]], 0, "discard")

    async def write_zeroes(self, sector: int, count: int, *, unmap: bool = False) -> None:
        """Zero ``count`` sectors from ``sector``; ``unmap`` lets the host deallocate them.

        Raises: as :meth:`discard`.
        """
        if count:
            flags = WRITE_ZEROES_FLAG_UNMAP if unmap and self.write_zeroes_may_unmap else 0
            await self._ranges(BlkReqType.WRITE_ZEROES, [(sector, count)], flags, "write_zeroes")

    async def read_many(self, requests: list[tuple[int, int]]) -> list[bytes]:
        """Several reads outstanding at once (real queue depth); results in order."""
        return list(await asyncio.gather(*(self.read(s, n) for s, n in requests)))

    def info(self) -> dict[str, Any]:
        """What ``blkinfo`` shows: geometry, limits, features, queues (JSON-ready)."""
        return {
            "name": self.name,
            "path": f"/dev/{self.name}",
            "capacity": self.capacity,
            "size": self.size,
            "blk_size": self.blk_size,
            "physical_block_size": self.physical_block_size,
            "opt_io_size": self.opt_io_size,
            "read_only": self.read_only,
            "flush": self.flush_supported,
            "discard": self.discard_supported,
            "write_zeroes": self.write_zeroes_supported,
            "size_max": self.size_max,
            "seg_max": self.seg_max,
            "num_queues": self.num_queues,
            "queue_size": self.queue.size,
            "removed": self._closed is not None,
        }
