"""The interactive shell on a console port (:class:`InteractiveShell`): the card's "getty + sh".

The pty on the host is raw, so the shell echoes, edits the line (backspace,
Ctrl-U, Ctrl-C, Ctrl-D) and writes ``\\r\\n``. Commands run through
:func:`mic_card.shell.registry.run_line`.

Imports the registry, :mod:`mic_card.shell.fs` and :mod:`mic_card.shell.base`;
never the card OS.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from mic_card.services import CardServices
from mic_card.shell.base import STATUS_INTERRUPTED, SYSNAME, VERSION
from mic_card.shell.fs import CardFS
from mic_card.shell.registry import PortOutput, ShellContext, run_line
from virtio.errors import BrokenResourceError

if TYPE_CHECKING:
    from mic_card.drivers.console import ConsolePort

__all__ = ["InteractiveShell"]

log = logging.getLogger("mic_card.shell")


_PRINTABLE = bytes(range(0x20, 0x7F))
_ERASE = b"\x7f\x08"  # DEL / backspace
_EARLY = _PRINTABLE + _ERASE


class _Input:
    """Typed bytes from the console port, with Ctrl-C detection and early echo.

    The port is read by whoever needs input now (the line editor, or the
    Ctrl-C watch while a command runs; never both), not by a task of its
    own. While the line editor waits for a byte with nothing pending
    (:attr:`echo_ready`), printable ASCII and erases are echoed from the
    port's receive callback, as a tty line discipline echoes while its
    reader sleeps: the echo leaves in the interrupt that brought the byte,
    and the editor, which would have written exactly that (it is told the
    line's length, :attr:`line_len`), counts those bytes in :attr:`echoed`
    instead.
    """

    def __init__(self, port: ConsolePort) -> None:
        self.port = port
        self.buf = bytearray()
        #: the line editor waits for a byte, its state needs no context
        #: (not in an escape sequence or a UTF-8 sequence), all input is read
        self.echo_ready = False
        #: characters in the editor's line, counting the early-echoed bytes
        self.line_len = 0
        #: bytes at the head of the input already echoed
        self.echoed = 0

    def attach(self) -> None:
        self.port.on_receive = self._on_receive

    def detach(self) -> None:
        if self.port.on_receive == self._on_receive:
            self.port.on_receive = None

    def _on_receive(self, data: bytes) -> None:
        if not self.echo_ready:
            return
        # Only what follows everything echoed so far, and only bytes whose echo
        # the editor would write as is: printable ASCII, and erases.
        if self.port.buffered != self.echoed + len(data) or data.translate(None, _EARLY):
            self.echo_ready = False  # the editor echoes this and what follows, in order
            return
        echo = bytearray()
        n = self.line_len
        for b in data:
            if b in _ERASE:
                if n:
                    n -= 1
                    echo += b"\b \b"
            else:
                n += 1
                echo.append(b)
        if not echo or self.port.write_nowait(bytes(echo)):
            self.echoed += len(data)
            self.line_len = n
        else:
            self.echo_ready = False

    async def byte(self, echo: bool = False) -> int:
        """The next byte; ``echo``: the caller would echo a printable one (see
        :attr:`echo_ready`)."""
        if not self.buf:
            self.echo_ready = echo
            try:
                self.buf += await self.port.read()  # raises BrokenResourceError once closed
            finally:
                self.echo_ready = False
        b = self.buf[0]
        del self.buf[0]
        return b

    async def wait_interrupt(self) -> None:
        """Return once Ctrl-C is typed (typeahead up to it is discarded)."""
        while True:
            i = self.buf.find(b"\x03")
            if i >= 0:
                del self.buf[: i + 1]
                return
            try:
                data = await self.port.read()
            except BrokenResourceError:
                await asyncio.Event().wait()  # nothing more will come
            self.buf += data


class InteractiveShell:
    """The shell on a console port: banner, prompt, line editing, commands.

    ``exit``/Ctrl-D end a session and a new one starts (a getty's respawn);
    ``reboot``/``poweroff`` ask the card OS to shut down. Returns only when
    the port goes away.
    """

    def __init__(
        self, card: CardServices | None, port: ConsolePort, fs: CardFS | None = None
    ) -> None:
        self.card = card
        self.port = port
        self.fs = fs or CardFS(card)
        self.out = PortOutput(port)
        self.status = 0
        self.sessions = 0

    @property
    def prompt(self) -> str:
        name = self.card.name if self.card is not None else "card"
        return f"{name}:~# "

    async def run(self) -> None:
        inp = _Input(self.port)
        inp.attach()
        try:
            while True:
                self.sessions += 1
                if not await self._session(inp):
                    break
        except BrokenResourceError as e:
            log.info("shell on %s ended: %s", self.port.label, e)
        finally:
            inp.detach()

    async def _write(self, text: str) -> None:
        await self.out.write(text.encode())

    async def _session(self, inp: _Input) -> bool:
        """One login session; False when the card is shutting down."""
        name = self.card.name if self.card is not None else "card"
        await self._write(
            f"\n{SYSNAME} {VERSION} card OS ({name}) {self.port.label}\n"
            "Type 'help' for the commands.\n\n"
        )
        while True:
            await self._write(self.prompt)
            line = await self._readline(inp)
            if line is None:  # Ctrl-D on an empty line
                await self._write("logout\n")
                return True
            if not line.strip():
                continue
            ctx = ShellContext(self.card, self.fs, self.out, self.out, interactive=True,
                               size=self.port.size)  # fmt: skip
            task = asyncio.ensure_future(run_line(ctx, line))
            intr = asyncio.ensure_future(inp.wait_interrupt())
            try:
                await asyncio.wait({task, intr}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                intr.cancel()
                if not task.done():
                    task.cancel()
                await asyncio.gather(task, intr, return_exceptions=True)
            if task.cancelled():
                await self._write("^C\n")
                self.status = STATUS_INTERRUPTED
                continue
            exc = task.exception()
            if exc is not None:
                raise exc
            self.status = task.result()
            if ctx.shutdown is not None and self.card is not None:
                self.card.shutdown(ctx.shutdown)
                return False
            if ctx.exit_requested:
                await self._write("logout\n")
                return True

    async def _echo(self, text: str) -> None:
        """The line editor's echo: sent without waiting for the host when the port
        allows it (in order all the same), so the editor is back waiting for the
        next byte at once and that byte's echo can leave from the interrupt."""
        data = text.encode()
        if not self.port.write_nowait(data.replace(b"\n", b"\r\n")):
            await self.out.write(data)

    async def _readline(self, inp: _Input) -> str | None:
        """One edited line; None for Ctrl-D on an empty line."""
        buf: list[str] = []
        raw = bytearray()  # an incomplete UTF-8 sequence
        last_cr = False
        while True:
            inp.line_len = len(buf)
            b = await inp.byte(echo=not raw)
            if inp.echoed:  # echoed from the port's receive callback already
                inp.echoed -= 1
                if b in _ERASE:
                    if buf:
                        buf.pop()
                else:
                    buf.append(chr(b))
                last_cr = False
                continue
            if b == 0x0A and last_cr:  # \r\n from a terminal that sends both
                last_cr = False
                continue
            last_cr = b == 0x0D
            if b in (0x0D, 0x0A):
                await self._echo("\n")
                return "".join(buf)
            if b == 0x03:  # Ctrl-C: drop the line
                await self._echo("^C\n")
                return ""
            if b == 0x04:  # Ctrl-D
                if not buf:
                    return None
                continue
            if b in (0x7F, 0x08):  # backspace / DEL
                if buf:
                    buf.pop()
                    await self._echo("\b \b")
                continue
            if b == 0x15:  # Ctrl-U: kill the line
                if buf:
                    await self._echo("\b \b" * len(buf))
                    buf.clear()
                continue
            if b == 0x1B:  # an escape sequence (arrows...): swallow it
                nxt = await inp.byte()
                if nxt == ord("["):
                    while not 0x40 <= await inp.byte() <= 0x7E:
                        pass
                continue
            if b < 0x20:
                continue
            raw.append(b)
            try:
                ch = raw.decode("utf-8")
            except UnicodeDecodeError:
                if len(raw) < 4:
                    continue
                ch = "\ufffd"
            raw.clear()
            buf.append(ch)
            await self._echo(ch)
