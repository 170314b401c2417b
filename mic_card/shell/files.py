"""File and block-device shell commands: cat, ls, rm, sha256sum, dd, sync, blkinfo.

Output formats follow coreutils (``sha256sum``: ``HEX  NAME``; ``dd``:
records and bytes on stderr). Registered on import. Imports the registry,
:mod:`mic_card.shell.fs` and :mod:`mic_card.shell.base`; never the card OS.
"""

from __future__ import annotations

import asyncio
import hashlib
import time

from mic_card.shell.base import FsError, ShellError
from mic_card.shell.fs import IO_CHUNK, CardFS, File, TmpFile
from mic_card.shell.registry import ShellContext, command
from virtio.errors import MicError

__all__ = ["parse_number"]


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
async def _copy_out(ctx: ShellContext, f: File) -> None:
    off = 0
    while True:
        data = await f.pread(off, IO_CHUNK)
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
            while data := await f.pread(off, IO_CHUNK):
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
        if isinstance(dst, TmpFile) and "notrunc" not in conv:
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
