"""The host pty a card's console is served on (mpssd: ``posix_openpt``).

Owns :class:`ConsolePty`: a pty pair whose master the daemon reads and writes
without blocking, its raw mode, its output backlog bound and its window size
(``TIOCSWINSZ``). It knows nothing of virtio: the console backend
(:mod:`mic_host.backends.console`) attaches a sink for typed input and writes
the card's output here. Created once per card by the daemon, so ``/dev/pts/N``
outlives every boot.

Imports only the standard library and :mod:`virtio.errors`; must not import
the console backend, ``transport`` or ``mic_card``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import struct
import termios
import tty
from collections.abc import Callable

from virtio import trace
from virtio.errors import ConfigError

__all__ = ["ConsolePty"]

log = logging.getLogger(__name__)


class ConsolePty:
    """A host pty serving one card console (mpssd: ``posix_openpt``).

    The master side is read/written here; ``path`` (``/dev/pts/N``) is what
    users attach to. The slave is put in raw mode (the card's shell does echo
    and line editing) and kept open by us, so the master never sees EIO when
    nobody is attached. Output is written without blocking; when nobody reads
    the slave and more than ``max_backlog`` bytes are waiting, the unread
    input of the slave is discarded (the console log keeps everything).

    Created once per card by the daemon; a boot's backend :meth:`attach`-es
    a sink for typed input and :meth:`detach`-es at the end of the boot.
    """

    def __init__(self, label: str, *, max_backlog: int = 64 * 1024) -> None:
        """Raises: ConfigError: no pty could be allocated."""
        try:
            self._master, self._slave = os.openpty()
        except OSError as e:
            raise ConfigError(f"{label}: cannot allocate a pty: {e}") from e
        self.label = label
        self.path = os.ttyname(self._slave)
        tty.setraw(self._slave)
        os.set_blocking(self._master, False)
        self.cols = 0
        self.rows = 0
        self._sink: Callable[[bytes], bool] | None = None
        self._reading = False
        self._backlog = bytearray()
        self._max_backlog = max_backlog
        self._writing = False
        self.dropped = 0
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    # -- input (typed by the user) -> sink ----------------------------------------
    def attach(self, sink: Callable[[bytes], bool]) -> None:
        """Deliver typed input to ``sink`` (it returns False to pause reading)."""
        self._sink = sink
        self.resume()

    def detach(self) -> None:
        """Stop reading (input typed meanwhile waits in the kernel for the next boot)."""
        self._sink = None
        self._stop_reading()

    def resume(self) -> None:
        """(Re)start reading the master after the sink paused it."""
        if self._closed or self._sink is None or self._reading:
            return
        asyncio.get_running_loop().add_reader(self._master, self._on_readable)
        self._reading = True

    def _stop_reading(self) -> None:
        if self._reading:
            asyncio.get_running_loop().remove_reader(self._master)
            self._reading = False

    def _on_readable(self) -> None:
        try:
            data = os.read(self._master, 4096)
        except BlockingIOError:
            return
        except OSError as e:
            log.warning("%s: pty read failed: %s", self.label, e)
            self._stop_reading()
            return
        if trace.ON:
            trace.mark(trace.PTY_IN)
        if data and self._sink is not None and not self._sink(data):
            self._stop_reading()  # the sink calls resume() when it has room

    # -- output (from the card) -> master -------------------------------------------
    def write(self, data: bytes) -> None:
        """Queue card output for whoever is attached; never blocks."""
        if self._closed or not data:
            return
        self._backlog += data
        if not self._writing or len(self._backlog) > self._max_backlog:
            # Waiting for the master to drain and over the bound: _flush drops
            # (nobody reads, or too slowly); the backlog never grows past it.
            self._flush()

    def _flush(self) -> None:
        while self._backlog:
            try:
                n = os.write(self._master, self._backlog[:4096])
            except BlockingIOError:
                break
            except OSError as e:
                log.warning("%s: pty write failed: %s", self.label, e)
                self._backlog.clear()
                break
            del self._backlog[:n]
            if trace.ON:
                trace.mark(trace.PTY_OUT)
        if len(self._backlog) > self._max_backlog:
            # Nobody reads the slave: discard what it holds and the oldest
            # output, keep the newest, as a serial line would lose it.
            with contextlib.suppress(OSError, termios.error):
                termios.tcflush(self._slave, termios.TCIFLUSH)
            keep = 4096
            self.dropped += len(self._backlog) - keep
            del self._backlog[:-keep]
            self._flush()
            return
        loop = asyncio.get_running_loop()
        if self._backlog and not self._writing:
            loop.add_writer(self._master, self._flush)
            self._writing = True
        elif not self._backlog and self._writing:
            loop.remove_writer(self._master)
            self._writing = False

    # -- window size --------------------------------------------------------------
    def resize(self, cols: int, rows: int) -> None:
        """Record the window size and set it on the pty (TIOCSWINSZ)."""
        self.cols, self.rows = cols, rows
        if not self._closed:
            with contextlib.suppress(OSError):
                fcntl.ioctl(self._master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def close(self) -> None:
        if self._closed:
            return
        self.detach()
        if self._writing:
            asyncio.get_running_loop().remove_writer(self._master)
            self._writing = False
        self._closed = True
        os.close(self._master)
        os.close(self._slave)
