"""Linux TAP devices and network namespaces, for virtio-net on both sides.

Owns the kernel plumbing the host's ``tap`` backend and the card's net driver
share: opening ``/dev/net/tun`` as a TAP with ``IFF_VNET_HDR`` (the 12-byte
virtio-net header in front of every frame, ``TUNSETVNETHDRSZ``), offloads
(``TUNSETOFFLOAD``), carrier (``TUNSETCARRIER``), creating the device inside a
named network namespace, and running iproute2 (``ip``) to address it.

Namespaces: ``setns(2)`` changes the calling *thread's* namespace, so a TAP is
created in a short-lived thread that enters the namespace, opens the device
(the netdev is born in that namespace) and exits; the file descriptor keeps
working from any namespace afterwards. Python 3.11 has no ``os.setns``, hence
the one ctypes call.

Errors say what to do: no privilege names the unprivileged ``switch``
backend; a missing namespace names ``ip netns add``.

Imports from the project only ``virtio.errors``.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import os
import shutil
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from virtio.errors import ConfigError, MicError

__all__ = [
    "NETNS_DIR",
    "Tap",
    "TapError",
    "TapPermissionError",
    "create_netns",
    "create_netns_sync",
    "delete_netns",
    "delete_netns_sync",
    "ip",
    "ip_sync",
    "netns_exists",
    "run_in_netns",
    "tap_privilege_problem",
]

# linux/if_tun.h
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
TUNSETCARRIER = 0x400454E2
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
_IFREQ = struct.Struct("16sH22x")  # struct ifreq: name, flags, padding to 40 B
CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")
_IFNAMSIZ = 16
_VNET_HDR_SIZE = 12

T = TypeVar("T")


class TapError(ConfigError):
    """A TAP device or namespace could not be set up (the message says why and what to do)."""


class TapPermissionError(TapError):
    """No privilege to create TAP devices (CAP_NET_ADMIN)."""


def tap_privilege_problem() -> str | None:
    """Why TAP devices cannot be created here, or None when they can (probably)."""
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun does not exist"
    if os.geteuid() != 0:
        # Without CAP_NET_ADMIN TUNSETIFF fails with EPERM; we do not try to
        # read capabilities, root is what the tests and mpssd use.
        return "not running as root (TAP needs CAP_NET_ADMIN)"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    return None


# --- namespaces -------------------------------------------------------------------


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


_libc: ctypes.CDLL | None = None


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def run_in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    """Run ``fn()`` in a fresh thread that has entered network namespace ``netns``.

    With ``netns`` None, ``fn`` runs here, in the caller's namespace.

    Raises:
        TapError: the namespace does not exist or cannot be entered.
        Whatever ``fn`` raises.
    """
    if netns is None:
        return fn()
    path = NETNS_DIR / netns
    try:
        nsfd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise TapError(
            f"network namespace {netns!r} does not exist (create it with `ip netns add {netns}`)"
        ) from None
    except OSError as e:
        raise TapError(f"network namespace {netns!r}: {e}") from e
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            _setns(nsfd)
            result.append(fn())
        except BaseException as e:  # handed to the caller's thread below
            error.append(e)

    try:
        t = threading.Thread(target=body, name=f"netns-{netns}", daemon=True)
        t.start()
        t.join()
    finally:
        os.close(nsfd)
    if error:
        exc = error[0]
        if isinstance(exc, OSError) and exc.errno == errno.EPERM:
            raise TapPermissionError(f"cannot enter network namespace {netns!r}: {exc}") from exc
        raise exc
    return result[0]


def _check_ip() -> str:
    exe = shutil.which("ip")
    if exe is None:
        raise TapError("iproute2's `ip` command is not installed (apt-get install iproute2)")
    return exe


def ip_sync(*args: str, netns: str | None = None) -> str:
    """Run ``ip [-n NETNS] ARGS...``; return its stdout.

    Raises:
        TapError: ``ip`` is missing or failed (its stderr is in the message).
    """
    import subprocess

    argv = [_check_ip(), *(["-n", netns] if netns else []), *args]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise TapError(f"`{' '.join(argv[1:])}` failed: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


async def ip(*args: str, netns: str | None = None) -> str:
    """Async :func:`ip_sync` (does not block the event loop)."""
    argv = [_check_ip(), *(["-n", netns] if netns else []), *args]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        msg = err.decode(errors="replace").strip() or str(proc.returncode)
        raise TapError(f"`{' '.join(argv[1:])}` failed: {msg}")
    return out.decode(errors="replace")


async def create_netns(name: str) -> None:
    """``ip netns add NAME``, then bring its loopback up.

    Raises:
        TapError: it exists already (the message says so), or ``ip`` failed.
    """
    if netns_exists(name):
        raise TapError(f"network namespace {name!r} already exists")
    await ip("netns", "add", name)
    await ip("link", "set", "lo", "up", netns=name)


def create_netns_sync(name: str) -> None:
    """:func:`create_netns` without an event loop (blocks on ``ip``).

    Raises:
        TapError: it exists already, or ``ip`` failed.
    """
    if netns_exists(name):
        raise TapError(f"network namespace {name!r} already exists")
    ip_sync("netns", "add", name)
    try:
        ip_sync("link", "set", "lo", "up", netns=name)
    except TapError:
        delete_netns_sync(name)
        raise


async def delete_netns(name: str) -> None:
    """``ip netns del NAME`` (nothing if it is gone already)."""
    if netns_exists(name):
        await ip("netns", "del", name)


def delete_netns_sync(name: str) -> None:
    """:func:`delete_netns` without an event loop (blocks on ``ip``).

    Raises:
        TapError: ``ip`` failed.
    """
    if netns_exists(name):
        ip_sync("netns", "del", name)


# --- TAP ----------------------------------------------------------------------------


class Tap:
    """An open TAP device with the virtio-net header (non-blocking fd).

    ``fd`` is read/written by the owner with ``os.readv``/``os.writev`` (one
    frame per call, header first). Closing the fd deletes the device (it is
    not persistent).
    """

    def __init__(self, fd: int, name: str, netns: str | None) -> None:
        self.fd = fd
        self.name = name
        self.netns = netns
        self.offloads = 0
        self._closed = False

    @classmethod
    def open(cls, name: str, *, netns: str | None = None, vnet_hdr: bool = True) -> Tap:
        """Create TAP ``name`` (in namespace ``netns``) with IFF_NO_PI | IFF_VNET_HDR
        (plain Ethernet frames, no header, with ``vnet_hdr=False``).

        Raises:
            TapPermissionError: no privilege (use the ``switch`` backend instead).
            TapError: bad name, name taken by another kind of device, no namespace.
        """
        if not name or len(name.encode()) >= _IFNAMSIZ or "/" in name or " " in name:
            raise TapError(f"bad interface name {name!r} (1..15 bytes, no '/' or spaces)")

        def create() -> int:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
            try:
                flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
                fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(name.encode(), flags))
                if vnet_hdr:
                    fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", _VNET_HDR_SIZE))
            except BaseException:
                os.close(fd)
                raise
            return fd

        try:
            fd = run_in_netns(netns, create)
        except FileNotFoundError as e:
            raise TapError(f"TAP {name}: /dev/net/tun is missing ({e})") from e
        except PermissionError as e:
            raise TapPermissionError(
                f"cannot create TAP device {name!r}: {e.strerror} (needs root or CAP_NET_ADMIN); "
                "the unprivileged alternative is the `switch` net backend"
            ) from e
        except OSError as e:
            if e.errno == errno.EPERM:
                raise TapPermissionError(
                    f"cannot create TAP device {name!r}: not permitted (needs root or "
                    "CAP_NET_ADMIN); the unprivileged alternative is the `switch` net backend"
                ) from e
            if e.errno == errno.EBUSY:
                raise TapError(f"TAP {name!r}: the name is in use by another device") from e
            raise TapError(f"TAP {name!r}: {e}") from e
        return cls(fd, name, netns)

    def fileno(self) -> int:
        return self.fd

    @property
    def closed(self) -> bool:
        return self._closed

    def set_offloads(
        self, *, csum: bool = False, tso4: bool = False, tso6: bool = False, ecn: bool = False
    ) -> None:
        """What this end can *receive* from the kernel (TSO needs csum).

        Raises:
            TapError: the kernel refused.
        """
        flags = 0
        if csum:
            flags |= TUN_F_CSUM
            if tso4:
                flags |= TUN_F_TSO4
            if tso6:
                flags |= TUN_F_TSO6
            if ecn and (tso4 or tso6):
                flags |= TUN_F_TSO_ECN
        try:
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)
        except OSError as e:
            raise TapError(f"TAP {self.name}: TUNSETOFFLOAD {flags:#x}: {e}") from e
        self.offloads = flags

    def set_carrier(self, up: bool) -> None:
        """Carrier on/off (``TUNSETCARRIER``, Linux >= 5.0; ignored where missing)."""
        try:
            fcntl.ioctl(self.fd, TUNSETCARRIER, struct.pack("i", 1 if up else 0))
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOTTY):
                raise TapError(f"TAP {self.name}: TUNSETCARRIER: {e}") from e

    async def configure(self, address: str | None, *, mtu: int | None = None) -> None:
        """Address it (``A.B.C.D/len``), set the MTU, bring it up.

        Raises:
            TapError: ``ip`` failed (bad address, ...).
        """
        for args in self._configure_commands(address, mtu):
            await ip(*args, netns=self.netns)

    def configure_sync(self, address: str | None, *, mtu: int | None = None) -> None:
        """:meth:`configure` without an event loop (blocks on ``ip``).

        Raises:
            TapError: ``ip`` failed (bad address, ...).
        """
        for args in self._configure_commands(address, mtu):
            ip_sync(*args, netns=self.netns)

    def _configure_commands(self, address: str | None, mtu: int | None) -> list[list[str]]:
        cmds = []
        if mtu is not None:
            cmds.append(["link", "set", self.name, "mtu", str(mtu)])
        if address:
            cmds.append(["addr", "replace", address, "dev", self.name])
        cmds.append(["link", "set", self.name, "up"])
        return cmds

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                os.close(self.fd)
            except OSError as e:  # pragma: no cover - a double close is our bug
                raise MicError(f"TAP {self.name}: close: {e}") from e
