"""What a block image may be: a regular file or a block device, holding at least one block.

Owns the checks the config runs on an existing image at load (and at attach)
and the block backend runs again on the file it opens (the file may have
changed in between): the kind of file (a FIFO, a character device such as
``/dev/zero`` or ``/dev/null``, a directory or a socket is refused: it would
be a disk of capacity 0, or block the daemon on ``open``), its size (a block
device's ``st_size`` is 0: its size is where ``lseek(SEEK_END)`` lands) and
that it holds one whole logical block. Imports ``os``, ``stat`` and
``virtio.errors`` only. Messages carry no key path: callers add it.
"""

from __future__ import annotations

import os
import stat

from virtio.errors import ConfigError

__all__ = ["image_size", "open_image", "probe_image", "size_problem"]

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
)


def _kind_problem(path: object, mode: int) -> str | None:
    if stat.S_ISREG(mode) or stat.S_ISBLK(mode):
        return None
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    return f"{path} is {kind}: an image must be a regular file or a block device"


def image_size(fd: int, path: object = "image") -> int:
    """Bytes of the open image ``fd`` (a block device: up to where ``lseek`` ends).

    Raises:
        ConfigError: ``fd`` is neither a regular file nor a block device.
        OSError: ``fstat``/``lseek`` failed.
    """
    st = os.fstat(fd)
    problem = _kind_problem(path, st.st_mode)
    if problem is not None:
        raise ConfigError(problem)
    if stat.S_ISBLK(st.st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    return st.st_size


def size_problem(path: object, size: int, blk_size: int) -> str | None:
    """Why an image of ``size`` bytes makes no disk (capacity 0), or None."""
    if size >= blk_size:
        return None
    if size == 0:
        return f"{path} is empty: an image must hold at least one {blk_size}-byte block"
    return f"{path} holds {size} B, less than one {blk_size}-byte block"


def probe_image(path: str, blk_size: int) -> bool:
    """Check an image that may exist, without reading it; False if it does not exist.

    A block device that cannot be opened here (permissions) is left for the
    backend, which opens it at boot.

    Raises:
        ConfigError: it exists but is not a regular file or a block device,
            holds less than one block, or cannot be looked at.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise ConfigError(f"cannot look at {path}: {e.strerror or e}") from e
    problem = _kind_problem(path, st.st_mode)
    if problem is not None:
        raise ConfigError(problem)
    size: int | None = st.st_size
    if stat.S_ISBLK(st.st_mode):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            size = None
        else:
            try:
                size = os.lseek(fd, 0, os.SEEK_END)
            finally:
                os.close(fd)
    if size is not None and (problem := size_problem(path, size, blk_size)) is not None:
        raise ConfigError(problem)
    return True


def open_image(path: os.PathLike[str] | str, flags: int, blk_size: int) -> tuple[int, int]:
    """Open an image (never blocking on a FIFO, never taking a terminal) and check it.

    Returns ``(fd, size in bytes)``; the fd is blocking again.

    Raises:
        ConfigError: not a regular file or block device, or less than one block.
        OSError: the open itself failed.
    """
    fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        size = image_size(fd, path)
        problem = size_problem(path, size, blk_size)
        if problem is not None:
            raise ConfigError(problem)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, size
