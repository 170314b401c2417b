"""The shell's vocabulary: its errors, its exit statuses and the system's identity.

The bottom of :mod:`mic_card.shell`: every other shell module may import it;
it imports nothing from ``mic_card``.
"""

from __future__ import annotations

from importlib import metadata

from virtio.errors import MicError

__all__ = [
    "MACHINE",
    "STATUS_INTERRUPTED",
    "STATUS_NOT_FOUND",
    "STATUS_PIPE",
    "STATUS_TIMEOUT",
    "SYSNAME",
    "VERSION",
    "FsError",
    "OutputFull",
    "ShellError",
]

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


class OutputFull(ShellError):
    """Captured output reached its bound: the command is stopped, as a writer to a
    closed pipe is (``cat /dev/zero | head -c N``), with status 141 (128 + SIGPIPE)."""

    def __init__(self) -> None:
        super().__init__("write error: output limit reached", STATUS_PIPE)
