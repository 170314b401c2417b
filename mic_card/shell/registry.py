"""The shell's command registry and how a command line runs.

One registry (:data:`COMMANDS`) serves both the interactive shell on the
console and the agent's non-interactive ``exec``; features add their
commands with the decorator::

    @command("netstat", help="show the network devices", usage="netstat [-i]")
    async def netstat(ctx: ShellContext, args: list[str]) -> int:
        await ctx.out("...\\n")
        return 0

A command gets the :class:`ShellContext` (card, files, stdout/stderr, stdin)
and its arguments (``argv[1:]``) and returns an exit status. It reports a
problem by raising :class:`~mic_card.shell.base.ShellError` (message on
stderr, its status) or returning non-zero; anything else it raises is
reported as an internal error with status 1: a command never takes the shell
down. :func:`lazy_command` registers a command whose module loads on first use.

Imports :mod:`mic_card.shell.base`, :mod:`mic_card.shell.fs` and
:mod:`mic_card.services`; never a command module, a driver or the card OS.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import shlex
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from mic_card.services import CardServices
from mic_card.shell.base import STATUS_NOT_FOUND, FsError, OutputFull, ShellError
from mic_card.shell.fs import CardFS, File
from mic_card.shell.line import Command as LineCommand
from mic_card.shell.line import Pipeline, parse
from virtio.errors import BrokenResourceError, MicError

if TYPE_CHECKING:
    from mic_card.drivers.console import ConsolePort

__all__ = [
    "COMMANDS",
    "CaptureOutput",
    "Command",
    "CommandFn",
    "FileOutput",
    "Output",
    "PortOutput",
    "ShellContext",
    "command",
    "lazy_command",
    "run_argv",
    "run_line",
    "split_line",
    "PIPE_LIMIT",
]

log = logging.getLogger("mic_card.shell")

CommandFn = Callable[["ShellContext", list[str]], Awaitable[int]]


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    fn: CommandFn
    help: str
    usage: str


#: name -> command. Extend with :func:`command`.
COMMANDS: dict[str, Command] = {}


def command(
    name: str,
    *,
    help: str,  # noqa: A002 - the decorator reads like argparse's add_argument(help=...)
    usage: str = "",
    replace: bool = False,
) -> Callable[[CommandFn], CommandFn]:
    """Register ``async def fn(ctx, args) -> int`` as shell command ``name``.

    Raises:
        ValueError: the name is taken and ``replace`` is false.
    """

    def register(fn: CommandFn) -> CommandFn:
        if name in COMMANDS and not replace:
            raise ValueError(f"shell command {name!r} is already registered")
        COMMANDS[name] = Command(name, fn, help, usage or name)
        return fn

    return register


def lazy_command(name: str, module: str, *, help: str, usage: str = "") -> None:  # noqa: A002
    """Register ``name`` now, import ``module`` (which registers the real command
    with ``replace=True``) on first use: heavy subsystems cost nothing at boot."""

    async def first_use(ctx: ShellContext, args: list[str]) -> int:
        importlib.import_module(module)
        real = COMMANDS[name]
        if real.fn is first_use:
            raise LookupError(f"{module} did not register the {name!r} command")
        return await real.fn(ctx, args)

    COMMANDS[name] = Command(name, first_use, help, usage or name)


# --------------------------------------------------------------------------
# output


class Output(Protocol):
    async def write(self, data: bytes) -> None: ...


class CaptureOutput:
    """Collects output up to ``limit`` bytes; a write beyond it keeps what fits,
    sets ``truncated`` and raises :class:`OutputFull`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()
        self.truncated = False

    async def write(self, data: bytes) -> None:
        room = self.limit - len(self.data)
        if len(data) > room:
            self.truncated = True
            self.data += data[: max(room, 0)]
            raise OutputFull
        self.data += data


class PortOutput:
    """Writes to a console port, ``\\n`` -> ``\\r\\n`` (the host pty is raw)."""

    def __init__(self, port: ConsolePort) -> None:
        self.port = port

    async def write(self, data: bytes) -> None:
        await self.port.write(data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))


class FileOutput:
    """``> FILE`` redirection: sequential writes into a file."""

    def __init__(self, f: File) -> None:
        self.f = f
        self.offset = 0

    async def write(self, data: bytes) -> None:
        self.offset += await self.f.pwrite(self.offset, data)


@dataclass(eq=False)
class ShellContext:
    """What a command runs with."""

    card: CardServices | None
    fs: CardFS
    stdout: Output
    stderr: Output
    stdin: bytes = b""
    interactive: bool = False
    #: set by reboot/poweroff: the runner shuts the card down after reporting
    shutdown: str | None = None
    #: set by exit: end the interactive session / the exec status
    exit_requested: bool = False
    size: tuple[int, int] = (0, 0)
    env: dict[str, str] = field(default_factory=dict)

    async def out(self, text: str | bytes) -> None:
        await self.stdout.write(text.encode() if isinstance(text, str) else text)

    async def err(self, text: str | bytes) -> None:
        await self.stderr.write(text.encode() if isinstance(text, str) else text)


def split_line(line: str) -> tuple[list[str], str | None, bool]:
    """``(argv, redirect path or None, append)`` of a command line.

    Raises:
        ShellError: a syntax error (unbalanced quotes, ``>`` without a file).
    """
    lex = shlex.shlex(line, posix=True, punctuation_chars="<>|&;")
    lex.whitespace_split = True
    lex.commenters = "#"
    try:
        tokens = list(lex)
    except ValueError as e:
        raise ShellError(f"syntax error: {e}", 2) from e
    argv: list[str] = []
    target: str | None = None
    append = False
    i = 0
    while i < len(tokens):
        t = tokens[i]
        if t in (">", ">>"):
            if i + 1 >= len(tokens) or tokens[i + 1] in (">", ">>", "<", "|", "&", ";"):
                raise ShellError("syntax error near unexpected token 'newline'", 2)
            target, append = tokens[i + 1], t == ">>"
            i += 2
            continue
        if t and set(t) <= set("<|&;"):
            raise ShellError(f"syntax error: {t!r} is not supported", 2)
        argv.append(t)
        i += 1
    return argv, target, append


async def run_argv(ctx: ShellContext, argv: list[str]) -> int:
    """Run one command; its exit status. Never raises for the command's failure."""
    if not argv:
        return 0
    name, args = argv[0], argv[1:]
    cmd = COMMANDS.get(name)
    if cmd is None:
        with contextlib.suppress(OutputFull):
            await ctx.err(f"sh: {name}: command not found\n")
        return STATUS_NOT_FOUND
    try:
        return await _call(ctx, cmd, args)
    except OutputFull as e:
        return e.status


async def _call(ctx: ShellContext, cmd: Command, args: list[str]) -> int:
    name = cmd.name
    try:
        return int(await cmd.fn(ctx, args))
    except OutputFull:
        raise
    except ShellError as e:
        await ctx.err(f"{name}: {e}\n")
        return e.status
    except BrokenResourceError:
        raise  # our own console/port is gone: the caller decides
    except MicError as e:
        await ctx.err(f"{name}: {e}\n")
        return 1
    except Exception as e:  # a command is extensible code: report, never crash the shell
        log.exception("shell command %s failed", name)
        await ctx.err(f"{name}: internal error: {type(e).__name__}: {e}\n")
        return 1


#: Bound on what one pipe stage hands the next, and on a ``< FILE`` input: both are
#: held in card memory whole (the stages run one after the other).
PIPE_LIMIT = 16 << 20


async def run_line(ctx: ShellContext, line: str) -> int:
    """Parse and run one command line (:mod:`mic_card.shell.line`: ``;``, ``&&``,
    ``||``, pipes, ``<``, ``>``, ``>>``); the status of the last command run."""
    try:
        commands = parse(line)
    except ShellError as e:
        with contextlib.suppress(OutputFull):
            await ctx.err(f"sh: {e}\n")
        return e.status
    if commands.first is None:
        return 0
    status = await _run_pipeline(ctx, commands.first)
    for connector, pipeline in commands.rest:
        if ctx.exit_requested or ctx.shutdown is not None:
            break
        if (connector == "&&" and status != 0) or (connector == "||" and status == 0):
            continue
        status = await _run_pipeline(ctx, pipeline)
    return status


async def _run_pipeline(ctx: ShellContext, pipeline: Pipeline) -> int:
    """Stage by stage: each one's output, up to :data:`PIPE_LIMIT`, is the next one's stdin
    (a stage that writes more is stopped with status 141, as by SIGPIPE)."""
    stdin = ctx.stdin
    status = 0
    last = len(pipeline.commands) - 1
    for i, cmd in enumerate(pipeline.commands):
        pipe = CaptureOutput(PIPE_LIMIT) if i < last else None
        status = await _run_command(ctx, cmd, stdin, pipe)
        if pipe is not None:
            stdin = bytes(pipe.data)
    return status


async def _read_input(ctx: ShellContext, path: str) -> bytes:
    f = ctx.fs.open(path)
    data = bytearray()
    while len(data) <= PIPE_LIMIT:
        chunk = await f.pread(len(data), min(1 << 16, PIPE_LIMIT + 1 - len(data)))
        if not chunk:
            return bytes(data)
        data += chunk
    raise ShellError(f"{path}: input over {PIPE_LIMIT >> 20} MiB")


async def _run_command(
    ctx: ShellContext, cmd: LineCommand, stdin: bytes, pipe: CaptureOutput | None
) -> int:
    """One simple command with its redirections (a file redirection beats the pipe)."""
    saved = ctx.stdin, ctx.stdout
    try:
        if cmd.stdin is not None:
            stdin = await _read_input(ctx, cmd.stdin)
        out: Output | None = pipe
        if cmd.stdout is not None:
            target, append = cmd.stdout
            f = ctx.fs.open(target, write=True, truncate=not append)
            fout = FileOutput(f)
            if append and f.size:
                fout.offset = f.size
            out = fout
    except (FsError, ShellError) as e:
        with contextlib.suppress(OutputFull):
            await ctx.err(f"sh: {e}\n")
        return e.status if isinstance(e, ShellError) else 1
    ctx.stdin = stdin
    if out is not None:
        ctx.stdout = out
    try:
        return await run_argv(ctx, cmd.argv)
    finally:
        ctx.stdin, ctx.stdout = saved
