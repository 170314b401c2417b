"""A card console's log file (``STATE_DIR/<card>-console.log``): written off the loop, capped.

Owns :class:`ConsoleLog`: what the card writes on its console is handed over
with :meth:`ConsoleLog.append` (no I/O on the event loop, just a buffer) and
written by :meth:`ConsoleLog.run`, a task of the console backend, through
``aiofiles`` on a one-thread executor of its own (so writes stay in order and
a slow disk holds neither the loop nor the loop's default executor). The
file is created 0600 (what a card prints may be private: passwords typed at
its prompt echo there) and rotated when it reaches ``max_bytes``: the full
file becomes ``<name>.1`` (replacing the previous one), a new file starts,
so the log never takes more than twice the cap on disk whatever the card writes.

Bytes wait in memory until written; past ``max_pending`` the backend's
transmit loop waits (:meth:`ConsoleLog.room`) instead of reading more from the
card, as a serial line with flow control would. A write that fails (disk
full) drops what was pending, counts it and logs once per episode.

Imports ``aiofiles`` and the standard library; must not import the console
backend, ``transport`` or ``mic_card``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiofiles
import aiofiles.os

from virtio.errors import ConfigError

__all__ = ["LOG_MAX_BYTES", "LOG_MAX_PENDING", "ConsoleLog"]

log = logging.getLogger(__name__)

#: Rotate the console log at this size (one ``.1`` kept): a day of a chatty
#: shell session is well under it, a flood costs at most 16 MiB of disk.
LOG_MAX_BYTES = 8 << 20
#: Bytes waiting for the disk before the card's console output is held back.
LOG_MAX_PENDING = 1 << 20
_WRITE_STEP = 64 << 10  # one executor job writes at most this much
_BATCH_DELAY = 0.05  # seconds a small write waits for more output to join it
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC


def _open_private(path: str | os.PathLike[str], flags: int) -> int:
    """``open(2)`` with mode 0600, and an existing file made 0600 too."""
    fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
    except OSError:
        os.close(fd)
        raise
    return fd


class ConsoleLog:
    """The console log of one console device (see the module docstring).

    Raises (constructor): ConfigError: the file cannot be opened or created.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        label: str,
        max_bytes: int = LOG_MAX_BYTES,
        max_pending: int = LOG_MAX_PENDING,
    ) -> None:
        if max_bytes <= 0 or max_pending <= 0:
            raise ConfigError(f"console {label}: log_max_bytes and max_pending must be positive")
        self.path = Path(path)
        self.label = label
        self.max_bytes = max_bytes
        self.max_pending = max_pending
        # Opened here, once, like the pty (a bad path is the attach's error,
        # not a silent loss later); every write after this is off the loop.
        try:
            fd = _open_private(self.path, _FLAGS)
        except OSError as e:
            raise ConfigError(f"console {label}: cannot open log {self.path}: {e}") from e
        self.size = os.fstat(fd).st_size
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"console-log {label}")
        raw = open(fd, "ab", buffering=0, closefd=True)  # noqa: SIM115 - closed in aclose
        self._file: Any = aiofiles.threadpool.wrap(raw, executor=self._executor)
        self._pending = bytearray()
        self._data = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._step: asyncio.Future[None] | None = None
        self._lock = asyncio.Lock()  # one step at a time: run() and flush() may overlap
        self._closed = False
        self._failing = False
        self.written = 0
        self.dropped = 0
        self.rotations = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    def append(self, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data`` for the file (never blocks, never does I/O)."""
        if self._closed or not data:
            return
        self._pending += data
        self._data.set()
        if len(self._pending) >= self.max_pending:
            self._room.clear()

    @property
    def behind(self) -> bool:
        """``max_pending`` bytes or more wait for the disk (:meth:`room` would wait)."""
        return len(self._pending) >= self.max_pending and not self._closed

    async def room(self) -> None:
        """Wait while ``max_pending`` bytes or more wait for the disk."""
        while len(self._pending) >= self.max_pending and not self._closed:
            self._room.clear()
            await self._room.wait()

    async def run(self) -> None:
        """Write what is appended, forever (a task of the backend's task group).

        Each step (a write, a rotation) runs to its end even if this task is
        cancelled: it is shielded and :meth:`aclose` waits for it, so a
        cancellation never loses or repeats bytes, and the steps keep their order.
        """
        while True:
            while not self._pending:
                self._data.clear()
                await self._data.wait()
            if len(self._pending) < _WRITE_STEP:
                # Gather a burst into one write: an interactive console outputs
                # a few bytes at a time, and a thread round trip for each would
                # cost the loop more than the echo itself.
                await asyncio.sleep(_BATCH_DELAY)
            self._step = asyncio.ensure_future(self._write_some())
            await asyncio.shield(self._step)

    async def flush(self) -> None:
        """Wait until everything appended so far is in the file (tests, shutdown)."""
        while not self._closed:
            step = self._step
            if step is not None and not step.done():
                await asyncio.shield(step)
            elif self._pending:
                await self._write_some()
            else:
                return

    async def _write_some(self) -> None:
        async with self._lock:
            if self.size >= self.max_bytes and not await self._rotate():
                return
            take = min(len(self._pending), _WRITE_STEP, self.max_bytes - self.size)
            chunk = bytes(self._pending[:take])
            del self._pending[:take]
            if len(self._pending) < self.max_pending:
                self._room.set()
            try:
                view = memoryview(chunk)
                while view:
                    n = await self._file.write(view)
                    if not n:
                        raise OSError("short write")
                    view = view[n:]
                    self.size += n
                    self.written += n
            except OSError as e:
                self._drop(f"console log write failed: {e}", len(view))
                return
            if self._failing:
                self._failing = False
                log.warning("%s: console log writes work again (%d bytes were dropped so far)",
                            self.label, self.dropped)  # fmt: skip

    def _drop(self, why: str, lost: int) -> None:
        """The disk refused: drop what is pending (and ``lost``), log once per episode."""
        self.dropped += lost + len(self._pending)
        self._pending.clear()
        self._room.set()
        if not self._failing:
            self._failing = True
            log.error("%s: %s (console output dropped until it works again)", self.label, why)

    async def _rotate(self) -> bool:
        """``<log>`` -> ``<log>.1``, a fresh ``<log>`` (0600). False if that failed
        (what was pending is dropped; the next write tries again)."""
        try:
            with contextlib.suppress(FileNotFoundError):  # someone removed it: fine
                await aiofiles.os.replace(
                    self.path, self.path.with_name(self.path.name + ".1"), executor=self._executor
                )
            new = await aiofiles.open(
                self.path, "ab", buffering=0, opener=_open_private, executor=self._executor
            )
        except OSError as e:
            self._drop(f"cannot rotate the console log: {e}", 0)
            return False
        old, self._file = self._file, new
        self.size = 0
        self.rotations += 1
        with contextlib.suppress(OSError):
            await old.close()
        return True

    async def aclose(self) -> None:
        """Write what is pending, close the file and its thread."""
        if self._closed:
            return
        await self.flush()
        self._closed = True
        self._room.set()
        try:
            await self._file.close()
        finally:
            self._executor.shutdown(wait=False)

    def stats(self) -> dict[str, int]:
        return {
            "log_bytes": self.written,
            "log_dropped": self.dropped,
            "log_rotations": self.rotations,
        }
