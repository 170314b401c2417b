"""``micctl attach --copy-from`` / ``--preallocate``: block images made here, with progress.

The image is created by ``micctl`` (a long copy or allocation shows a
progress bar) before the ``attach`` request; the daemon then opens it as any
existing image. Imports ``mic_host.config`` (to resolve the image path as the
daemon would) and :mod:`mic_host.micctl.output`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mic_host.config import validate_device_options
from mic_host.config.files import image_size
from mic_host.micctl.output import Progress
from virtio.errors import ConfigError

__all__ = ["prepare_block_image"]

_CHUNK = 4 << 20


def _create(dst: Path) -> int:
    """A new image file, 0600 whatever the umask: it holds a card's data."""
    return os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)


def _copy_image(src: Path, dst: Path, size: int | None) -> None:
    """Copy ``src`` (a regular file or a block device: a FIFO or ``/dev/zero``
    would never end) into a new ``dst`` (zero chunks stay holes), grown to ``size``."""
    try:
        fd = os.open(src, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:  # the source, not the image being made, is the problem
        raise ConfigError(f"--copy-from {src}: {e.strerror or e}") from e
    with os.fdopen(fd, "rb") as fin:
        try:
            total = image_size(fd, src)
        except ConfigError as e:
            raise ConfigError(f"--copy-from {e}") from None
        os.set_blocking(fd, True)
        if size is not None and size < total:
            raise ConfigError(f"--size {size} is smaller than {src} ({total} B)")
        progress = Progress(f"copying {src.name} -> {dst.name}", total)
        progress.update(0)
        buf = bytearray(_CHUNK)
        zero = bytes(_CHUNK)
        with os.fdopen(_create(dst), "wb") as fout:
            done = 0
            while True:
                n = fin.readinto(buf)
                if not n:
                    break
                if buf[:n] == zero[:n]:
                    fout.seek(n, os.SEEK_CUR)  # keep the copy sparse
                else:
                    fout.write(memoryview(buf)[:n])
                done += n
                progress.update(done)
            fout.truncate(max(done, size or 0))
            os.fsync(fout.fileno())
    progress.update(total)


def _preallocate_image(dst: Path, size: int) -> None:
    """Create ``dst`` with ``size`` bytes allocated (no holes), in chunks, with progress."""
    progress = Progress(f"allocating {dst.name}", size, rate=False)
    progress.update(0)
    fd = _create(dst)
    try:
        step = 16 << 20
        for off in range(0, size, step):
            os.posix_fallocate(fd, off, min(step, size - off))
            progress.update(min(off + step, size))
        os.fsync(fd)
    finally:
        os.close(fd)


def prepare_block_image(
    state_dir: Path, args: argparse.Namespace, opts: dict[str, Any]
) -> Path | None:
    """``--copy-from`` / ``--preallocate``: make the image here, before attaching.

    Returns the path created (removed again if the attach fails), or None.

    Raises:
        ConfigError: bad combination, the image exists, I/O errors.
    """
    if not (args.copy_from or args.preallocate) or "image" not in opts:
        return None
    image = Path(
        validate_device_options(
            "block", {"image": opts["image"]}, state_dir=state_dir, card=args.card
        )["image"]
    )
    size = opts.get("size")
    if args.copy_from:
        if image.exists():
            raise ConfigError(f"{image} exists; --copy-from only creates new images")
        make: Callable[[], None] = functools.partial(
            _copy_image, Path(args.copy_from).expanduser(), image, size
        )
    else:
        if not args.create or size is None:
            raise ConfigError("--preallocate needs --create and --size")
        if image.exists():
            return None  # --create: an existing image is used as it is
        make = functools.partial(_preallocate_image, image, int(size))
    try:
        make()
    except (OSError, ConfigError) as e:
        with contextlib.suppress(OSError):
            image.unlink()  # half-made: do not leave it for the next attempt to pick up
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"cannot create {image}: {e.strerror or e}") from e
    opts["image"] = str(image)
    opts.pop("create", None)
    opts.pop("size", None)
    return image
