"""The card shell: a command registry, a tiny file namespace, and the interactive shell on ``hvc0``.

One registry (:data:`COMMANDS`) serves both the interactive shell on the
console and the agent's non-interactive ``exec``; later features add their
commands with the decorator::

    @command("netstat", help="show the network devices", usage="netstat [-i]")
    async def netstat(ctx: ShellContext, args: list[str]) -> int:
        await ctx.out("...\\n")
        return 0

A command gets the :class:`ShellContext` (card, files, stdout/stderr, stdin)
and its arguments (``argv[1:]``) and returns an exit status. It reports a
problem by raising :class:`ShellError` (message on stderr, its status) or
returning non-zero; anything else it raises is reported as an internal error
with status 1: a command never takes the shell down.

Files (:class:`CardFS`): ``/dev/zero``, ``/dev/null``, ``/dev/urandom``, one
``/dev/<name>`` per bound block device (``/dev/vda``...), and a RAM-backed
``/tmp`` (bounded). Output formats follow coreutils (``sha256sum``: ``HEX  NAME``;
``dd``: records and bytes on stderr).

The interactive shell (:class:`InteractiveShell`) is the card's "getty + sh" on
the console port: the pty on the host is raw, so the shell echoes, edits the
line (backspace, Ctrl-U, Ctrl-C, Ctrl-D) and writes ``\\r\\n``.

Must not import ``transport`` or ``mic_host``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib
import logging
import os
import shlex
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING, Any, Protocol

from virtio.constants import DeviceType
from virtio.errors import BrokenResourceError, MicError

if TYPE_CHECKING:
    from mic_card.card import Card
    from mic_card.drivers.console import ConsolePort

__all__ = [
    "COMMANDS",
    "Command",
    "CardFS",
    "CaptureOutput",
    "FsError",
    "InteractiveShell",
    "ShellContext",
    "ShellError",
    "command",
    "run_argv",
    "run_line",
    "split_line",
]

log = logging.getLogger(__name__)

try:
    VERSION = metadata.version("mic-vop")
except metadata.PackageNotFoundError:  # pragma: no cover - running from a checkout
    VERSION = "0.1.0"

SYSNAME = "MIC-VOP"
MACHINE = "k1om"  # the Xeon Phi (Knights Corner) architecture name
STATUS_NOT_FOUND = 127
STATUS_INTERRUPTED = 130
STATUS_TIMEOUT = 124
STATUS_PIPE = 141
_SECTOR = 512
_IO_CHUNK = 64 * 1024


class ShellError(MicError):
    """A command failed: ``message`` goes to stderr (prefixed by the command's name)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


class FsError(ShellError):
    """A file operation failed, coreutils-style: ``path: strerror``."""

    def __init__(self, path: str, strerror: str) -> None:
        super().__init__(f"{path}: {strerror}")
        self.path = path
        self.strerror = strerror


# --------------------------------------------------------------------------
# the registry

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


class OutputFull(ShellError):
    """Captured output reached its bound: the command is stopped, as a writer to a
    closed pipe is (``cat /dev/zero | head -c N``), with status 141 (128 + SIGPIPE)."""

    def __init__(self) -> None:
        super().__init__("write error: output limit reached", STATUS_PIPE)


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


# --------------------------------------------------------------------------
# files


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


class _TmpFile:
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
        self.bs = max(_SECTOR, int(getattr(blk, "blk_size", _SECTOR) or _SECTOR))

    @property
    def size(self) -> int | None:
        return int(self.blk.capacity) * _SECTOR

    async def _read_aligned(self, start: int, end: int) -> bytes:
        out = bytearray()
        for off in range(start, end, _IO_CHUNK):
            n = min(_IO_CHUNK, end - off)
            out += await self.blk.read(off // _SECTOR, n // _SECTOR)
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
                for off in range(0, len(buf), _IO_CHUNK):
                    await self.blk.write((a + off) // _SECTOR, bytes(buf[off : off + _IO_CHUNK]))
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

    def __init__(self, card: Card | None, *, tmp_limit: int = 16 << 20) -> None:
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
            return _TmpFile(self, path, data)
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


# --------------------------------------------------------------------------
# the context and running commands


@dataclass(eq=False)
class ShellContext:
    """What a command runs with."""

    card: Card | None
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


async def run_line(ctx: ShellContext, line: str) -> int:
    """Parse and run one command line (with ``>``/``>>`` redirection)."""
    try:
        argv, target, append = split_line(line)
    except ShellError as e:
        await ctx.err(f"sh: {e}\n")
        return e.status
    if target is None:
        return await run_argv(ctx, argv)
    try:
        f = ctx.fs.open(target, write=True, truncate=not append)
    except FsError as e:
        await ctx.err(f"sh: {e}\n")
        return 1
    out = FileOutput(f)
    if append and f.size:
        out.offset = f.size
    saved, ctx.stdout = ctx.stdout, out
    try:
        return await run_argv(ctx, argv)
    finally:
        ctx.stdout = saved


# --------------------------------------------------------------------------
# built-in commands


def _human(n: float, base: int) -> str:
    units = ["", "k", "M", "G", "T", "P"] if base == 1000 else ["", "Ki", "Mi", "Gi", "Ti", "Pi"]
    i = 0
    while n >= base and i < len(units) - 1:
        n /= base
        i += 1
    if i == 0:
        return f"{n:.0f} B"
    unit = units[i] + "B"
    return f"{n:.1f} {unit}" if n < 10 else f"{round(n):.0f} {unit}"


_SUFFIX = {
    "c": 1,
    "w": 2,
    "b": 512,
    "kB": 1000,
    "K": 1024,
    "k": 1024,
    "MB": 1000**2,
    "M": 1024**2,
    "GB": 1000**3,
    "G": 1024**3,
}


def parse_number(text: str) -> int:
    """A dd number: digits with an optional suffix (c w b kB K MB M GB G) or ``AxB``.

    Raises:
        ShellError: not a number.
    """
    if "x" in text:
        total = 1
        for part in text.split("x"):
            total *= parse_number(part)
        return total
    digits = text.rstrip("".join({c for s in _SUFFIX for c in s}))
    suffix = text[len(digits) :]
    if not digits.isdigit() or (suffix and suffix not in _SUFFIX):
        raise ShellError(f"invalid number: '{text}'")
    return int(digits) * _SUFFIX.get(suffix, 1)


@command("help", help="list the commands, or show one's usage", usage="help [COMMAND]")
async def _help(ctx: ShellContext, args: list[str]) -> int:
    if args:
        cmd = COMMANDS.get(args[0])
        if cmd is None:
            raise ShellError(f"no help topics match '{args[0]}'")
        await ctx.out(f"usage: {cmd.usage}\n  {cmd.help}\n")
        return 0
    width = max(len(c) for c in COMMANDS)
    lines = [
        f"  {c.name.ljust(width)}  {c.help}"
        for c in sorted(COMMANDS.values(), key=lambda c: c.name)
    ]
    await ctx.out("Commands:\n" + "\n".join(lines) + "\n")
    return 0


@command("uname", help="print system information", usage="uname [-asnrvm]")
async def _uname(ctx: ShellContext, args: list[str]) -> int:
    node = ctx.card.name if ctx.card is not None else "card"
    fields = {"s": SYSNAME, "n": node, "r": VERSION, "v": "#1 SMP", "m": MACHINE}
    wanted: list[str] = []
    for a in args:
        if not a.startswith("-") or len(a) < 2:
            raise ShellError(f"extra operand '{a}'")
        for ch in a[1:]:
            if ch == "a":
                wanted.extend("snrvm")
            elif ch in fields:
                wanted.append(ch)
            else:
                raise ShellError(f"invalid option -- '{ch}'")
    order = [k for k in "snrvm" if k in wanted] or ["s"]
    await ctx.out(" ".join(fields[k] for k in order) + "\n")
    return 0


def _fmt_uptime(seconds: float) -> str:
    minutes = int(seconds // 60)
    if minutes < 60:
        return f"{minutes} min"
    h, m = divmod(minutes, 60)
    d, h = divmod(h, 24)
    return (f"{d} day{'s' if d != 1 else ''}, " if d else "") + f"{h}:{m:02d}"


@command("uptime", help="how long the card OS has been up", usage="uptime [-s]")
async def _uptime(ctx: ShellContext, args: list[str]) -> int:
    up = ctx.card.uptime if ctx.card is not None else 0.0
    if args == ["-s"]:
        await ctx.out(f"{up:.2f}\n")
        return 0
    if args:
        raise ShellError(f"extra operand '{args[0]}'")
    now = time.strftime("%H:%M:%S")
    await ctx.out(f" {now} up {_fmt_uptime(up)} ({up:.2f} s),  load average: 0.00, 0.00, 0.00\n")
    return 0


@command("devices", help="the virtio devices: type, features, queue sizes", usage="devices")
async def _devices(ctx: ShellContext, args: list[str]) -> int:
    devs = ctx.card.devices() if ctx.card is not None else []
    rows = [("NAME", "TYPE", "DRIVER", "STATE", "FEATURES", "QUEUES")]
    for d in devs:
        try:
            kind = DeviceType(int(d["type"])).name.lower()
        except ValueError:
            kind = str(d["type"])
        sizes = ",".join(str(n) for n in d.get("queue_sizes", []))
        rows.append((d["name"], kind, str(d.get("driver") or "-"), str(d.get("state")),
                     f"{int(d.get('features') or 0):#x}", sizes))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    text = "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)  # fmt: skip
    await ctx.out(text + "\n")
    return 0


@command("blkinfo", help="a block device's capacity, features and serial", usage="blkinfo DEV")
async def _blkinfo(ctx: ShellContext, args: list[str]) -> int:
    if len(args) != 1:
        await ctx.err("usage: blkinfo DEV\n")
        return 2
    name = args[0].removeprefix("/dev/")
    dev = ctx.fs._block_devices().get(name)
    if dev is None:
        await ctx.err(f"blkinfo: {args[0]}: no such block device\n")
        return 1
    info = dev.info()
    try:
        serial = (await dev.get_id()).rstrip(b"\0").decode(errors="replace")
    except MicError as e:
        serial = f"? ({e})"
    feats = [f for f in ("read_only", "flush", "discard", "write_zeroes") if info.get(f)]
    lines = [
        f"device:     /dev/{name}",
        f"capacity:   {info['capacity']} sectors ({info['size']} bytes)",
        f"blk_size:   {info['blk_size']}",
        f"features:   {' '.join(feats) or '-'}",
        f"queues:     {info['num_queues']} x {info['queue_size']}",
        f"limits:     size_max {info['size_max']}, seg_max {info['seg_max']}",
        f"serial:     {serial}",
    ]
    await ctx.out("\n".join(lines) + "\n")
    return 0


# The net commands' text lives with the driver (imported on first use).
@command("ifconfig", help="the card's network interfaces", usage="ifconfig [-a] [IFACE]")
async def _ifconfig(ctx: ShellContext, args: list[str]) -> int:
    from mic_card.drivers.net import shell_ifconfig

    return await shell_ifconfig(ctx, args)


@command("ip", help="network interfaces, iproute2 style", usage="ip addr [show [IFACE]] | ip link")
async def _ip(ctx: ShellContext, args: list[str]) -> int:
    from mic_card.drivers.net import shell_ip

    return await shell_ip(ctx, args)


@command("netstat", help="the kernel interface table", usage="netstat -i")
async def _netstat(ctx: ShellContext, args: list[str]) -> int:
    from mic_card.drivers.net import shell_netstat

    return await shell_netstat(ctx, args)


@command("dmesg", help="the card's kernel log", usage="dmesg")
async def _dmesg(ctx: ShellContext, args: list[str]) -> int:
    lines = ctx.card.dmesg() if ctx.card is not None else []
    await ctx.out("".join(line + "\n" for line in lines))
    return 0


@command("echo", help="print the arguments", usage="echo [-n] [ARG...]")
async def _echo(ctx: ShellContext, args: list[str]) -> int:
    newline = True
    if args and args[0] == "-n":
        newline, args = False, args[1:]
    await ctx.out(" ".join(args) + ("\n" if newline else ""))
    return 0


@command("true", help="do nothing, successfully", usage="true")
async def _true(ctx: ShellContext, args: list[str]) -> int:
    return 0


@command("false", help="do nothing, unsuccessfully", usage="false")
async def _false(ctx: ShellContext, args: list[str]) -> int:
    return 1


@command("sleep", help="wait N seconds", usage="sleep SECONDS")
async def _sleep(ctx: ShellContext, args: list[str]) -> int:
    if len(args) != 1:
        raise ShellError("usage: sleep SECONDS", 2)
    try:
        seconds = float(args[0])
    except ValueError:
        raise ShellError(f"invalid time interval '{args[0]}'") from None
    if not 0 <= seconds < 1e6:
        raise ShellError(f"invalid time interval '{args[0]}'")
    await asyncio.sleep(seconds)
    return 0


async def _copy_out(ctx: ShellContext, f: File) -> None:
    off = 0
    while True:
        data = await f.pread(off, _IO_CHUNK)
        if not data:
            return
        await ctx.stdout.write(data)
        off += len(data)
        await asyncio.sleep(0)  # /dev/zero never blocks: let the card OS breathe


@command("cat", help="print files", usage="cat FILE...")
async def _cat(ctx: ShellContext, args: list[str]) -> int:
    if not args:
        await ctx.out(ctx.stdin)
        return 0
    status = 0
    for path in args:
        try:
            await _copy_out(ctx, ctx.fs.open(path))
        except FsError as e:
            await ctx.err(f"cat: {e}\n")
            status = 1
    return status


@command("ls", help="list /, /dev, /tmp or files", usage="ls [-l] [PATH...]")
async def _ls(ctx: ShellContext, args: list[str]) -> int:
    long = "-l" in args
    paths = [a for a in args if a != "-l"] or ["/tmp"]
    for a in paths:
        if a.startswith("-"):
            raise ShellError(f"invalid option -- '{a.lstrip('-')}'", 2)
    status = 0
    for i, path in enumerate(paths):
        try:
            entries = ctx.fs.listdir(path)
        except FsError as e:
            await ctx.err(f"ls: cannot access {e}\n")
            status = 2
            continue
        if len(paths) > 1:
            await ctx.out(("\n" if i else "") + f"{path}:\n")
        if long:
            lines = [f"{'-' if s is not None else 'd'} {s if s is not None else '-':>12}  {n}"
                     for n, s in entries]  # fmt: skip
        else:
            lines = [n for n, _ in entries]
        if lines:
            await ctx.out("\n".join(lines) + "\n")
    return status


@command("rm", help="remove files from /tmp", usage="rm [-f] FILE...")
async def _rm(ctx: ShellContext, args: list[str]) -> int:
    force = "-f" in args
    paths = [a for a in args if a != "-f"]
    if not paths:
        if force:
            return 0
        raise ShellError("missing operand")
    status = 0
    for path in paths:
        try:
            ctx.fs.remove(path)
        except FsError as e:
            if force and e.strerror == "No such file or directory":
                continue
            await ctx.err(f"rm: cannot remove '{e.path}': {e.strerror}\n")
            status = 1
    return status


@command("sha256sum", help="print SHA-256 checksums of files", usage="sha256sum FILE...")
async def _sha256sum(ctx: ShellContext, args: list[str]) -> int:
    if not args:
        await ctx.out(f"{hashlib.sha256(ctx.stdin).hexdigest()}  -\n")
        return 0
    status = 0
    for path in args:
        try:
            f = ctx.fs.open(path)
            if f.size is None:
                raise FsError(path, "endless stream")
            h = hashlib.sha256()
            off = 0
            while data := await f.pread(off, _IO_CHUNK):
                h.update(data)
                off += len(data)
                await asyncio.sleep(0)
        except FsError as e:
            await ctx.err(f"sha256sum: {e}\n")
            status = 1
            continue
        await ctx.out(f"{h.hexdigest()}  {path}\n")
    return status


class _Stdin:
    path = "-"

    def __init__(self, data: bytes) -> None:
        self.data = data

    @property
    def size(self) -> int | None:
        return len(self.data)

    async def pread(self, offset: int, n: int) -> bytes:
        return self.data[offset : offset + n]

    async def pwrite(self, offset: int, data: bytes) -> int:
        raise FsError("-", "Bad file descriptor")

    async def flush(self) -> None:
        pass


def _dd_report(records: tuple[int, int, int, int], nbytes: int, seconds: float) -> str:
    fi, pi, fo, po = records
    seconds = max(seconds, 1e-9)
    rate = _human(nbytes / seconds, 1000) + "/s"
    if nbytes < 1000:
        size = f"{nbytes} byte{'s' if nbytes != 1 else ''}"
    elif nbytes < 1024:
        size = f"{nbytes} bytes ({_human(nbytes, 1000)})"
    else:
        size = f"{nbytes} bytes ({_human(nbytes, 1000)}, {_human(nbytes, 1024)})"
    return f"{fi}+{pi} records in\n{fo}+{po} records out\n{size} copied, {seconds:g} s, {rate}\n"


_DD_KEYS = {"if", "of", "bs", "ibs", "obs", "count", "skip", "seek", "conv", "status", "iflag",
            "oflag"}  # fmt: skip
_DD_CONV = {"fsync", "fdatasync", "notrunc", "sync", "noerror"}


@command(
    "dd",
    help="copy blocks between files and devices",
    usage="dd [if=FILE] [of=FILE] [bs=N] [count=N] [skip=N] [seek=N] [conv=fsync,notrunc] "
    "[status=none]",
)
async def _dd(ctx: ShellContext, args: list[str]) -> int:
    opts: dict[str, str] = {}
    for a in args:
        key, sep, value = a.partition("=")
        if not sep or key not in _DD_KEYS:
            raise ShellError(f"unrecognized operand '{a}'")
        opts[key] = value
    bs = parse_number(opts["bs"]) if "bs" in opts else None
    ibs = bs or parse_number(opts.get("ibs", "512"))
    obs = bs or parse_number(opts.get("obs", "512"))
    if not (0 < ibs <= 64 << 20 and 0 < obs <= 64 << 20):
        raise ShellError("invalid block size (1 B .. 64 MiB)")
    count = parse_number(opts["count"]) if "count" in opts else None
    skip = parse_number(opts.get("skip", "0"))
    seek = parse_number(opts.get("seek", "0"))
    conv = {c for c in opts.get("conv", "").split(",") if c}
    if bad := conv - _DD_CONV:
        raise ShellError(f"invalid conversion: '{sorted(bad)[0]}'")
    status = opts.get("status", "")
    if status not in ("", "none", "noxfer", "progress"):
        raise ShellError(f"invalid status level: '{status}'")
    try:
        src: File = ctx.fs.open(opts["if"]) if "if" in opts else _Stdin(ctx.stdin)
    except FsError as e:
        raise ShellError(f"failed to open '{e.path}': {e.strerror}") from None
    dst: File | None = None
    if "of" in opts:
        try:
            dst = ctx.fs.open(opts["of"], write=True)
        except FsError as e:
            raise ShellError(f"failed to open '{e.path}': {e.strerror}") from None
        if isinstance(dst, _TmpFile) and "notrunc" not in conv:
            del dst.data[seek * obs :]  # GNU dd truncates a regular file at seek
    t0 = time.monotonic()
    fi = pi = fo = po = 0
    nbytes = 0
    in_off = skip * ibs
    out_off = seek * obs
    pending = bytearray()
    error: str | None = None

    async def emit(final: bool) -> None:
        nonlocal fo, po, out_off, nbytes
        while len(pending) >= obs or (final and pending):
            chunk = bytes(pending[:obs])
            del pending[: len(chunk)]
            if dst is None:
                await ctx.stdout.write(chunk)
                n = len(chunk)
            else:
                n = await dst.pwrite(out_off, chunk)
            out_off += n
            nbytes += n
            if n == obs:
                fo += 1
            else:
                po += 1

    try:
        while count is None or fi + pi < count:
            try:
                data = await src.pread(in_off, ibs)
            except FsError as e:
                error = f"error reading '{e.path}': {e.strerror}"
                break
            if not data:
                break
            in_off += len(data)
            if len(data) == ibs:
                fi += 1
            else:
                pi += 1
                if "sync" in conv:
                    data += bytes(ibs - len(data))
            pending += data
            await emit(False)
            await asyncio.sleep(0)  # endless sources never block: stay cancellable
        await emit(True)
        if dst is not None and conv & {"fsync", "fdatasync"}:
            await dst.flush()
    except FsError as e:
        error = f"error writing '{e.path}': {e.strerror}"
    if error is not None:
        await ctx.err(f"dd: {error}\n")
    if status != "none":
        report = _dd_report((fi, pi, fo, po), nbytes, time.monotonic() - t0)
        if status == "noxfer":
            report = "".join(report.splitlines(keepends=True)[:2])
        await ctx.err(report)
    return 1 if error else 0


@command("sync", help="flush every block device's write cache", usage="sync")
async def _sync(ctx: ShellContext, args: list[str]) -> int:
    status = 0
    for name, _size in ctx.fs.listdir("/dev"):
        if name in CardFS.DEVS:
            continue
        try:
            await ctx.fs.open("/dev/" + name).flush()
        except FsError as e:
            await ctx.err(f"sync: {e}\n")
            status = 1
    return status


@command("stty", help="the console's window size", usage="stty size")
async def _stty(ctx: ShellContext, args: list[str]) -> int:
    if args != ["size"]:
        raise ShellError("only 'stty size' is supported")
    cols, rows = ctx.size
    await ctx.out(f"{rows} {cols}\n")
    return 0


async def _shutdown(ctx: ShellContext, args: list[str], status: str, verb: str) -> int:
    if args:
        raise ShellError(f"extra operand '{args[0]}'")
    if ctx.card is None:
        raise ShellError("no card to shut down")
    ctx.shutdown = status
    await ctx.out(f"The system is going down for {verb} NOW!\n")
    return 0


@command("reboot", help="restart the card OS", usage="reboot")
async def _reboot(ctx: ShellContext, args: list[str]) -> int:
    return await _shutdown(ctx, args, "restart", "reboot")


@command("poweroff", help="power the card off", usage="poweroff")
async def _poweroff(ctx: ShellContext, args: list[str]) -> int:
    return await _shutdown(ctx, args, "poweroff", "power-off")


@command("exit", help="end the shell session (exec: exit with STATUS)", usage="exit [STATUS]")
async def _exit(ctx: ShellContext, args: list[str]) -> int:
    if len(args) > 1:
        raise ShellError("too many arguments")
    try:
        status = int(args[0]) & 0xFF if args else 0
    except ValueError:
        raise ShellError(f"{args[0]}: numeric argument required", 2) from None
    ctx.exit_requested = True
    return status


# --------------------------------------------------------------------------
# the interactive shell


class _Input:
    """Typed bytes from the console port, read in the background, with Ctrl-C detection."""

    def __init__(self, port: ConsolePort) -> None:
        self.port = port
        self.buf = bytearray()
        self.event = asyncio.Event()
        self.closed: BaseException | None = None

    async def pump(self) -> None:
        try:
            while True:
                data = await self.port.read()
                self.buf += data
                self.event.set()
        except BrokenResourceError as e:
            self.closed = e
            self.event.set()

    async def byte(self) -> int:
        while not self.buf:
            if self.closed is not None:
                raise BrokenResourceError(str(self.closed))
            self.event.clear()
            await self.event.wait()
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
            if self.closed is not None:
                await asyncio.Event().wait()  # nothing more will come
            self.event.clear()
            await self.event.wait()


class InteractiveShell:
    """The shell on a console port: banner, prompt, line editing, commands.

    ``exit``/Ctrl-D end a session and a new one starts (a getty's respawn);
    ``reboot``/``poweroff`` ask the card OS to shut down. Returns only when
    the port goes away.
    """

    def __init__(self, card: Card | None, port: ConsolePort, fs: CardFS | None = None) -> None:
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
        async with asyncio.TaskGroup() as tg:
            pump = tg.create_task(inp.pump())
            try:
                while True:
                    self.sessions += 1
                    if not await self._session(inp):
                        break
            except BrokenResourceError as e:
                log.info("shell on %s ended: %s", self.port.label, e)
            pump.cancel()

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

    async def _readline(self, inp: _Input) -> str | None:
        """One edited line; None for Ctrl-D on an empty line."""
        buf: list[str] = []
        raw = bytearray()  # an incomplete UTF-8 sequence
        last_cr = False
        while True:
            b = await inp.byte()
            if b == 0x0A and last_cr:  # \r\n from a terminal that sends both
                last_cr = False
                continue
            last_cr = b == 0x0D
            if b in (0x0D, 0x0A):
                await self._write("\n")
                return "".join(buf)
            if b == 0x03:  # Ctrl-C: drop the line
                await self._write("^C\n")
                return ""
            if b == 0x04:  # Ctrl-D
                if not buf:
                    return None
                continue
            if b in (0x7F, 0x08):  # backspace / DEL
                if buf:
                    buf.pop()
                    await self._write("\b \b")
                continue
            if b == 0x15:  # Ctrl-U: kill the line
                if buf:
                    await self._write("\b \b" * len(buf))
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
            await self._write(ch)
