"""The client side of card consoles: ``micctl console``/``exec``, a scriptable console stream.

- :func:`attach` relays the current terminal to a card console's pty (raw
  mode, the window size sent with the ``console_resize`` op at start and on
  SIGWINCH, ``Ctrl-]`` detaches, the terminal is always restored).
- :class:`ConsoleStream` is the same pty for scripts: ``write``, ``read``,
  ``read_until`` a pattern, ``command`` (send a line, read to the next prompt).
- :class:`ExecResult` and :func:`exec_on` run a shell command through the
  card agent (the daemon's ``exec`` op).
- :func:`micctl_subcommands` gives ``micctl`` its ``console`` and ``exec``.

The pty is on the same host as the daemon (its path is in ``status``), so a
client opens it directly; nothing but the window size goes through the
control socket. Imports the client's protocol only; never the daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import errno
import os
import re
import signal
import sys
import termios
import tty
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from virtio.errors import BrokenResourceError, LocalProtocolError, MicTimeoutError

if TYPE_CHECKING:
    from mic_host.client import CardClient, Client

__all__ = [
    "ESCAPE",
    "ConsoleStream",
    "ExecResult",
    "attach",
    "console_path",
    "exec_on",
    "micctl_subcommands",
    "open_console",
]

#: Ctrl-] detaches (telnet's escape character).
ESCAPE = 0x1D
_BACKLOG = 64 * 1024


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


def _decode(raw: object, what: str) -> bytes:
    try:
        return base64.b64decode(str(raw or ""), validate=True)
    except ValueError as e:
        raise BrokenResourceError(f"exec: bad {what} in the daemon's answer: {e}") from e


async def exec_on(
    card: CardClient,
    argv: list[str] | None = None,
    *,
    line: str | None = None,
    timeout: float | None = None,
    max_output: int | None = None,
    stdin: bytes | None = None,
) -> ExecResult:
    """Run ``argv`` (or a command ``line``) on the card's shell through its agent.

    Raises:
        LocalProtocolError: card not online, or no agent (no console / no MULTIPORT).
        MicTimeoutError: the agent did not answer.
        RemoteProtocolError: the agent refused the request.
    """
    args: dict[str, Any] = {"argv": argv, "line": line, "timeout": timeout}
    if max_output is not None:
        args["max_output"] = max_output
    if stdin is not None:
        args["stdin"] = base64.b64encode(stdin).decode()
    r = await card.client.request("exec", card.name, **args)
    return ExecResult(
        status=int(r.get("status", 1)),
        stdout=_decode(r.get("stdout"), "stdout"),
        stderr=_decode(r.get("stderr"), "stderr"),
        truncated=bool(r.get("truncated")),
        timed_out=bool(r.get("timed_out")),
        elapsed=float(r.get("elapsed") or 0.0),
    )


async def console_path(card: CardClient, device: str | None = None) -> str:
    """The pty path of the card's console (the first one, or ``device``).

    Raises:
        LocalProtocolError: the card has no such console.
    """
    status = await card.status()
    for d in status.get("devices") or []:
        if not isinstance(d, dict) or d.get("type") != "console" or not d.get("pty"):
            continue
        if device is None or device in (d.get("name"), d.get("device")):
            return str(d["pty"])
    which = f"console {device!r}" if device else "console"
    raise LocalProtocolError(f"{card.name} has no {which}")


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


@asynccontextmanager
async def open_console(card: CardClient, device: str | None = None) -> AsyncIterator[ConsoleStream]:
    """``async with open_console(card) as con:`` a :class:`ConsoleStream` on the card's pty."""
    stream = await ConsoleStream.open(await console_path(card, device))
    try:
        yield stream
    finally:
        await stream.aclose()


# --------------------------------------------------------------------------
# attaching a terminal


async def attach(
    card: CardClient,
    path: str,
    *,
    device: str | None = None,
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
            await card.client.request(
                "console_resize", card.name, cols=cols, rows=rows, device=device
            )

    def on_winch() -> None:
        t = loop.create_task(send_size())
        resizes.add(t)
        t.add_done_callback(resizes.discard)

    loop.remove_reader(stream._fd)  # the relay reads the pty itself
    try:
        if is_tty:
            tty.setraw(stdin)
        out(f"Connected to {card.name} console {path}. Escape character is '^]'.\r\n".encode())
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
            os.write(stdout, f"\r\n[{why}: {card.name} console]\r\n".encode())
    return code


# --------------------------------------------------------------------------
# micctl console / exec

Configure = Callable[[argparse.ArgumentParser], None]
Run = Callable[["Client", argparse.Namespace], Awaitable[int]]


def _card_arg(p: argparse.ArgumentParser) -> None:
    def card(text: str) -> str:
        if not re.match(r"^mic[0-9]+$", text):
            raise argparse.ArgumentTypeError(f"bad card name {text!r}: expected micN, e.g. mic0")
        return text

    p.add_argument("card", type=card, metavar="CARD", help="card name, e.g. mic0")


def _conf_console(p: argparse.ArgumentParser) -> None:
    _card_arg(p)
    p.add_argument("--device", metavar="NAME", help="console device (default: the first)")
    p.add_argument(
        "--print-path", action="store_true", help="print the console's pty path and exit"
    )


async def _console(client: Client, args: argparse.Namespace) -> int:
    card = client.card(args.card)
    path = await console_path(card, args.device)
    if args.print_path:
        print(path)
        return 0
    return await attach(card, path, device=args.device)


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < v < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return v


def _conf_exec(p: argparse.ArgumentParser) -> None:
    _card_arg(p)
    p.add_argument(
        "--timeout", type=_positive, metavar="S", help="stop the command after S s (default 30)"
    )
    p.add_argument("argv", nargs=argparse.REMAINDER, action=_ArgvAction,
                   metavar="-- CMD [ARGS...]", help="the shell command to run")  # fmt: skip


class _ArgvAction(argparse.Action):
    """``[--timeout S] [--] CMD [ARGS...]``: the options before the command, then argv."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        argv = list(values or [])
        # REMAINDER takes everything after CARD, options included: pick ours off
        # the front, up to "--" or the command (argparse cannot, see bpo-17050).
        while argv and argv[0].startswith("--") and argv[0] != "--":
            key, eq, value = argv.pop(0).partition("=")
            if key != "--timeout":
                parser.error(f"unrecognized option {key!r} (put the command after '--')")
            if not eq:
                if not argv:
                    parser.error("--timeout needs a value")
                value = argv.pop(0)
            try:
                namespace.timeout = _positive(value)
            except argparse.ArgumentTypeError as e:
                parser.error(f"--timeout: {e}")
        if argv and argv[0] == "--":
            argv = argv[1:]
        setattr(namespace, self.dest, argv)


async def _exec(client: Client, args: argparse.Namespace) -> int:
    if not args.argv:
        print("micctl: exec needs a command: micctl exec CARD -- CMD [ARGS...]", file=sys.stderr)
        return 2
    r = await exec_on(client.card(args.card), list(args.argv), timeout=args.timeout)
    sys.stdout.buffer.write(r.stdout)
    sys.stdout.buffer.flush()
    sys.stderr.buffer.write(r.stderr)
    if r.truncated:
        sys.stderr.buffer.write(b"micctl: output truncated\n")
    sys.stderr.buffer.flush()
    return r.status & 0xFF


def micctl_subcommands() -> list[tuple[str, str, Configure, Run]]:
    """``(name, help, configure, run)`` of ``micctl console`` and ``micctl exec``."""
    return [
        ("console", "attach this terminal to a card console (Ctrl-] detaches)",
         _conf_console, _console),
        ("exec", "run a shell command on a card; exits with its status", _conf_exec, _exec),
    ]  # fmt: skip
