"""``micctl console``: this terminal relayed to a card console's pty.

:func:`attach` puts the terminal in raw mode, sends its window size at start
and on SIGWINCH (through the ``resize`` callback the caller gives: the
``console_resize`` op), detaches on ``Ctrl-]`` and always restores the
terminal. Imports :mod:`mic_host.client.console` (the pty stream) only; it
knows nothing of the control socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import termios
import tty
from collections.abc import Awaitable, Callable

from mic_host.client.console import ConsoleStream

__all__ = ["ESCAPE", "attach"]

#: Ctrl-] detaches (telnet's escape character).
ESCAPE = 0x1D
_BACKLOG = 64 * 1024
#: Sends a window size (columns, rows) to the card.
Resize = Callable[[int, int], Awaitable[object]]


async def attach(
    label: str,
    path: str,
    resize: Resize,
    *,
    stdin: int = 0,
    stdout: int = 1,
    escape: int = ESCAPE,
) -> int:
    """Relay terminal ``stdin``/``stdout`` to the console pty until detached.

    Returns 0 after ``Ctrl-]`` or end of input, 1 when the console went away,
    129 when the terminal hung up (SIGHUP). The terminal's mode is restored
    whatever happens.

    Raises:
        BrokenResourceError: the pty cannot be opened.
    """
    stream = await ConsoleStream.open(path)
    loop = asyncio.get_running_loop()
    done: asyncio.Future[tuple[int, str]] = loop.create_future()
    is_tty = os.isatty(stdin)
    saved = termios.tcgetattr(stdin) if is_tty else None
    to_pty = bytearray()
    resizes: set[asyncio.Task[None]] = set()

    def finish(code: int, why: str) -> None:
        if not done.done():
            done.set_result((code, why))

    def out(data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(stdout, view) :]
            except BlockingIOError:
                continue
            except OSError:
                finish(0, "terminal closed")
                return

    def flush_pty() -> None:
        while to_pty:
            try:
                n = os.write(stream._fd, to_pty)
            except BlockingIOError:
                break
            except OSError as e:
                finish(1, f"console closed: {e}")
                return
            del to_pty[:n]
        with contextlib.suppress(ValueError, OSError):
            loop.remove_writer(stream._fd)
        if to_pty:
            loop.add_writer(stream._fd, flush_pty)

    def on_stdin() -> None:
        try:
            data = os.read(stdin, 4096)
        except BlockingIOError:
            return
        except OSError as e:
            data = b""
            if e.errno != errno.EIO:
                finish(1, f"terminal read failed: {e}")
        if not data:
            finish(0, "end of input")
            return
        i = data.find(bytes([escape]))
        if i >= 0:
            data = data[:i]
        if len(to_pty) < _BACKLOG:
            to_pty.extend(data)
            flush_pty()
        if i >= 0:
            finish(0, "detached")

    def on_pty() -> None:
        try:
            data = os.read(stream._fd, 65536)
        except BlockingIOError:
            return
        except OSError as e:
            finish(1, f"console closed: {e}")
            return
        if not data:
            finish(1, "console closed")
            return
        out(data)

    async def send_size() -> None:
        try:
            cols, rows = os.get_terminal_size(stdout if os.isatty(stdout) else stdin)
        except OSError:
            return
        with contextlib.suppress(Exception):  # best effort: a resize never ends the session
            await resize(cols, rows)

    def on_winch() -> None:
        t = loop.create_task(send_size())
        resizes.add(t)
        t.add_done_callback(resizes.discard)

    loop.remove_reader(stream._fd)  # the relay reads the pty itself
    try:
        if is_tty:
            tty.setraw(stdin)
        out(f"Connected to {label} console {path}. Escape character is '^]'.\r\n".encode())
        await send_size()
        loop.add_reader(stdin, on_stdin)
        loop.add_reader(stream._fd, on_pty)
        loop.add_signal_handler(signal.SIGWINCH, on_winch)
        loop.add_signal_handler(signal.SIGHUP, finish, 129, "terminal hung up")
        loop.add_signal_handler(signal.SIGTERM, finish, 143, "terminated")
        code, why = await done
    finally:
        for sig in (signal.SIGWINCH, signal.SIGHUP, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        with contextlib.suppress(ValueError, OSError):
            loop.remove_reader(stdin)
        with contextlib.suppress(ValueError, OSError):
            loop.remove_reader(stream._fd)
            loop.remove_writer(stream._fd)
        for t in list(resizes):
            t.cancel()
        if saved is not None:
            with contextlib.suppress(OSError, termios.error):
                termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        os.close(stream._fd)
        stream._fd = -1
    if code in (0, 1):
        with contextlib.suppress(OSError):
            os.write(stdout, f"\r\n[{why}: {label} console]\r\n".encode())
    return code
