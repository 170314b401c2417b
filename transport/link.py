"""The control link: framed JSON messages (and, in the handshake, fds) over a Unix socket.

Owns the wire framing and the message link used after the handshake. Frames
are a 4-byte big-endian length followed by a UTF-8 JSON *object*; lengths are
bounded (``max_message``) and anything else — a short frame, bad UTF-8, JSON
that is not an object, NaN — is a :class:`RemoteProtocolError`. File
descriptors travel only as SCM_RIGHTS attached to the first byte of a frame
(unix(7)); fds arriving where none are expected are closed and refused.

A :class:`MessageLink` owns its socket and a reader task (run by its owner's
TaskGroup through :meth:`MessageLink.run`) that turns EOF, a reset or a framing
error into :class:`LinkLost` for every later ``recv``/``send`` and calls the
owner's ``on_lost`` callbacks — that is how a peer's death reaches doorbell
waiters.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import os
import socket
import struct
from collections.abc import Callable, Sequence
from typing import Any

from transport.errors import LinkLost
from virtio.errors import ClosedResourceError, LocalProtocolError, RemoteProtocolError, WouldBlock

__all__ = ["DEFAULT_MAX_MESSAGE", "MAX_FDS", "FramedSocket", "MessageLink"]

DEFAULT_MAX_MESSAGE = 1 << 20
#: fds per frame; the kernel's SCM_MAX_FD is 253
MAX_FDS = 250
_HEADER = struct.Struct(">I")
_RECV_CHUNK = 1 << 16
_ANCBUF = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} is not JSON")


def encode_frame(msg: dict[str, Any], max_message: int) -> bytes:
    """Encode one frame.

    Raises:
        LocalProtocolError: not a dict, not JSON-able, or larger than ``max_message``.
    """
    if not isinstance(msg, dict):
        raise LocalProtocolError(f"a link message is a dict, not {type(msg).__name__}")
    try:
        body = json.dumps(msg, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise LocalProtocolError(f"message is not JSON-able: {e}") from e
    if len(body) > max_message:
        raise LocalProtocolError(f"message of {len(body)} B exceeds the {max_message} B limit")
    return _HEADER.pack(len(body)) + body


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):  # 1e400 overflows to infinity
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"duplicate key {dup!r:.60}")
    return obj


def decode_body(body: bytes) -> dict[str, Any]:
    """Decode a frame body; raises RemoteProtocolError unless it is a JSON object.

    Duplicate keys are refused (a message means one thing), and so is nesting
    deep enough to exhaust the parser's recursion (``[[[[...``): both are the
    peer's fault, never a crash of the reader.
    """
    try:
        obj = json.loads(
            body.decode("utf-8"),
            parse_constant=_reject_constant,
            parse_float=_finite_float,
            object_pairs_hook=_unique_keys,
        )
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RemoteProtocolError(f"frame is not valid JSON: {e}", reason="json") from e
    except RecursionError as e:
        raise RemoteProtocolError("frame nests JSON too deeply", reason="json") from e
    if not isinstance(obj, dict):
        raise RemoteProtocolError(
            f"frame is JSON {type(obj).__name__}, not an object", reason="json"
        )
    return obj


def _close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class FramedSocket:
    """Frames over a non-blocking Unix stream socket (owns the socket).

    Raises on receive: :class:`LinkLost` on EOF/reset, :class:`RemoteProtocolError`
    on a bad frame. ``recv_frame`` returns the fds that came with the frame
    (the caller owns them).
    """

    def __init__(self, sock: socket.socket, max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.max_message = max_message
        self._buf = bytearray()
        self._send_lock = asyncio.Lock()
        self._closed = False
        self._waits: dict[asyncio.Future[None], tuple[asyncio.AbstractEventLoop, int, bool]] = {}

    @property
    def closed(self) -> bool:
        return self._closed

    async def _wait(self, writable: bool) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        fd = self.sock.fileno()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        (loop.add_writer if writable else loop.add_reader)(fd, ready)
        self._waits[fut] = (loop, fd, writable)
        try:
            await fut
        finally:
            self._unregister(fut)

    def _unregister(self, fut: asyncio.Future[None]) -> None:
        reg = self._waits.pop(fut, None)
        if reg is not None:
            loop, fd, writable = reg
            if not loop.is_closed():
                (loop.remove_writer if writable else loop.remove_reader)(fd)

    async def _recv_some(self, fds: list[int]) -> bool:
        """Read once into the buffer (fds appended); False on EOF."""
        while True:
            if self._closed:
                raise ClosedResourceError("link is closed")
            try:
                data, anc, flags, _ = self.sock.recvmsg(_RECV_CHUNK, _ANCBUF)
            except (BlockingIOError, InterruptedError):
                await self._wait(writable=False)
                continue
            except OSError as e:  # ECONNRESET and friends
                raise LinkLost(f"control link broken: {e}") from e
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(cdata[: len(cdata) - len(cdata) % a.itemsize])
                    fds.extend(a)
            if flags & socket.MSG_CTRUNC:
                raise RemoteProtocolError("too many fds in one frame (truncated)", reason="fds")
            if not data:
                return False
            self._buf += data
            return True

    async def recv_exact(self, n: int, fds: list[int]) -> bytes:
        """Exactly ``n`` raw bytes, never reading past them (for protocols with their
        own framing, e.g. vhost-user: fds travel with the header, so a read must
        not run into the next message). Fds that arrive are appended to ``fds``
        (the caller owns them). Returns ``b""`` on EOF before the first byte.

        Raises:
            LinkLost: EOF after the first byte, or a socket error.
            RemoteProtocolError: more fds than one message may carry.
        """
        if self._buf:
            raise LocalProtocolError("recv_exact on a socket already read frame-wise")
        got = bytearray()
        while len(got) < n:
            if self._closed:
                raise ClosedResourceError("link is closed")
            try:
                data, anc, flags, _ = self.sock.recvmsg(n - len(got), _ANCBUF)
            except (BlockingIOError, InterruptedError):
                await self._wait(writable=False)
                continue
            except OSError as e:
                raise LinkLost(f"socket broken: {e}") from e
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(cdata[: len(cdata) - len(cdata) % a.itemsize])
                    fds.extend(a)
            if flags & socket.MSG_CTRUNC:
                raise RemoteProtocolError("too many fds in one message (truncated)", reason="fds")
            if not data:
                if got:
                    raise LinkLost(f"peer closed the socket after {len(got)} of {n} B")
                return b""
            got += data
        return bytes(got)

    async def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send raw bytes (fds attached to the first byte), no framing added.

        Raises:
            LocalProtocolError: too many fds.
            LinkLost: the peer is gone (EPIPE/ECONNRESET).
        """
        if len(fds) > MAX_FDS:
            raise LocalProtocolError(f"{len(fds)} fds exceed the {MAX_FDS} per-frame limit")
        async with self._send_lock:
            if self._closed:
                raise ClosedResourceError("link is closed")
            view = memoryview(data)
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
            try:
                while view:
                    try:
                        sent = self.sock.sendmsg([view], anc)
                    except (BlockingIOError, InterruptedError):
                        await self._wait(writable=True)
                        continue
                    anc = []  # fds went with the first byte
                    view = view[sent:]
            except OSError as e:
                raise LinkLost(f"socket broken: {e}") from e

    async def recv_frame(self) -> tuple[dict[str, Any], list[int]]:
        """Receive one frame and the fds that came with it.

        Raises:
            LinkLost: EOF (also in the middle of a frame) or a socket error.
            RemoteProtocolError: oversized or malformed frame (its fds are closed).
        """
        fds: list[int] = []
        try:
            while len(self._buf) < _HEADER.size:
                if not await self._recv_some(fds):
                    raise LinkLost(
                        "peer closed the control link" + (" mid-frame" if self._buf else "")
                    )
            (n,) = _HEADER.unpack_from(self._buf)
            if n > self.max_message:
                raise RemoteProtocolError(
                    f"frame of {n} B exceeds the {self.max_message} B limit", reason="size"
                )
            while len(self._buf) < _HEADER.size + n:
                if not await self._recv_some(fds):
                    raise LinkLost("peer closed the control link mid-frame")
            body = bytes(self._buf[_HEADER.size : _HEADER.size + n])
            del self._buf[: _HEADER.size + n]
            return decode_body(body), fds
        except BaseException:
            _close_fds(fds)
            raise

    async def send_frame(self, msg: dict[str, Any], fds: Sequence[int] = ()) -> None:
        """Send one frame (fds attached to its first byte).

        Raises:
            LocalProtocolError: bad message (see :func:`encode_frame`), too many fds.
            LinkLost: the peer is gone (EPIPE/ECONNRESET).
        """
        await self.send_raw(encode_frame(msg, self.max_message), fds)

    def close(self) -> None:
        """Close the socket; a pending receive/send fails with ClosedResourceError."""
        if self._closed:
            return
        self._closed = True
        for fut in list(self._waits):
            # unregister before the fd number can be reused by someone else
            self._unregister(fut)
            if not fut.done():
                fut.set_exception(ClosedResourceError("link is closed"))
        self.sock.close()


_EOF = object()


class MessageLink:
    """The post-handshake message link: ``await send(dict)`` / ``await recv() -> dict``.

    Messages received before the peer vanished are still delivered; after them
    ``recv`` raises :class:`LinkLost` (or the :class:`RemoteProtocolError` that
    broke the framing, wrapped as the ``__cause__`` of LinkLost). ``recv_nowait``
    raises :class:`WouldBlock` when nothing is queued. ``peer_pid`` is the
    peer's pid from SO_PEERCRED.
    """

    def __init__(self, fs: FramedSocket, *, queue_size: int = 1024) -> None:
        self._fs = fs
        self._queue: asyncio.Queue[object] = asyncio.Queue(queue_size)
        self._error: LinkLost | None = None
        self._closed = False
        self._lost = asyncio.Event()
        self._on_lost: list[Callable[[LinkLost], None]] = []
        self.peer_pid = _peer_pid(fs.sock)
        self.sent = 0
        self.received = 0

    # -- status ---------------------------------------------------------------
    @property
    def lost(self) -> bool:
        """True once the link is unusable (peer gone, framing broken, or closed)."""
        return self._error is not None

    @property
    def error(self) -> LinkLost | None:
        return self._error

    def add_lost_callback(self, cb: Callable[[LinkLost], None]) -> None:
        """Call ``cb(err)`` once when the link is lost (immediately if it already is)."""
        if self._error is not None:
            cb(self._error)
        else:
            self._on_lost.append(cb)

    async def wait_lost(self) -> LinkLost:
        """Wait until the link is lost; returns the error."""
        await self._lost.wait()
        assert self._error is not None
        return self._error

    # -- I/O ---------------------------------------------------------------------
    async def send(self, msg: dict[str, Any]) -> None:
        """Send one message.

        Raises:
            LocalProtocolError: not a JSON-able dict or too big.
            LinkLost: the link is lost. ClosedResourceError: we closed it.
        """
        self._check_send()
        try:
            await self._fs.send_frame(msg)
        except LinkLost as e:
            self._fail(e)
            raise
        except ClosedResourceError:
            self._check_send()  # lost while we waited: raise LinkLost, not "closed"
            raise
        self.sent += 1

    def _check_send(self) -> None:
        if self._closed:
            raise ClosedResourceError("link is closed")
        if self._error is not None:
            raise self._error

    async def recv(self) -> dict[str, Any]:
        """Receive the next message.

        Raises:
            LinkLost: the peer is gone or broke the framing (after all messages
                received before that were delivered). ClosedResourceError: we closed it.
        """
        if self._closed:
            raise ClosedResourceError("link is closed")
        item = await self._queue.get()
        return self._item(item)

    def recv_nowait(self) -> dict[str, Any]:
        """Like :meth:`recv`, but raises WouldBlock when nothing is queued."""
        if self._closed:
            raise ClosedResourceError("link is closed")
        try:
            item = self._queue.get_nowait()
        except asyncio.QueueEmpty:
            raise WouldBlock("no message queued") from None
        return self._item(item)

    def _item(self, item: object) -> dict[str, Any]:
        if item is _EOF:
            self._queue.put_nowait(_EOF)  # keep raising for later callers
            assert self._error is not None
            raise self._error
        assert isinstance(item, dict)
        self.received += 1
        return item

    async def run(self) -> None:
        """The reader loop (run it in a TaskGroup); returns when the link is lost/closed."""
        try:
            while True:
                msg, fds = await self._fs.recv_frame()
                if fds:
                    _close_fds(fds)
                    raise RemoteProtocolError("unexpected fds on the message link", reason="fds")
                await self._queue.put(msg)
        except LinkLost as e:
            self._fail(e)
        except RemoteProtocolError as e:
            err = LinkLost(f"peer broke the link protocol: {e}")
            err.__cause__ = e
            self._fail(err)
        except ClosedResourceError:
            self._fail(LinkLost("link closed locally"))
        except asyncio.CancelledError:
            self._fail(LinkLost("link closed locally"))
            raise
        except Exception as e:  # whatever the peer sent, the reader ends cleanly
            # A bug of ours the peer's frame tripped (the decoder refuses what
            # it knows is bad): the link is lost, the owner sees why, and the
            # task group that runs the reader is not torn down by it.
            err = LinkLost(f"link reader failed on a frame from the peer: {e!r:.200}")
            err.__cause__ = e
            self._fail(err)

    def _fail(self, err: LinkLost) -> None:
        if self._error is not None:
            return
        self._error = err
        self._fs.close()  # the peer sees EOF at once
        self._lost.set()
        try:
            self._queue.put_nowait(_EOF)
        except asyncio.QueueFull:
            # the consumer is behind: deliver the EOF marker after the backlog
            self._queue._queue.append(_EOF)  # type: ignore[attr-defined]
        cbs, self._on_lost = self._on_lost, []
        for cb in cbs:
            cb(err)

    def close(self) -> None:
        """Close the socket (idempotent); the reader task ends."""
        if not self._closed:
            self._fail(LinkLost("link closed locally"))
            self._closed = True
            self._fs.close()


def _peer_pid(sock: socket.socket) -> int | None:
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid, _uid, _gid = struct.unpack("3i", creds)
    # on a socket pair the kernel names the process that made it: if that is
    # us, the peer is unknown here (the caller that spawned it knows)
    return pid if pid and pid != os.getpid() else None
