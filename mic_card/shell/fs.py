"""The card's tiny file namespace (:class:`CardFS`): ``/dev`` and a RAM-backed ``/tmp``.

Files: ``/dev/zero``, ``/dev/null``, ``/dev/urandom``, one ``/dev/<name>``
per bound block device (``/dev/vda``...: byte offsets over whole, aligned
block requests), and a bounded ``/tmp``. Errors are coreutils-style
(:class:`~mic_card.shell.base.FsError`: ``path: strerror``).

Imports :mod:`mic_card.shell.base` and :mod:`mic_card.services` only; never
the card OS, a driver module or the command registry.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any, Protocol

from mic_card.services import CardServices
from mic_card.shell.base import FsError
from virtio.constants import DeviceType
from virtio.errors import BrokenResourceError, MicError

__all__ = ["IO_CHUNK", "CardFS", "File", "TmpFile"]

SECTOR = 512
IO_CHUNK = 64 * 1024


class File(Protocol):
    """An open file: ``size`` is None for an endless stream."""

    path: str

    @property
    def size(self) -> int | None: ...

    async def pread(self, offset: int, n: int) -> bytes: ...

    async def pwrite(self, offset: int, data: bytes) -> int: ...

    async def flush(self) -> None: ...


class _Zero:
    def __init__(self, path: str, fill: Callable[[int], bytes]) -> None:
        self.path = path
        self._fill = fill

    @property
    def size(self) -> int | None:
        return None

    async def pread(self, offset: int, n: int) -> bytes:
        return self._fill(n)

    async def pwrite(self, offset: int, data: bytes) -> int:
        return len(data)

    async def flush(self) -> None:
        pass


class _Null(_Zero):
    @property
    def size(self) -> int | None:
        return 0

    async def pread(self, offset: int, n: int) -> bytes:
        return b""


class TmpFile:
    def __init__(self, fs: CardFS, path: str, data: bytearray) -> None:
        self.path = path
        self._fs = fs
        self.data = data

    @property
    def size(self) -> int | None:
        return len(self.data)

    async def pread(self, offset: int, n: int) -> bytes:
        return bytes(self.data[offset : offset + n])

    async def pwrite(self, offset: int, data: bytes) -> int:
        grow = max(0, offset + len(data) - len(self.data))
        if self._fs.tmp_used + grow > self._fs.tmp_limit:
            raise FsError(self.path, "No space left on device")
        if offset > len(self.data):
            self.data += bytes(offset - len(self.data))
        self.data[offset : offset + len(data)] = data
        return len(data)

    async def flush(self) -> None:
        pass


class _BlockFile:
    """A block device as a file: byte offsets over whole, aligned block requests."""

    def __init__(self, path: str, blk: Any) -> None:
        self.path = path
        self.blk = blk
        self.bs = max(SECTOR, int(getattr(blk, "blk_size", SECTOR) or SECTOR))

    @property
    def size(self) -> int | None:
        return int(self.blk.capacity) * SECTOR

    async def _read_aligned(self, start: int, end: int) -> bytes:
        out = bytearray()
        for off in range(start, end, IO_CHUNK):
            n = min(IO_CHUNK, end - off)
            out += await self.blk.read(off // SECTOR, n // SECTOR)
        return bytes(out)

    async def pread(self, offset: int, n: int) -> bytes:
        size = self.size or 0
        end = min(offset + n, size)
        if offset >= end:
            return b""
        bs = self.bs
        a, b = offset // bs * bs, -(-end // bs) * bs
        try:
            data = await self._read_aligned(a, min(b, -(-size // bs) * bs))
        except BrokenResourceError as e:
            raise FsError(self.path, f"Input/output error ({e})") from e
        except MicError as e:
            raise FsError(self.path, f"Input/output error ({e})") from e
        return data[offset - a : end - a]

    async def pwrite(self, offset: int, data: bytes) -> int:
        if getattr(self.blk, "read_only", False):
            raise FsError(self.path, "Read-only file system")
        size = self.size or 0
        fit = max(0, min(len(data), size - offset))
        if fit:
            bs = self.bs
            end = offset + fit
            a, b = offset // bs * bs, -(-end // bs) * bs
            buf = bytearray()
            if a != offset:
                buf += (await self.pread(a, bs))[: offset - a]
            buf += data[:fit]
            if b != end:
                tail = await self.pread(end, b - end)
                buf += tail + bytes(b - end - len(tail))
            try:
                for off in range(0, len(buf), IO_CHUNK):
                    await self.blk.write((a + off) // SECTOR, bytes(buf[off : off + IO_CHUNK]))
            except MicError as e:
                raise FsError(self.path, f"Input/output error ({e})") from e
        if fit < len(data):
            raise FsError(self.path, "No space left on device")
        return fit

    async def flush(self) -> None:
        if getattr(self.blk, "flush_supported", True):
            try:
                await self.blk.flush()
            except MicError as e:
                raise FsError(self.path, f"Input/output error ({e})") from e


class CardFS:
    """The card's files: ``/dev`` (devices) and a RAM-backed ``/tmp`` of ``tmp_limit`` bytes."""

    DEVS = ("null", "urandom", "zero")

    def __init__(self, card: CardServices | None, *, tmp_limit: int = 16 << 20) -> None:
        self.card = card
        self.tmp: dict[str, bytearray] = {}
        self.tmp_limit = tmp_limit

    @property
    def tmp_used(self) -> int:
        return sum(len(d) for d in self.tmp.values())

    @staticmethod
    def normalize(path: str) -> str:
        if not path.startswith("/"):
            path = "/tmp/" + path  # the shell's working directory is /tmp
        return os.path.normpath(path).replace("//", "/")

    def _block_devices(self) -> dict[str, Any]:
        if self.card is None:
            return {}
        out: dict[str, Any] = {}
        for d in self.card.devices():
            if d.get("type") == DeviceType.BLOCK and d.get("driver") and d.get("state") == "live":
                with contextlib.suppress(MicError):
                    out[str(d["name"])] = self.card.device(str(d["name"]))
        return out

    def open(self, path: str, *, write: bool = False, truncate: bool = False) -> File:
        """Raises: FsError (no such file, not permitted...)."""
        p = self.normalize(path)
        parent, _, name = p.rpartition("/")
        if parent == "/dev":
            if name == "zero":
                return _Zero(path, bytes)
            if name == "urandom":
                return _Zero(path, os.urandom)
            if name == "null":
                return _Null(path, bytes)
            blk = self._block_devices().get(name)
            if blk is not None:
                return _BlockFile(path, blk)
            raise FsError(path, "No such file or directory")
        if parent == "/tmp" and name:
            data = self.tmp.get(name)
            if data is None:
                if not write:
                    raise FsError(path, "No such file or directory")
                data = self.tmp[name] = bytearray()
            elif truncate:
                data.clear()
            return TmpFile(self, path, data)
        if p in ("/", "/dev", "/tmp"):
            raise FsError(path, "Is a directory")
        raise FsError(path, "No such file or directory" if not write else "Permission denied")

    def listdir(self, path: str) -> list[tuple[str, int | None]]:
        """(name, size) entries of a directory, or of one file. Raises: FsError."""
        p = self.normalize(path)
        if p == "/":
            return [("dev", None), ("tmp", None)]
        if p == "/dev":
            names = sorted([*self.DEVS, *self._block_devices()])
            return [(n, self.open("/dev/" + n).size if n not in self.DEVS else 0) for n in names]
        if p == "/tmp":
            return [(n, len(d)) for n, d in sorted(self.tmp.items())]
        f = self.open(path)
        return [(path, f.size)]

    def remove(self, path: str) -> None:
        """Raises: FsError."""
        p = self.normalize(path)
        parent, _, name = p.rpartition("/")
        if parent == "/tmp" and name in self.tmp:
            del self.tmp[name]
            return
        if p in ("/", "/dev", "/tmp"):
            raise FsError(path, "Is a directory")
        self.open(path)  # raises "No such file or directory" if it is not there
        raise FsError(path, "Operation not permitted")
