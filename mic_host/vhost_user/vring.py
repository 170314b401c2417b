"""One vhost-user virtqueue as the back-end keeps it between messages.

Owns :class:`Vring` (what SET_VRING_NUM/BASE/ADDR/KICK/CALL/ERR/ENABLE said,
the eventfds, the running split or packed device queue, the kick watch on
the event loop) and :class:`VringOwner`, what the vring's
:class:`mic_host.endpoint.QueueEndpoint` calls back into: the call eventfd is
its interrupt, a ring error latches the queue broken and is signalled on the
error eventfd. Also :func:`listen_unix`, the listening socket (a stale socket
file is replaced, a live one is not).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
from dataclasses import dataclass, field
from pathlib import Path

from mic_host.endpoint import AnyDeviceQueue, EndpointState, QueueEndpoint
from transport.vhost_user import VringAddr
from transport.vhost_user import close_fds as _close_fds
from virtio.errors import MicError
from virtio.ratelimit import LimitedLogger

__all__ = ["Vring", "VringOwner", "listen_unix"]


class VringOwner:
    """What a :class:`QueueEndpoint` calls back into: this vring's call/err eventfds."""

    def __init__(self, log: LimitedLogger) -> None:
        self.vring: Vring | None = None
        self._log = log

    def _interrupt(self) -> None:
        fd = self.vring.call_fd if self.vring is not None else None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.eventfd_write(fd, 1)

    def _ring_error(self, index: int, exc: MicError) -> None:
        v = self.vring
        assert v is not None
        self._log.error("vhost-user queue %d broken by the guest driver: %s", index, exc)
        if v.err_fd is not None:
            with contextlib.suppress(OSError):
                os.eventfd_write(v.err_fd, 1)
        v.stop_kicks()
        v.endpoint.detach(EndpointState.BROKEN, str(exc))

    def _published(self, index: int, next_avail: int) -> None:
        pass


@dataclass(eq=False)
class Vring:
    index: int
    endpoint: QueueEndpoint
    num: int = 0
    base: int = 0
    addr: VringAddr | None = None
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    enabled: bool = False
    queue: AnyDeviceQueue | None = None
    _loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False)

    @property
    def started(self) -> bool:
        return self.queue is not None

    def _on_kick(self) -> None:
        fd = self.kick_fd
        if fd is None:
            return
        try:
            os.eventfd_read(fd)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.stop_kicks()
            return
        self.endpoint.notify()

    def watch_kicks(self) -> None:
        if self.kick_fd is not None and self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self.kick_fd, self._on_kick)

    def stop_kicks(self) -> None:
        if self._loop is not None and self.kick_fd is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(self.kick_fd)
        self._loop = None

    def replace_fd(self, attr: str, fd: int | None) -> None:
        old = getattr(self, attr)
        if attr == "kick_fd":
            self.stop_kicks()
        if old is not None:
            _close_fds([old])
        setattr(self, attr, fd)

    def close_fds(self) -> None:
        for attr in ("kick_fd", "call_fd", "err_fd"):
            self.replace_fd(attr, None)


def listen_unix(path: Path) -> socket.socket:
    """A listening Unix socket at ``path``; a stale socket file (nobody listening) is replaced.

    Raises:
        OSError: the path is taken by a live server or by something that is not a socket.
    """
    try:
        st = path.lstat()
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            path.unlink()
        else:
            raise FileExistsError(f"{path}: another back-end is already listening there")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        sock.listen(1)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
