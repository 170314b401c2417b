"""The raw image file under a block device: creating it, punching holes, writing zeros.

What ``mic_host.backends.block`` does to the file itself, apart from reading
and writing requests: a new image is sparse and 0600; DISCARD punches holes
with ``fallocate(PUNCH_HOLE | KEEP_SIZE)`` (through ctypes: ``os`` has
``posix_fallocate`` but no mode flags) and WRITE_ZEROES falls back to writing
zeros where the file system cannot punch.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable
from pathlib import Path

from mic_host.config.sizes import format_size
from virtio.errors import ConfigError

__all__ = ["create_image", "punch_hole", "write_zeros"]

_ZEROS = bytes(1 << 20)

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_NOT_SUPPORTED = {errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):  # pragma: no cover - not glibc/musl
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_fallocate = _load_fallocate()


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate ``[offset, offset+length)`` of ``fd`` (reads return zeros, size kept).

    Returns False when the file system (or the platform) cannot punch holes.

    Raises:
        OSError: any other failure (EIO, EBADF...).
    """
    if _fallocate is None or length <= 0:
        return _fallocate is not None
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    if _fallocate(fd, mode, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in _NOT_SUPPORTED:
        return False
    raise OSError(err, os.strerror(err))


def write_zeros(fd: int, offset: int, length: int) -> None:
    while length > 0:
        n = os.pwrite(fd, memoryview(_ZEROS)[: min(length, len(_ZEROS))], offset)
        offset += n
        length -= n


def create_image(label: str, path: Path, size: int) -> None:
    """A new sparse image of ``size`` bytes, 0600 whatever the umask (it holds the
    card's data); nothing is left behind if it cannot be made whole.

    Raises:
        ConfigError: it cannot be created (EFBIG: the file system's largest
            file is smaller than ``size``).
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise ConfigError(f"{label}cannot create {path}: {e.strerror}") from e
    try:
        os.ftruncate(fd, size)
    except OSError as e:
        os.close(fd)
        path.unlink(missing_ok=True)
        hint = ": the file system's largest file is smaller" if e.errno == errno.EFBIG else ""
        raise ConfigError(
            f"{label}cannot create {path} with size = {format_size(size)}: {e.strerror}{hint}"
        ) from e
    os.close(fd)
