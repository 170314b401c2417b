"""Card consoles and shell commands from a script: the pty stream and exec results.

- :class:`ConsoleStream`: a card console's pty for scripts: ``write``, ``read``,
  ``read_until`` a pattern, ``command`` (send a line, read to the next prompt).
  ``CardClient.console()`` opens one.
- :class:`ExecResult`: what a shell command run through the card agent gave
  (``CardClient.exec``, the daemon's ``exec`` op), decoded from the op's result.
- :func:`find_console`: the pty path of a console in a card's ``status``.

The pty is on the same host as the daemon (its path is in ``status``), so a
client opens it directly; nothing but the window size goes through the control
socket. Imports the standard library and ``virtio.errors`` only: it is below
the client (:mod:`mic_host.client.connection` uses it), never the daemon.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import termios
import tty
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from virtio.errors import BrokenResourceError, LocalProtocolError, MicTimeoutError

__all__ = ["ConsoleStream", "ExecResult", "find_console"]


@dataclass(frozen=True, slots=True)
class ExecResult:
    """What a command run on the card through the agent gave."""

    status: int
    stdout: bytes
    stderr: bytes
    truncated: bool = False
    timed_out: bool = False
    elapsed: float = 0.0

    def __iter__(self) -> Any:  # (stdout, stderr, status) = await card.exec(...)
        return iter((self.stdout, self.stderr, self.status))

    @property
    def text(self) -> str:
        """stdout decoded (UTF-8, errors replaced)."""
        return self.stdout.decode("utf-8", "replace")

    @classmethod
    def from_result(cls, r: Mapping[str, Any]) -> ExecResult:
        """The daemon's ``exec`` result (stdout/stderr base64).

        Raises:
            BrokenResourceError: stdout or stderr is not base64.
        """
        return cls(
            status=int(r.get("status", 1)),
            stdout=_decode(r.get("stdout"), "stdout"),
            stderr=_decode(r.get("stderr"), "stderr"),
            truncated=bool(r.get("truncated")),
            timed_out=bool(r.get("timed_out")),
            elapsed=float(r.get("elapsed") or 0.0),
        )


def _decode(raw: object, what: str) -> bytes:
    try:
        return base64.b64decode(str(raw or ""), validate=True)
    except ValueError as e:
        raise BrokenResourceError(f"exec: bad {what} in the daemon's answer: {e}") from e


def find_console(status: Mapping[str, Any], card: str, device: str | None = None) -> str:
    """The pty path of the card's console (the first one, or ``device``) in its ``status``.

    Raises:
        LocalProtocolError: the card has no such console.
    """
    for d in status.get("devices") or []:
        if not isinstance(d, dict) or d.get("type") != "console" or not d.get("pty"):
            continue
        if device is None or device in (d.get("name"), d.get("device")):
            return str(d["pty"])
    which = f"console {device!r}" if device else "console"
    raise LocalProtocolError(f"{card} has no {which}")


# --------------------------------------------------------------------------
# a console stream for scripts


class ConsoleStream:
    """A card console's pty, opened by a script (``async with card.console() as con``).

    ``read_until`` keeps what follows the match for the next read. Opening
    discards output nobody read yet (the console log keeps it), so a script
    sees only what the card writes from then on.
    """

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self._fd = fd
        self._buf = bytearray()
        self._event = asyncio.Event()
        self._eof: str | None = None
        asyncio.get_running_loop().add_reader(fd, self._on_readable)

    @classmethod
    async def open(cls, path: str, *, flush: bool = True) -> ConsoleStream:
        """Raises: BrokenResourceError: the pty cannot be opened."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise BrokenResourceError(f"cannot open console {path}: {e}") from e
        try:
            tty.setraw(fd)
            if flush:
                termios.tcflush(fd, termios.TCIFLUSH)
        except (OSError, termios.error) as e:
            os.close(fd)
            raise BrokenResourceError(f"{path} is not a terminal: {e}") from e
        return cls(path, fd)

    def _on_readable(self) -> None:
        try:
            data = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        except OSError as e:
            data = b""
            self._eof = str(e)
        if not data:
            self._eof = self._eof or "end of file"
            asyncio.get_running_loop().remove_reader(self._fd)
        self._buf += data
        self._event.set()

    async def write(self, data: bytes | str) -> None:
        """Send ``data`` to the card as typed input."""
        if isinstance(data, str):
            data = data.encode()
        view = memoryview(data)
        loop = asyncio.get_running_loop()
        while view:
            try:
                n = os.write(self._fd, view)
            except BlockingIOError:
                fut: asyncio.Future[None] = loop.create_future()
                loop.add_writer(self._fd, fut.set_result, None)
                try:
                    await fut
                finally:
                    loop.remove_writer(self._fd)
                continue
            except OSError as e:
                raise BrokenResourceError(f"console {self.path}: {e}") from e
            view = view[n:]

    async def sendline(self, line: str) -> None:
        """Type ``line`` and Enter (``\\r``, as a terminal sends it)."""
        await self.write(line + "\r")

    async def read(self, max_bytes: int = 65536) -> bytes:
        """At least one byte of console output (waits for it).

        Raises:
            BrokenResourceError: the pty closed (the daemon went away).
        """
        while not self._buf:
            if self._eof is not None:
                raise BrokenResourceError(f"console {self.path} closed: {self._eof}")
            self._event.clear()
            await self._event.wait()
        out = bytes(self._buf[:max_bytes])
        del self._buf[:max_bytes]
        return out

    async def read_until(
        self, pattern: bytes | str | re.Pattern[bytes], timeout: float = 10.0
    ) -> bytes:
        """Output up to and including the first match of ``pattern``.

        Raises:
            MicTimeoutError: no match within ``timeout`` s (the message shows the tail).
            BrokenResourceError: the pty closed first.
        """
        if isinstance(pattern, str):
            pattern = pattern.encode()
        rx = pattern if isinstance(pattern, re.Pattern) else re.compile(re.escape(pattern))
        try:
            async with asyncio.timeout(timeout):
                while (m := rx.search(self._buf)) is None:
                    if self._eof is not None:
                        raise BrokenResourceError(f"console {self.path} closed: {self._eof}")
                    self._event.clear()
                    await self._event.wait()
        except TimeoutError:
            tail = bytes(self._buf[-200:])
            raise MicTimeoutError(
                f"console {self.path}: no {rx.pattern!r} within {timeout:g} s; last output {tail!r}"
            ) from None
        out = bytes(self._buf[: m.end()])
        del self._buf[: m.end()]
        return out

    async def command(self, line: str, prompt: bytes = b":~# ", timeout: float = 10.0) -> str:
        """Type ``line``, return its output (between the echoed line and the next prompt)."""
        await self.sendline(line)
        await self.read_until(line.encode() + b"\r\n", timeout)
        out = await self.read_until(prompt, timeout)
        text = out.decode("utf-8", "replace")
        return text[: text.rfind("\r\n") + 2].replace("\r\n", "\n") if "\r\n" in text else ""

    async def aclose(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)

    async def __aenter__(self) -> ConsoleStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
