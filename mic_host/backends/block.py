"""virtio-blk backend over a raw image file (virtio 1.2 §5.2).

Replaces mpssd's block thread (notes §3, §4.4) and fixes it: FLUSH is
offered and really ``fsync``s, sectors are bounds-checked, errors are reported
as ``VIRTIO_BLK_S_IOERR`` instead of being swallowed, GET_ID returns the
configured serial (not bytes of the image), unknown requests get UNSUPP, and
a read-only image is offered with ``VIRTIO_BLK_F_RO``. Data moves with
``os.preadv``/``os.pwritev`` straight between the file and the chain's
memoryviews (card memory), without an intermediate copy; large requests run
in a worker thread so the event loop keeps serving other queues.

No request, however malformed, escapes as an exception: it is answered with
an error status or, if it has no room for one, completed with length 0.

Must not import ``transport`` or ``mic_card``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from construct import ConstructError

from mic_host.backends import BackendContext
from mic_host.endpoint import QueueEndpoint
from virtio.constants import SECTOR_SIZE, BlkFeature, BlkReqType, BlkStatus, DeviceType
from virtio.errors import ConfigError
from virtio.layouts import BlkConfig, BlkReqHeader
from virtio.split import Chain

__all__ = ["BLOCK_QUEUE_SIZE", "ID_BYTES", "THREAD_THRESHOLD", "BlockBackend"]

log = logging.getLogger(__name__)

BLOCK_QUEUE_SIZE = 128
#: GET_ID answers exactly this many bytes (VIRTIO_BLK_ID_BYTES).
ID_BYTES = 20
#: Requests moving more bytes than this run in a worker thread.
THREAD_THRESHOLD = 64 * 1024
_HDR = int(BlkReqHeader.sizeof())


def _slice(views: Sequence[memoryview], start: int, length: int) -> list[memoryview]:
    """The byte range ``[start, start+length)`` of a scatter list, as views."""
    out: list[memoryview] = []
    for v in views:
        n = len(v)
        if start >= n:
            start -= n
            continue
        take = min(n - start, length)
        out.append(v[start : start + take])
        length -= take
        start = 0
        if not length:
            break
    return out


class BlockBackend:
    """A virtio-blk device backed by a raw image file.

    Options (``create_backend("block", ...)``): ``path`` (image file),
    ``name`` (host device name, default ``"block"``), ``read_only``,
    ``serial`` (GET_ID answer, at most 20 bytes; default from the file name),
    ``create`` + ``size`` (create the image of ``size`` bytes if missing),
    ``queue_size`` (power of two <= 256).

    Raises (constructor):
        ConfigError: the file is missing or unusable, ``size`` is not a
            positive multiple of 512, the serial is too long.
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
    ) -> None:
        self.name = name
        self.path = Path(path)
        self.read_only = read_only
        self.queue_size = queue_size
        sid = serial if serial is not None else self.path.name[:ID_BYTES]
        self.serial = sid.encode() if isinstance(sid, str) else bytes(sid)
        if len(self.serial) > ID_BYTES:
            raise ConfigError(f"block {name}: serial longer than {ID_BYTES} bytes")
        if create and not self.path.exists():
            if size is None or size <= 0 or size % SECTOR_SIZE:
                raise ConfigError(
                    f"block {name}: create needs size, a positive multiple of {SECTOR_SIZE}"
                )
            with self.path.open("xb") as f:
                f.truncate(size)
        try:
            self._fd: int | None = os.open(self.path, os.O_RDONLY if read_only else os.O_RDWR)
        except OSError as e:
            raise ConfigError(f"block {name}: cannot open {self.path}: {e.strerror}") from e
        st = os.fstat(self._fd)
        # mpssd rounded up; rounding down never lets the card write past the file's end.
        self.capacity = st.st_size // SECTOR_SIZE
        self._threads: set[asyncio.Future[tuple[int | None, int]]] = set()
        self.requests = 0
        self.io_errors = 0
        self.unsupported = 0
        self.malformed = 0

    # -- Backend -----------------------------------------------------------------
    def features(self) -> int:
        f = BlkFeature.SEG_MAX | BlkFeature.BLK_SIZE | BlkFeature.FLUSH
        if self.read_only:
            f |= BlkFeature.RO
        return int(f)

    def config_bytes(self) -> bytes:
        data: bytes = BlkConfig.build(
            {
                "capacity": self.capacity,
                "size_max": 0,
                "seg_max": self.queue_size - 2,
                "geometry": {"cylinders": 0, "heads": 0, "sectors": 0},
                "blk_size": SECTOR_SIZE,
                "topology": {
                    "physical_block_exp": 0,
                    "alignment_offset": 0,
                    "min_io_size": 0,
                    "opt_io_size": 0,
                },
                "writeback": 0,
                "num_queues": 1,
                "max_discard_sectors": 0,
                "max_discard_seg": 0,
                "discard_sector_alignment": 0,
                "max_write_zeroes_sectors": 0,
                "max_write_zeroes_seg": 0,
                "write_zeroes_may_unmap": 0,
            }
        )
        return data

    def queue_sizes(self) -> Sequence[int]:
        return (self.queue_size,)

    async def run(self, ctx: BackendContext) -> None:
        """Serve requests with real queue depth: small ones inline, big ones in threads."""
        q = ctx.queues[0]
        async with asyncio.TaskGroup() as tg:
            async for chain in q.chains():
                if chain.readable_len + chain.writable_len > THREAD_THRESHOLD:
                    tg.create_task(self._serve_async(q, chain))
                else:
                    self._complete(q, chain, *self._handle(chain))

    async def aclose(self) -> None:
        if self._threads:
            await asyncio.gather(*self._threads, return_exceptions=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # -- requests ------------------------------------------------------------------
    async def _serve_async(self, q: QueueEndpoint, chain: Chain) -> None:
        # The thread cannot be cancelled; keep track of it so aclose() does not
        # close the image under it, and shield it so a cancelled task does not
        # pretend it stopped.
        work = asyncio.ensure_future(asyncio.to_thread(self._handle, chain))
        self._threads.add(work)
        work.add_done_callback(self._threads.discard)
        status, n = await asyncio.shield(work)
        self._complete(q, chain, status, n)

    def _complete(self, q: QueueEndpoint, chain: Chain, status: int | None, n: int) -> None:
        if status is not None:
            chain.writable[-1][-1] = status  # the status byte is the last writable byte
            n += 1
        q.put(chain, n)

    def _handle(self, chain: Chain) -> tuple[int | None, int]:
        """Serve one request; returns ``(status or None if no room for it, data bytes)``."""
        self.requests += 1
        if chain.writable_len < 1:
            self.malformed += 1
            log.warning("%s: request without a status byte; completed empty", self.name)
            return None, 0
        hdr = bytearray(_HDR)
        if chain.read_into(memoryview(hdr)) < _HDR:
            self.malformed += 1
            return BlkStatus.IOERR, 0
        try:
            h = BlkReqHeader.parse(bytes(hdr))
        except ConstructError:  # pragma: no cover - 16 bytes always parse
            self.malformed += 1
            return BlkStatus.IOERR, 0
        data_in = chain.writable_len - 1  # writable room before the status byte
        data_out = chain.readable_len - _HDR
        try:
            if h.type == BlkReqType.IN:
                return self._read(chain, h.sector, data_in)
            if h.type == BlkReqType.OUT:
                return self._write(chain, h.sector, data_out)
            if h.type == BlkReqType.FLUSH:
                if self._fd is None:
                    return BlkStatus.IOERR, 0
                os.fsync(self._fd)
                return BlkStatus.OK, 0
            if h.type == BlkReqType.GET_ID:
                if data_in < ID_BYTES:
                    self.malformed += 1
                    return BlkStatus.IOERR, 0
                ident = self.serial.ljust(ID_BYTES, b"\0")
                chain.write(ident)
                return BlkStatus.OK, ID_BYTES
        except OSError as e:
            self.io_errors += 1
            log.error("%s: %s of sector %d failed: %s", self.name, h.type, h.sector, e)
            return BlkStatus.IOERR, 0
        self.unsupported += 1
        return BlkStatus.UNSUPP, 0

    def _range_ok(self, sector: int, nbytes: int) -> bool:
        if nbytes % SECTOR_SIZE:
            return False
        return sector + nbytes // SECTOR_SIZE <= self.capacity

    def _read(self, chain: Chain, sector: int, nbytes: int) -> tuple[int, int]:
        if self._fd is None or not self._range_ok(sector, nbytes):
            self.io_errors += 1
            return BlkStatus.IOERR, 0
        bufs = _slice(chain.writable, 0, nbytes)
        done = 0
        pos = sector * SECTOR_SIZE
        while done < nbytes:
            got = os.preadv(self._fd, _slice(bufs, done, nbytes - done), pos + done)
            if got == 0:  # file shrank under us: the rest reads as zeros
                for v in _slice(bufs, done, nbytes - done):
                    v[:] = bytes(len(v))
                break
            done += got
        return BlkStatus.OK, nbytes

    def _write(self, chain: Chain, sector: int, nbytes: int) -> tuple[int, int]:
        if self.read_only or self._fd is None or not self._range_ok(sector, nbytes):
            self.io_errors += 1
            return BlkStatus.IOERR, 0
        bufs = _slice(chain.readable, _HDR, nbytes)
        done = 0
        pos = sector * SECTOR_SIZE
        while done < nbytes:
            done += os.pwritev(self._fd, _slice(bufs, done, nbytes - done), pos + done)
        return BlkStatus.OK, 0

    def stats(self) -> dict[str, int]:
        return {
            "capacity": self.capacity,
            "requests": self.requests,
            "io_errors": self.io_errors,
            "unsupported": self.unsupported,
            "malformed": self.malformed,
        }
