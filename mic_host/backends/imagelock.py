"""Image locking, as QEMU does it: read-write is exclusive, read-only may be shared.

Owns the lock a block backend holds on its image for as long as the image is
open (from boot or hot attach until detach, card stop or daemon exit), and
the record that says who holds it.

**The lock** is QEMU's (``block/file-posix.c``: ``raw_apply_lock_bytes``,
``raw_check_lock_bytes``), byte for byte, so a MIC-VOP daemon and a QEMU
that share an image see each other: open file description (OFD) locks,
``F_OFD_SETLK``, shared (``F_RDLCK``) on single bytes, where byte
``100 + n`` says "I hold permission n" and byte ``200 + n`` says "nobody else
may hold permission n" (n: 0 consistent read, 1 write, 2 write-unchanged,
3 resize). A writer holds 100, 101, 102 and denies 201 and 203; a reader
holds 100 and denies 201 and 203. After taking its bytes an opener tests
(``F_OFD_GETLK``) the bytes that would conflict: 200 + n for what it holds,
100 + n for what it denies. Locking before testing means two openers racing
both fail rather than both succeed. OFD locks belong to the open file, not
the process: two opens of one file in one daemon (``vdb`` and ``vdf`` on one
image) conflict as two daemons do, and closing the image (or the daemon
dying, even by SIGKILL) releases them.

**The holder.** ``F_OFD_GETLK`` reports ``l_pid = -1`` for an OFD lock: the
kernel does not say who holds it. So every holder also leaves a small JSON
record (card, device, mode, daemon pid, state directory) in a per-user
directory (:func:`record_dir`: ``$XDG_RUNTIME_DIR/mic-vop/image-locks``, else
``/tmp/mic-vop-<uid>/image-locks``), named after the image's device and inode
(two paths to one file are one image). A refusal names the live holders it
finds there; records of dead daemons are ignored and removed. A holder with
no record (a QEMU, another user) is "another process".

**The override** is QEMU's ``share-rw`` / ``qemu-img --force-share``: with
``force_share`` the backend takes its "I hold" bytes (others still see it)
but denies nothing and tests nothing. A file system without OFD locks
(``ENOLCK``, ``EOPNOTSUPP``...) is used unlocked with a warning, as QEMU's
``locking=auto`` does.

Imports ``fcntl``, ``os``, ``struct``, ``json`` and ``virtio.errors`` only.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import json
import logging
import os
import stat
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from virtio.errors import ConfigError

__all__ = [
    "ImageLock",
    "ImageLockedError",
    "lock_image",
    "record_dir",
]

log = logging.getLogger(__name__)

# QEMU's BLK_PERM_* bits (include/block/block-common.h) and lock bytes.
PERM_CONSISTENT_READ = 0x01
PERM_WRITE = 0x02
PERM_WRITE_UNCHANGED = 0x04
PERM_RESIZE = 0x08
PERM_ALL = 0x0F
LOCK_PERM_BASE = 100
LOCK_SHARED_BASE = 200

#: ``struct flock`` on Linux (l_type, l_whence, l_start, l_len, l_pid + padding).
_FLOCK = struct.Struct("hhqqi4x")
#: Tells apart the records of one process (one per open image).
_serial = itertools.count(1)
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class ImageLockedError(ConfigError):
    """The image is in use by another card, daemon or process (the message names it)."""


def _bits(mask: int) -> list[int]:
    return [i for i in range(4) if mask & (1 << i)]


def _flock(fd: int, cmd: int, ltype: int, start: int) -> tuple[int, int]:
    """One ``fcntl`` lock call on byte ``start``; returns ``(l_type, l_pid)``."""
    raw = fcntl.fcntl(fd, cmd, _FLOCK.pack(ltype, os.SEEK_SET, start, 1, 0))
    got_type, _, _, _, pid = _FLOCK.unpack(raw[: _FLOCK.size])
    return got_type, pid


def record_dir() -> Path:
    """Where holders leave their records (per user, shared by every daemon)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return Path(runtime) / "mic-vop" / "image-locks"
    return Path(tempfile.gettempdir()) / f"mic-vop-{os.getuid()}" / "image-locks"


def _ours(base: Path) -> bool:
    """The record directory and its parent are real directories of this user
    (``/tmp`` is shared: a name another user made must not be trusted)."""
    try:
        for p in (base.parent, base):
            st = os.lstat(p)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
                return False
    except OSError:
        return False
    return True


def _record_prefix(st: os.stat_result) -> str:
    return f"{st.st_dev:x}-{st.st_ino:x}."


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True, slots=True)
class Holder:
    """Who holds an image (from its record)."""

    card: str | None
    device: str | None
    mode: str
    pid: int
    state_dir: str | None

    def describe(self, me: int) -> str:
        if self.device is None:  # a device its user did not name: no made-up label
            who = f"a disk of {self.card}" if self.card else "a disk"
        else:
            who = f"{self.card} device {self.device!r}" if self.card else f"device {self.device!r}"
        daemon = "this mic-host" if self.pid == me else "mic-host"
        where = f", state dir {self.state_dir}" if self.state_dir and self.pid != me else ""
        return f"{who} ({self.mode}, {daemon} pid {self.pid}{where})"


def holders(st: os.stat_result) -> list[Holder]:
    """The live holders recorded for the image ``st`` (stale records are removed)."""
    base = record_dir()
    out: list[Holder] = []
    if not _ours(base):
        return out
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return out
    prefix = _record_prefix(st)
    for name in names:
        if not name.startswith(prefix) or not name.endswith(".json"):
            continue
        path = base / name
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or not _alive(data.get("pid")):
            with contextlib.suppress(OSError):
                path.unlink()
            continue
        out.append(
            Holder(
                card=_str_or_none(data.get("card")),
                device=_str_or_none(data.get("device")),
                mode=str(data.get("mode", "?")),
                pid=int(data["pid"]),
                state_dir=_str_or_none(data.get("state_dir")),
            )
        )
    return out


def _str_or_none(v: object) -> str | None:
    return v if isinstance(v, str) else None


class ImageLock:
    """The lock one open image holds; :meth:`release` it before closing the fd
    (closing the fd alone releases the lock, but leaves the record)."""

    def __init__(self, record: Path | None) -> None:
        self.record = record

    def release(self) -> None:
        if self.record is not None:
            with contextlib.suppress(OSError):
                self.record.unlink()
            self.record = None


def _write_record(st: os.stat_result, info: dict[str, Any]) -> Path | None:
    base = record_dir()
    try:
        base.parent.mkdir(exist_ok=True, mode=0o700)
        base.mkdir(exist_ok=True, mode=0o700)
        if not _ours(base):
            raise PermissionError(f"{base} is not this user's directory")
        path = base / f"{_record_prefix(st)}{os.getpid()}.{next(_serial)}.json"
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
        os.replace(tmp, path)
    except OSError as e:  # the lock still holds; only the name of its holder is lost
        log.warning("cannot record the holder of an image lock in %s: %s", base, e)
        return None
    return path


def lock_image(
    fd: int,
    path: object,
    *,
    read_only: bool,
    force_share: bool = False,
    card: str | None = None,
    device: str | None = None,
    state_dir: str | None = None,
) -> ImageLock:
    """Lock the open image ``fd`` (QEMU's bytes) and record who holds it.

    Raises:
        ImageLockedError: another open of the image holds a conflicting lock:
            "<path> is in use by <holders>" (unless ``force_share``).
    """
    perm = PERM_CONSISTENT_READ if read_only else PERM_CONSISTENT_READ | PERM_WRITE
    perm |= 0 if read_only else PERM_WRITE_UNCHANGED
    shared = PERM_ALL if force_share else PERM_ALL & ~(PERM_WRITE | PERM_RESIZE)
    conflict = False
    try:
        for i in _bits(perm):
            _flock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, LOCK_PERM_BASE + i)
        for i in _bits(PERM_ALL & ~shared):
            _flock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, LOCK_SHARED_BASE + i)
        if not force_share:
            # what I hold, somebody denies; what I deny, somebody holds
            tests = [LOCK_SHARED_BASE + i for i in _bits(perm)]
            tests += [LOCK_PERM_BASE + i for i in _bits(PERM_ALL & ~shared)]
            conflict = any(
                _flock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, byte)[0] != fcntl.F_UNLCK
                for byte in tests
            )
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):  # somebody holds an exclusive lock there
            conflict = not force_share
        elif e.errno not in _NO_LOCKS:
            raise ConfigError(f"cannot lock {path}: {e.strerror}") from e
        else:
            log.warning(
                "%s: the file system has no OFD locks (%s): used unlocked", path, e.strerror
            )
            return ImageLock(None)
    st = os.fstat(fd)
    if conflict:
        _unlock_all(fd)
        raise ImageLockedError(_refusal(path, st, read_only))
    info = {
        "card": card,
        "device": device,
        "mode": "read-only" if read_only else "read-write",
        "pid": os.getpid(),
        "state_dir": state_dir,
        "path": str(path),
        "force_share": force_share,
    }
    return ImageLock(_write_record(st, info))


def _unlock_all(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, 0, 0, 0))


def _refusal(path: object, st: os.stat_result, read_only: bool) -> str:
    found = holders(st)
    want = "read-only" if read_only else "read-write"
    if found:
        who = "; ".join(h.describe(os.getpid()) for h in found)
    else:
        who = "another process (a QEMU, or a daemon of another user)"
    return (
        f"{path} is in use by {who}: cannot open it {want}. "
        "Detach it there first, or attach with force_share = true (micctl attach "
        "--force-share) if you know the writers cannot collide"
    )
