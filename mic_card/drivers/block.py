"""virtio-blk driver for the card (virtio 1.2 §5.2): ``vda``, ``vdb``...

Each request is one chain: the 16-byte header (readable), the data
(readable for OUT, writable for IN) and the status byte (writable), laid out
in one card-RAM allocation that is freed once the host is done with it. Many
requests may be outstanding at once (the queue's depth).

Must not import ``transport`` or ``mic_host``.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, ClassVar

from construct import ConstructError

from mic_card.endpoint import DriverEndpoint
from virtio.constants import SECTOR_SIZE, BlkFeature, BlkReqType, BlkStatus
from virtio.errors import BrokenResourceError, LocalProtocolError, MicError, RemoteProtocolError
from virtio.layouts import BlkConfig, BlkReqHeader

if TYPE_CHECKING:
    from mic_card.bus import CardDevice

__all__ = ["ID_BYTES", "BlockDevice", "BlockIOError"]

ID_BYTES = 20
_HDR = int(BlkReqHeader.sizeof())


class BlockIOError(MicError):
    """The host answered a block request with a non-OK status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class BlockDevice:
    """A virtio block device on the card.

    Attributes: ``capacity`` (512-byte sectors), ``blk_size``, ``read_only``.
    """

    FEATURES: ClassVar[int] = int(
        BlkFeature.SEG_MAX | BlkFeature.BLK_SIZE | BlkFeature.FLUSH | BlkFeature.RO
    )

    def __init__(self, dev: CardDevice) -> None:
        """Raises: RemoteProtocolError: the config space does not parse."""
        self.dev = dev
        self.name = dev.name
        self.queue: DriverEndpoint = dev.endpoints[0]
        self.capacity = 0
        self.blk_size = SECTOR_SIZE
        self.read_only = bool(dev.features & BlkFeature.RO)
        self.flush_supported = bool(dev.features & BlkFeature.FLUSH)
        self._closed: BrokenResourceError | None = None
        self.config_changes = 0
        self._read_config()

    def _read_config(self) -> None:
        raw = self.dev.read_config()
        try:
            cfg = BlkConfig.parse(raw)
        except ConstructError as e:
            raise RemoteProtocolError(
                f"{self.name}: block config of {len(raw)} B does not parse: {e}", reason="config"
            ) from e
        self.capacity = int(cfg.capacity)
        if self.dev.features & BlkFeature.BLK_SIZE and cfg.blk_size:
            self.blk_size = int(cfg.blk_size)

    # -- Driver --------------------------------------------------------------------
    def config_changed(self) -> None:
        """The host resized the disk (or changed other config): re-read it."""
        self.config_changes += 1
        try:
            self._read_config()
        except RemoteProtocolError:
            self.capacity = 0

    def detach(self, exc: BrokenResourceError) -> None:
        self._closed = exc

    # -- requests ------------------------------------------------------------------
    async def request(
        self, req_type: int, sector: int = 0, data: bytes = b"", read_len: int = 0
    ) -> tuple[int, bytes]:
        """Send one raw request; returns ``(status, data read)``. No local checks.

        Raises:
            BrokenResourceError: the device was removed, reset or broken.
            ResourceError: card RAM exhausted.
        """
        if self._closed is not None:
            raise BrokenResourceError(str(self._closed))
        mem = self.dev.mem
        total = _HDR + len(data) + read_len + 1
        addr = self.dev.alloc(total, 64)
        try:
            hdr = BlkReqHeader.build({"type": req_type, "sector": sector})
            mem.view(addr, _HDR, True)[:] = hdr
            if data:
                mem.view(addr + _HDR, len(data), True)[:] = data
            status_at = addr + total - 1
            mem.view(status_at, 1, True)[0] = 0xFF
        except BaseException:
            self.dev.free(addr)
            raise
        readable = [(addr, _HDR)] + ([(addr + _HDR, len(data))] if data else [])
        writable = ([(addr + _HDR + len(data), read_len)] if read_len else []) + [(status_at, 1)]
        await self.queue.submit(readable, writable, release=lambda: self.dev.free(addr))
        try:
            status = int(mem.view(status_at, 1)[0])
            out = bytes(mem.view(addr + _HDR + len(data), read_len)) if read_len else b""
        finally:
            self.dev.free(addr)
        return status, out

    def _check(self, op: str, status: int) -> None:
        if status != BlkStatus.OK:
            name = BlkStatus(status).name if status in (0, 1, 2) else str(status)
            raise BlockIOError(f"{self.name}: {op} failed with {name}", status)

    def _bounds(self, sector: int, count: int) -> None:
        if sector < 0 or count < 0:
            raise LocalProtocolError("negative sector or count")

    async def read(self, sector: int, count: int) -> bytes:
        """Read ``count`` 512-byte sectors from ``sector``.

        Raises:
            BlockIOError: the host answered IOERR/UNSUPP (e.g. out of range).
            BrokenResourceError: the device went away.
        """
        self._bounds(sector, count)
        if count == 0:
            return b""
        status, data = await self.request(BlkReqType.IN, sector, read_len=count * SECTOR_SIZE)
        self._check(f"read of {count} sectors at {sector}", status)
        return data

    async def write(self, sector: int, data: bytes) -> None:
        """Write ``data`` (a multiple of 512 bytes) at ``sector``.

        Raises:
            LocalProtocolError: ``data`` is not whole sectors.
            BlockIOError: the host refused (out of range, read-only image).
            BrokenResourceError: the device went away.
        """
        self._bounds(sector, 0)
        if len(data) % SECTOR_SIZE:
            raise LocalProtocolError(f"write of {len(data)} B is not whole sectors")
        if not data:
            return
        status, _ = await self.request(BlkReqType.OUT, sector, bytes(data))
        self._check(f"write of {len(data) // SECTOR_SIZE} sectors at {sector}", status)

    async def flush(self) -> None:
        """Make completed writes durable (the host fsyncs the image).

        Raises:
            BlockIOError: the host reported an error.
        """
        status, _ = await self.request(BlkReqType.FLUSH)
        self._check("flush", status)

    async def get_id(self) -> bytes:
        """The device serial (up to 20 bytes, trailing NULs stripped)."""
        status, data = await self.request(BlkReqType.GET_ID, read_len=ID_BYTES)
        self._check("get_id", status)
        return data.rstrip(b"\0")

    async def read_many(self, requests: list[tuple[int, int]]) -> list[bytes]:
        """Several reads outstanding at once (real queue depth); results in order."""
        return list(await asyncio.gather(*(self.read(s, n) for s, n in requests)))
