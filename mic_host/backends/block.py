"""virtio-blk backend over a raw image file (virtio 1.2 §5.2).

Replaces mpssd's block thread (notes §3, §4.4) and fixes what it got wrong:

- FLUSH is offered and really ``fsync``s: when a FLUSH completes, every write
  the device acknowledged before the FLUSH arrived is on stable storage
  (acknowledged writes have returned from ``pwritev``, so the ``fsync`` covers
  them). A driver that does not negotiate FLUSH gets a write-through device
  (every write is ``fdatasync``'d before it is acknowledged, spec §5.2.6.2).
- Every request is checked before a byte moves: header and data directions,
  lengths in whole logical blocks, sectors inside the capacity, GET_ID room,
  DISCARD/WRITE_ZEROES segments (count, range, flags). A bad request gets
  ``IOERR`` or ``UNSUPP``; nothing is ever written outside the request's range,
  and no request, however malformed, escapes as an exception (a chain without
  room for a status byte is completed with length 0).
- File-system errors (``EIO``, ``ENOSPC``...) are reported in the status byte,
  counted and logged, instead of being swallowed.
- GET_ID answers the configured serial, not bytes of the image.
- DISCARD punches holes (``fallocate(PUNCH_HOLE | KEEP_SIZE)`` through ctypes;
  writes zeroes where the file system cannot), WRITE_ZEROES zeroes a range
  (unmapping it when the driver allows it), and VIRTIO_BLK_F_MQ spreads
  requests over up to :data:`MAX_QUEUES` queues served concurrently.

Data moves with ``os.preadv``/``os.pwritev`` straight between the file and the
chain's memoryviews (card memory), with no intermediate copy. Requests up to
``thread_threshold`` bytes run inline on the event loop (a page-cache hit
costs less than a thread hop); bigger ones, FLUSH, DISCARD and WRITE_ZEROES run
in the backend's worker threads, so one slow ``fsync`` never stalls the other
queues. ``bench/block.py`` measured the alternatives (``aiofiles``, the DMA
engine through a host bounce buffer); see ``docs/block.md``. What is done to the
image file itself (creating it, punching holes, writing zeros) is in
:mod:`mic_host.backends.imagefile`.

Must not import ``transport`` or ``mic_card``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from mic_host.backends import BackendContext
from mic_host.backends.datapath import DEFAULT_DATA_PATH, BlockDataPath
from mic_host.backends.imagefile import create_image, punch_hole, write_zeros
from mic_host.backends.imagelock import lock_image
from mic_host.config.files import open_image
from mic_host.config.limits import (
    BLK_SIZE_MAX,
    BLK_SIZE_MIN,
    BLOCK_MAX_QUEUES,
    BLOCK_QUEUE_SIZE,
    BLOCK_QUEUE_SIZE_MIN,
)
from mic_host.endpoint import QueueEndpoint
from virtio import trace
from virtio.blk import ID_BYTES, STATUS_SIZE, WRITE_ZEROES_FLAG_UNMAP, segment_flags_ok
from virtio.blk import REQ_HEADER as _REQ_HEADER
from virtio.blk import SEGMENT as _SEGMENT
from virtio.constants import SECTOR_SIZE, BlkFeature, BlkReqType, BlkStatus, DeviceType
from virtio.errors import ConfigError
from virtio.layouts import BlkConfig
from virtio.split import Chain, slice_segments

__all__ = [
    "BLOCK_QUEUE_SIZE",
    "ID_BYTES",
    "MAX_QUEUES",
    "SIZE_MAX",
    "THREAD_THRESHOLD",
    "BlockBackend",
    "punch_hole",
]

log = logging.getLogger(__name__)

#: Most request queues one device offers (Linux VOP allowed 4 vqs per device).
#: It, the default queue size and the blk_size range live in mic_host.config.limits:
#: the config checks the same bounds at load.
MAX_QUEUES = BLOCK_MAX_QUEUES
#: Requests moving more bytes than this run in a worker thread. Measured (bench/block.py,
#: host_io): a 1 MiB preadv inline runs at ~5.8 GB/s, through a thread hop at ~3.3 GB/s.
THREAD_THRESHOLD = 4 << 20
#: A batch's first half is published once done if its last request moved this much:
#: the card resubmits it while the host reads the rest (docs/throughput.md).
PIPELINE_BYTES = 256 << 10
#: Largest single data segment offered in ``size_max`` (VIRTIO_BLK_F_SIZE_MAX).
SIZE_MAX = 4 << 20
#: DISCARD / WRITE_ZEROES limits offered in the config space.
MAX_DISCARD_SECTORS = 1 << 23  # 4 GiB per segment
MAX_DISCARD_SEG = 32

#: The request header and segment twins, bound by assignment so that
#: ``REQ_HEADER.unpack_from(...)`` compiles to LOAD_METHOD (CPython 3.11 does not
#: use it on names bound by an import; see ``virtio/split/device.py``).
REQ_HEADER = _REQ_HEADER
SEGMENT = _SEGMENT


@dataclass(slots=True)
class _Io:
    """A checked request, ready to run (inline or in a thread)."""

    kind: int
    offset: int = 0  # bytes
    length: int = 0  # bytes
    bufs: list[memoryview] | None = None
    segments: list[tuple[int, int, int]] | None = None  # (offset, length, flags)
    dma: list[tuple[int, int]] | None = None  # card segments to DMA (data_path), else CPU


class BlockBackend:
    """A virtio-blk device backed by a raw image file.

    Options (``create_backend("block", ...)``; the config's ``image`` is
    ``path``): ``name`` (host device name), ``read_only``, ``serial`` (GET_ID
    answer, at most 20 bytes; default from the file name), ``create`` +
    ``size`` (create a sparse image of ``size`` bytes if missing),
    ``queue_size`` (power of two 4..256), ``num_queues`` (1..4; more than one
    offers VIRTIO_BLK_F_MQ), ``blk_size`` (logical block size, power of two
    512..65536: requests must be whole, aligned blocks), ``discard`` (offer
    DISCARD and WRITE_ZEROES, default true), ``thread_threshold`` (bytes), ``force_share``
    (QEMU's ``share-rw``), ``data_path`` and ``dma_threshold`` (:mod:`.datapath`). The
    caller may pass ``label`` (what errors call the device, "" for nothing but
    the path), ``card`` and ``state_dir`` (recorded with the image lock).

    The image is locked while it is open, as QEMU locks it
    (:mod:`mic_host.backends.imagelock`): read-write excludes every other
    open, read-only may be shared with other read-only opens.

    The image must be a regular file or a block device (sized by ``lseek``)
    holding at least one logical block; it is opened without blocking, so a
    FIFO is refused instead of stalling the daemon. An image created here is
    0600 whatever the umask.

    Raises (constructor):
        ConfigError: the file is missing or unusable (a FIFO, a character
            device, empty), ``size`` is not a positive multiple of
            ``blk_size`` or too large for the file system, the serial is too
            long, a count or size is out of range.
        ImageLockedError: another card, daemon or process holds the image
            (the message names it).
    """

    device_type = int(DeviceType.BLOCK)

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        name: str = "block",
        read_only: bool = False,
        serial: str | bytes | None = None,
        create: bool = False,
        size: int | None = None,
        queue_size: int = BLOCK_QUEUE_SIZE,
        num_queues: int = 1,
        blk_size: int = SECTOR_SIZE,
        discard: bool = True,
        thread_threshold: int = THREAD_THRESHOLD,
        force_share: bool = False,
        data_path: str = DEFAULT_DATA_PATH,
        dma_threshold: int | None = None,
        label: str | None = None,
        card: str | None = None,
        state_dir: str | None = None,
    ) -> None:
        self.name = name
        # what errors call the device: the caller knows what the user chose
        # (a name, or nothing: then the path alone); default "block <name>: "
        where = f"block {name}: " if label is None else (f"{label}: " if label else "")
        self.path = Path(path)
        self.read_only = bool(read_only)
        self.queue_size = int(queue_size)
        self.num_queues = int(num_queues)
        self.blk_size = int(blk_size)
        self.discard = bool(discard) and not self.read_only
        self.thread_threshold = int(thread_threshold)
        self.datapath = BlockDataPath(data_path, dma_threshold, where)
        if not 1 <= self.num_queues <= MAX_QUEUES:
            raise ConfigError(f"{where}num_queues {num_queues} outside 1..{MAX_QUEUES}")
        if self.queue_size < BLOCK_QUEUE_SIZE_MIN:  # VOP checks the power of two and the top
            raise ConfigError(
                f"{where}queue_size {queue_size} below {BLOCK_QUEUE_SIZE_MIN} "
                "(header, data and status need three descriptors)"
            )
        bs = self.blk_size
        if bs < BLK_SIZE_MIN or bs > BLK_SIZE_MAX or bs & (bs - 1):
            raise ConfigError(
                f"{where}blk_size {blk_size} not a power of two {BLK_SIZE_MIN}..{BLK_SIZE_MAX}"
            )
        sid = serial if serial is not None else self.path.name[:ID_BYTES]
        self.serial = sid.encode() if isinstance(sid, str) else bytes(sid)
        if len(self.serial) > ID_BYTES:
            raise ConfigError(f"{where}serial longer than {ID_BYTES} bytes")
        if create and not os.path.lexists(self.path):
            if size is None or size <= 0 or size % self.blk_size:
                raise ConfigError(
                    f"{where}cannot create {self.path}: size is needed, "
                    f"a positive multiple of {self.blk_size}"
                )
            create_image(where, self.path, size)
        try:
            fd, nbytes = open_image(self.path, os.O_RDONLY if read_only else os.O_RDWR, bs)
        except OSError as e:
            raise ConfigError(f"{where}cannot open {self.path}: {e.strerror}") from e
        except ConfigError as e:
            raise ConfigError(f"{where}{e}") from None
        try:
            self._lock = lock_image(
                fd,
                self.path,
                read_only=self.read_only,
                force_share=force_share,
                card=card,
                device=name if label is None or label else None,  # only a name the user chose
                state_dir=state_dir,
            )
        except ConfigError as e:
            os.close(fd)
            raise type(e)(f"{where}{e}") from None
        self._fd: int | None = fd
        st = os.fstat(fd)
        # mpssd rounded up; rounding down never lets the card write past the file's end.
        self.capacity = nbytes // self.blk_size * (self.blk_size // SECTOR_SIZE)
        self._phys = max(self.blk_size, min(st.st_blksize or 4096, 65536))
        self._lbs = self.blk_size // SECTOR_SIZE  # sectors per logical block
        self._pool: ThreadPoolExecutor | None = None
        self._threads: set[asyncio.Future[tuple[int, int]]] = set()
        self._features = 0  # negotiated, read at each request (changes across resets)
        self._ctx: BackendContext | None = None
        self.requests = 0
        self.reads = 0
        self.writes = 0
        self.flushes = 0
        self.discards = 0
        self.write_zeroes = 0
        self.bytes_read = 0
        self.bytes_written = 0
        self.io_errors = 0
        self.unsupported = 0
        self.malformed = 0

    # -- Backend -----------------------------------------------------------------
    def features(self) -> int:
        f = (
            BlkFeature.SEG_MAX
            | BlkFeature.SIZE_MAX
            | BlkFeature.BLK_SIZE
            | BlkFeature.TOPOLOGY
            | BlkFeature.FLUSH
        )
        if self.read_only:
            f |= BlkFeature.RO
        if self.discard:
            f |= BlkFeature.DISCARD | BlkFeature.WRITE_ZEROES
        if self.num_queues > 1:
            f |= BlkFeature.MQ
        return int(f)

    def config_bytes(self) -> bytes:
        align = self._phys // SECTOR_SIZE
        data: bytes = BlkConfig.build(
            {
                "capacity": self.capacity,
                "size_max": SIZE_MAX,
                "seg_max": self.queue_size - 2,  # minus header and status
                "geometry": {"cylinders": 0, "heads": 0, "sectors": 0},
                "blk_size": self.blk_size,
                "topology": {
                    "physical_block_exp": (self._phys // self.blk_size).bit_length() - 1,
                    "alignment_offset": 0,
                    "min_io_size": 1,
                    "opt_io_size": (1 << 20) // self.blk_size,
                },
                "writeback": 0,
                "num_queues": self.num_queues,
                "max_discard_sectors": MAX_DISCARD_SECTORS if self.discard else 0,
                "max_discard_seg": MAX_DISCARD_SEG if self.discard else 0,
                "discard_sector_alignment": align if self.discard else 0,
                "max_write_zeroes_sectors": MAX_DISCARD_SECTORS if self.discard else 0,
                "max_write_zeroes_seg": MAX_DISCARD_SEG if self.discard else 0,
                "write_zeroes_may_unmap": 1 if self.discard else 0,
            }
        )
        return data

    def queue_sizes(self) -> Sequence[int]:
        return (self.queue_size,) * self.num_queues

    async def run(self, ctx: BackendContext) -> None:
        """Serve every queue concurrently until the device is removed."""
        self._ctx = ctx
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                max_workers=max(2, self.num_queues + 1), thread_name_prefix=f"blk-{self.name}"
            )
        async with self.datapath.bind(ctx, log, self.name), asyncio.TaskGroup() as tg:
            for q in ctx.queues:
                tg.create_task(self._serve(q, tg), name=f"{self.name}-q{q.index}")

    async def aclose(self) -> None:
        """Wait for requests running in threads, then close the image."""
        if self._threads:
            await asyncio.gather(*self._threads, return_exceptions=True)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._fd is not None:
            self._lock.release()
            os.close(self._fd)
            self._fd = None

    # -- serving -------------------------------------------------------------------
    async def _serve(self, q: QueueEndpoint, tg: asyncio.TaskGroup) -> None:
        # One pass per doorbell's batch: every ready chain is checked, run and
        # completed without an await in between, then published once (the
        # endpoint flushes when the ring is empty). Requests too big to run on
        # the loop go to a thread and complete later.
        async for batch in q.batches():
            self._features = self._ctx.features if self._ctx is not None else 0
            threshold = self.thread_threshold
            inline_out = not self._writethrough
            dp = self.datapath if self.datapath.lease is not None else None
            pipe, mid = PIPELINE_BYTES, batch[len(batch) // 2 - 1] if len(batch) > 1 else None
            for chain in batch:
                checked = self._check(chain)
                if not isinstance(checked, _Io):
                    self._complete(q, chain, *checked)
                elif (
                    checked.kind == BlkReqType.IN or (checked.kind == BlkReqType.OUT and inline_out)
                ) and checked.length <= threshold:
                    checked.dma = dp.plan(chain, checked.kind, checked.length) if dp else None
                    done = self._execute(checked)
                    if trace.ON:
                        trace.mark(trace.IO_DONE)
                    self._complete(q, chain, *done)
                    if checked.length >= pipe and chain is mid:
                        q.flush()  # the card resubmits the first half meanwhile
                else:
                    tg.create_task(self._serve_in_thread(q, chain, checked))

    @property
    def _writethrough(self) -> bool:
        return not self._features & BlkFeature.FLUSH

    async def _serve_in_thread(self, q: QueueEndpoint, chain: Chain, io: _Io) -> None:
        # A thread cannot be cancelled: keep track of it so aclose() does not
        # close the image under it, and shield it so a cancelled task does not
        # pretend it stopped.
        loop = asyncio.get_running_loop()
        work = loop.run_in_executor(self._pool, self._execute, io)
        self._threads.add(work)
        work.add_done_callback(self._threads.discard)
        status, n = await asyncio.shield(work)
        self._complete(q, chain, status, n)

    def _complete(self, q: QueueEndpoint, chain: Chain, status: int | None, n: int) -> None:
        if status is not None:
            if status == BlkStatus.IOERR:
                self.io_errors += 1
            elif status == BlkStatus.UNSUPP:
                self.unsupported += 1
            chain.writable[-1][-1] = status  # the status byte is the last writable byte
            n += STATUS_SIZE
        q.put(chain, n)

    # -- checking (on the loop: cheap, no I/O) ----------------------------------------
    def _check(self, chain: Chain) -> _Io | tuple[int | None, int]:
        """Validate one request; an :class:`_Io` to run, or ``(status, 0)`` to answer now."""
        self.requests += 1
        if chain.writable_len < 1:
            self.malformed += 1
            log.warning("%s: request without a status byte; completed empty", self.name)
            return None, 0
        first = chain.readable[0] if chain.readable else b""
        if len(first) >= REQ_HEADER.size:
            rtype, sector = REQ_HEADER.unpack_from(first)
        elif chain.readable_len >= REQ_HEADER.size:
            hdr = bytearray(REQ_HEADER.size)
            chain.read_into(memoryview(hdr))
            rtype, sector = REQ_HEADER.unpack_from(hdr)
        else:
            self.malformed += 1
            return BlkStatus.IOERR, 0
        data_in = chain.writable_len - STATUS_SIZE  # writable room before the status byte
        data_out = chain.readable_len - REQ_HEADER.size
        if rtype == BlkReqType.IN:
            if data_out:  # data must be device-writable (spec 5.2.6)
                self.malformed += 1
                return BlkStatus.IOERR, 0
            if not self._range_ok(sector, data_in):
                return BlkStatus.IOERR, 0
            return _Io(
                rtype, sector * SECTOR_SIZE, data_in, slice_segments(chain.writable, 0, data_in)
            )
        if rtype == BlkReqType.OUT:
            if data_in:  # data must be device-readable
                self.malformed += 1
                return BlkStatus.IOERR, 0
            if self.read_only or not self._range_ok(sector, data_out):
                return BlkStatus.IOERR, 0
            bufs = slice_segments(chain.readable, REQ_HEADER.size, data_out)
            return _Io(rtype, sector * SECTOR_SIZE, data_out, bufs)
        if rtype == BlkReqType.FLUSH:
            return _Io(rtype)
        if rtype == BlkReqType.GET_ID:
            if data_in < ID_BYTES or data_out:
                self.malformed += 1
                return BlkStatus.IOERR, 0
            chain.write(self.serial.ljust(ID_BYTES, b"\0"))
            return BlkStatus.OK, ID_BYTES
        if rtype in (BlkReqType.DISCARD, BlkReqType.WRITE_ZEROES):
            return self._check_ranges(chain, rtype, data_in, data_out)
        return BlkStatus.UNSUPP, 0

    def _range_ok(self, sector: int, nbytes: int) -> bool:
        """Whole, aligned logical blocks inside the capacity (no overflow: ints)."""
        blk = self.blk_size
        if nbytes % blk or sector % self._lbs:
            return False
        return sector + nbytes // SECTOR_SIZE <= self.capacity

    def _check_ranges(
        self, chain: Chain, rtype: int, data_in: int, data_out: int
    ) -> _Io | tuple[int, int]:
        bit = BlkFeature.DISCARD if rtype == BlkReqType.DISCARD else BlkFeature.WRITE_ZEROES
        if not self._features & bit:
            return BlkStatus.UNSUPP, 0  # not negotiated (or not offered)
        if self.read_only:
            return BlkStatus.IOERR, 0
        n, rest = divmod(data_out, SEGMENT.size)
        if data_in or rest or not 1 <= n <= MAX_DISCARD_SEG:
            self.malformed += 1
            return BlkStatus.IOERR, 0
        raw = bytearray(chain.readable_len)
        chain.read_into(memoryview(raw))
        segments = []
        for i in range(n):
            sector, count, flags = SEGMENT.unpack_from(raw, REQ_HEADER.size + i * SEGMENT.size)
            if not segment_flags_ok(rtype, flags):
                return BlkStatus.UNSUPP, 0
            if count > MAX_DISCARD_SECTORS or not self._range_ok(sector, count * SECTOR_SIZE):
                return BlkStatus.IOERR, 0
            segments.append((sector * SECTOR_SIZE, count * SECTOR_SIZE, flags))
        return _Io(rtype, segments=segments)

    # -- executing (inline or in a worker thread) --------------------------------------
    def _execute(self, io: _Io) -> tuple[int, int]:
        """Run a checked request; returns ``(status, bytes written into the chain)``."""
        fd = self._fd
        if fd is None:
            return BlkStatus.IOERR, 0
        kind = io.kind
        try:
            if kind == BlkReqType.IN:
                (self._pread if io.dma is None else self.datapath.read)(fd, io)
                self.reads += 1
                self.bytes_read += io.length
                return BlkStatus.OK, io.length
            if kind == BlkReqType.OUT:
                (self._pwrite if io.dma is None else self.datapath.write)(fd, io)
                if self._writethrough:
                    os.fdatasync(fd)
                self.writes += 1
                self.bytes_written += io.length
                return BlkStatus.OK, 0
            if kind == BlkReqType.FLUSH:
                os.fsync(fd)
                self.flushes += 1
                return BlkStatus.OK, 0
            assert io.segments is not None
            for off, length, flags in io.segments:
                if kind == BlkReqType.DISCARD or flags & WRITE_ZEROES_FLAG_UNMAP:
                    if not punch_hole(fd, off, length):
                        write_zeros(fd, off, length)
                else:
                    write_zeros(fd, off, length)
            if self._writethrough:
                os.fdatasync(fd)
            if kind == BlkReqType.DISCARD:
                self.discards += 1
            else:
                self.write_zeroes += 1
            return BlkStatus.OK, 0
        except OSError as e:
            log.error(
                "%s: %s at byte %d failed: %s", self.name, BlkReqType(kind).name, io.offset, e
            )
            return BlkStatus.IOERR, 0

    @staticmethod
    def _pread(fd: int, io: _Io) -> None:
        assert io.bufs is not None
        done, want, pos = 0, io.length, io.offset
        bufs = io.bufs
        while done < want:
            got = os.preadv(
                fd, bufs if not done else slice_segments(bufs, done, want - done), pos + done
            )
            if got == 0:  # file shrank under us: the rest reads as zeros
                for v in slice_segments(bufs, done, want - done):
                    v[:] = bytes(len(v))
                return
            done += got

    @staticmethod
    def _pwrite(fd: int, io: _Io) -> None:
        assert io.bufs is not None
        done, want, pos = 0, io.length, io.offset
        bufs = io.bufs
        while done < want:
            done += os.pwritev(
                fd, bufs if not done else slice_segments(bufs, done, want - done), pos + done
            )

    def stats(self) -> dict[str, int]:
        return {
            "capacity": self.capacity,
            "requests": self.requests,
            "reads": self.reads,
            "writes": self.writes,
            "flushes": self.flushes,
            "discards": self.discards,
            "write_zeroes": self.write_zeroes,
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "io_errors": self.io_errors,
            "unsupported": self.unsupported,
            "malformed": self.malformed,
            **self.datapath.stats(),
        }
