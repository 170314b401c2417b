"""The control socket's server: accept clients, serve their requests, answer.

Owns the asyncio side of the control socket: :class:`ControlServer` (the
listening socket in the state directory, one per daemon), :func:`serve_connection`
(one client: requests served concurrently, answers in any order) and the
:class:`ControlHandler` seam the daemon implements (one method per op of
:data:`~mic_host.control.wire.OPS`). What travels is the codec's
(:mod:`mic_host.control.wire`); a handler's exception travels as
:class:`virtio.errors.WireError`. Imports asyncio, the codec, ``mic_host.paths``
and ``virtio.errors``; never the card manager or the client.

What a client can hold in the daemon is bounded:

- the socket is bound under umask 077, so it is owner-only from its first moment
  (a ``chmod`` after ``listen()`` leaves a window in which anyone who can
  reach the directory connects);
- at most :data:`MAX_CONNECTIONS` connections; one more is answered with an
  error and closed;
- an unfinished request line is at most :data:`~mic_host.control.wire.MAX_MESSAGE`
  bytes per connection and :data:`MAX_UNFINISHED` bytes over all connections;
  a connection that would go over either is answered with an error and
  closed, and its buffer is released;
- a client that hangs up (closes its socket; ``EPOLLHUP``) gets its waiting
  requests cancelled (:data:`CANCEL_ON_HANGUP`), so a ``wait`` with a huge
  timeout does not keep its connection's fd and task. A client that only
  shuts down its sending side (``socat``, ``nc -N``) still gets its answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from mic_host.control.stream import Stream
from mic_host.control.wire import (
    MAX_MESSAGE,
    OPS,
    BadRequest,
    Request,
    decode_request,
    encode_end,
    encode_error,
    encode_response,
)
from mic_host.paths import control_socket_path, secure_state_dir
from virtio.errors import INTERNAL_ERROR, ConfigError, ResourceError, WireError

__all__ = [
    "CANCEL_ON_HANGUP",
    "MAX_CONNECTIONS",
    "MAX_IN_FLIGHT",
    "MAX_UNFINISHED",
    "ControlHandler",
    "ControlServer",
    "HangupWatch",
    "InputBudget",
    "LineBuffer",
    "Stream",
    "serve_connection",
]

log = logging.getLogger(__name__)

#: Requests served at once per connection; reading pauses beyond (back-pressure).
MAX_IN_FLIGHT = 64
#: Connections served at once by one daemon.
MAX_CONNECTIONS = 128
#: Bytes of unfinished request lines held over all connections at once.
MAX_UNFINISHED = 8 * MAX_MESSAGE
#: Bytes read from a connection at a time (also the stream's own buffer bound).
_CHUNK = 1 << 16
#: Ops whose request is cancelled when its client hangs up: they only wait or
#: read (a state change they make is made before their first wait, and every
#: await in them leaves the card consistent). The others (attach, detach, net,
#: console_resize, suspend, resume) change state over several steps and run to
#: completion; each is bounded by its own timeouts.
CANCEL_ON_HANGUP = frozenset(
    {"ping", "status", "wait", "stats", "run", "exec", "boot", "shutdown", "reset", "apps"}
    | {"devices"}
    | {"events", "logs"}  # streams: they only read
)


class ControlHandler(Protocol):
    """What the daemon implements; :func:`serve_connection` calls these by op name.

    (``timeout`` is a wire argument the daemon applies with ``asyncio.timeout``,
    hence the ASYNC109 exemptions.)

    Every method returns a JSON-serialisable dict (the response's ``result``)
    and raises a :class:`~virtio.errors.MicError` subclass for a refused or
    failed operation (sent as ``ok: false`` with the class name).
    ``timeout=None`` means the card's configured bound.
    """

    async def ping(self) -> dict[str, Any]: ...
    async def status(self, card: str | None) -> dict[str, Any]: ...
    async def boot(self, card: str, wait: bool, timeout: float | None) -> dict[str, Any]: ...
    async def shutdown(self, card: str, wait: bool, timeout: float | None) -> dict[str, Any]: ...
    async def reset(self, card: str) -> dict[str, Any]: ...
    async def wait(self, card: str, state: str, timeout: float | None) -> dict[str, Any]: ...
    async def attach(self, card: str, type: str, options: dict[str, Any]) -> dict[str, Any]: ...  # noqa: A002
    async def detach(self, card: str, device: str) -> dict[str, Any]: ...
    async def stats(self, card: str) -> dict[str, Any]: ...
    async def run(
        self,
        card: str,
        app: str,
        args: list[Any],
        code: dict[str, Any] | None,
        tag: str | None,
        timeout: float | None,
    ) -> dict[str, Any]: ...
    async def exec(
        self,
        card: str,
        argv: list[Any] | None,
        line: str | None,
        timeout: float | None,
        max_output: float,
        stdin: str | None,
    ) -> dict[str, Any]: ...
    async def console_resize(
        self, card: str, cols: float, rows: float, device: str | None
    ) -> dict[str, Any]: ...
    async def net(self, card: str, device: str | None, link: str | None) -> dict[str, Any]: ...
    async def suspend(self) -> dict[str, Any]: ...
    async def resume(self) -> dict[str, Any]: ...
    async def events(
        self, card: str | None, kinds: list[Any], buffer: float, stream: Stream
    ) -> dict[str, Any]: ...
    async def logs(
        self,
        card: str,
        source: str,
        lines: float,
        follow: bool,
        device: str | None,
        stream: Stream,
    ) -> dict[str, Any]: ...
    async def apps(self, card: str) -> dict[str, Any]: ...
    async def kill(self, card: str, app_id: float | None, tag: str | None) -> dict[str, Any]: ...
    async def devices(self, card: str) -> dict[str, Any]: ...
    async def vhost_user_export(self, socket: str, switch: str, mtu: float) -> dict[str, Any]: ...
    async def vhost_user_unexport(self, socket: str) -> dict[str, Any]: ...
    async def vhost_user_exports(self) -> dict[str, Any]: ...


def _refused(message: str) -> WireError:
    """A request this server refuses: the client's fault (``LocalProtocolError`` to it)."""
    return WireError("LocalProtocolError", "LocalProtocolError", message)


def _internal(message: str) -> WireError:
    return WireError(INTERNAL_ERROR, INTERNAL_ERROR, message)


async def _call(
    handler: object,
    req: Request,
    send: Callable[[bytes], Awaitable[None]] | None = None,
    gone: Callable[[], bool] | None = None,
    writer: asyncio.StreamWriter | None = None,
) -> bytes:
    method = getattr(handler, req.op, None)
    if method is None:
        return encode_error(req.id, _refused(f"op {req.op!r} is not supported by this daemon"))
    kwargs = req.handler_kwargs()
    stream = None
    if OPS[req.op].stream:
        if send is None or gone is None:
            return encode_error(req.id, _refused(f"op {req.op!r} streams: not here"))
        stream = kwargs["stream"] = Stream(req.id, send, gone, writer)
    try:
        result = await method(**kwargs)
    except asyncio.CancelledError:
        raise
    except Exception as e:
        err = WireError.from_exception(e)
        if err.base == INTERNAL_ERROR:
            log.exception("control: %s failed", req.op)
            msg = f"internal error in {req.op}: {type(e).__name__}: {e} (see the daemon log)"
            err = WireError.from_exception(e, msg)
        else:
            log.info("control: %s %s refused: %s: %s", req.op, req.card or "", err.type, e)
        return encode_error(req.id, err)
    if not isinstance(result, dict):
        log.error("control: %s returned %r, not a dict", req.op, type(result).__name__)
        msg = f"internal error in {req.op}: result is not an object"
        return encode_error(req.id, _internal(msg))
    try:
        if stream is not None:
            if stream.started:
                return encode_end(req.id, result)
            await stream.start(result)
            return encode_end(req.id, {})
        return encode_response(req.id, result)
    except (TypeError, ValueError) as e:
        log.error("control: %s result cannot be sent: %s", req.op, e)
        return encode_error(req.id, _internal(f"internal error in {req.op}: {e}"))


class InputBudget:
    """Bytes of unfinished request lines the daemon holds, over all connections."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int = MAX_UNFINISHED) -> None:
        self.limit = limit
        self.used = 0

    def charge(self, delta: int) -> bool:
        """Take ``delta`` more bytes (or give back, if negative); False if over the limit."""
        if delta > 0 and self.used + delta > self.limit:
            return False
        self.used += delta
        return True


class LineBuffer:
    """Splits a connection's bytes into lines, holding at most one unfinished line.

    The unfinished part is bounded by ``MAX_MESSAGE`` and charged to the
    daemon-wide :class:`InputBudget`; :meth:`release` gives it back.
    """

    __slots__ = ("_budget", "_buf")

    def __init__(self, budget: InputBudget) -> None:
        self._budget = budget
        self._buf = bytearray()

    def feed(self, data: bytes) -> tuple[list[bytes], str | None]:
        """The complete lines ``data`` ends (newline kept), and why the
        connection must end (a line over a bound: the stream cannot be
        resynchronised), if it must; the lines before that one are good.
        """
        buf = self._buf
        before = start = len(buf)
        buf += data
        lines: list[bytes] = []
        cut = 0
        too_long = f"line exceeds the {MAX_MESSAGE}-byte bound; closing"
        while (nl := buf.find(b"\n", start)) >= 0:
            if nl + 1 - cut > MAX_MESSAGE:
                self.release(before)
                return lines, too_long
            lines.append(bytes(buf[cut : nl + 1]))
            cut = start = nl + 1
        if cut:
            del buf[:cut]
        rest = len(buf)
        if rest >= MAX_MESSAGE:
            self.release(before)
            return lines, too_long
        if not self._budget.charge(rest - before):
            self.release(before)
            return lines, "the daemon holds too many unfinished requests; closing"
        return lines, None

    @property
    def pending(self) -> bytes:
        return bytes(self._buf)

    def release(self, charged: int | None = None) -> None:
        """Drop the unfinished line and give its bytes back to the budget."""
        self._budget.charge(-(len(self._buf) if charged is None else charged))
        self._buf = bytearray()


class HangupWatch:
    """Calls back when a client closes its socket entirely (``EPOLLHUP``).

    One ``epoll`` set, registered with the event loop as a reader, holds the
    connections with an event mask of 0: epoll then reports only hang-up and
    error, which Linux's ``unix_poll`` raises once the peer has closed (both
    directions shut), not when it only shut down its sending side. Without
    ``select.epoll`` (not Linux) it watches nothing.
    """

    def __init__(self) -> None:
        self._callbacks: dict[int, Callable[[], None]] = {}
        self._ep: select.epoll | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        if hasattr(select, "epoll"):
            self._loop = asyncio.get_running_loop()
            self._ep = select.epoll()
            self._loop.add_reader(self._ep.fileno(), self._ready)

    def add(self, fd: int, callback: Callable[[], None]) -> None:
        if self._ep is None or fd < 0:
            return
        self._ep.register(fd, 0)
        self._callbacks[fd] = callback

    def remove(self, fd: int) -> None:
        """Stop watching ``fd`` (before it is closed: its number may be reused)."""
        if self._callbacks.pop(fd, None) is not None and self._ep is not None:
            with contextlib.suppress(OSError):
                self._ep.unregister(fd)

    def _ready(self) -> None:
        assert self._ep is not None
        for fd, _events in self._ep.poll(0):
            callback = self._callbacks.get(fd)
            self.remove(fd)
            if callback is not None:
                callback()

    def close(self) -> None:
        ep, self._ep = self._ep, None
        if ep is not None:
            assert self._loop is not None
            self._loop.remove_reader(ep.fileno())
            ep.close()
        self._callbacks.clear()


def _fd_of(writer: asyncio.StreamWriter) -> int:
    sock = writer.get_extra_info("socket")
    return sock.fileno() if sock is not None else -1


async def serve_connection(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    handler: ControlHandler | object,
    *,
    max_in_flight: int = MAX_IN_FLIGHT,
    budget: InputBudget | None = None,
    hangups: HangupWatch | None = None,
) -> None:
    """Serve one client until it closes its side and its requests are answered.

    Each request runs as a child task (so one connection can ``wait`` and ask
    ``status`` at once). Handler errors become error responses; nothing a
    client sends or a handler raises ends the server except the connection's
    own failure. The writer is closed on return. Cancellation cancels the
    in-flight requests; so does the client hanging up (with ``hangups``), for
    the ops of :data:`CANCEL_ON_HANGUP`. The unfinished line is bounded by
    ``MAX_MESSAGE`` and charged to ``budget`` (a private one if None).
    """
    lock = asyncio.Lock()
    slots = asyncio.Semaphore(max_in_flight)
    peer_gone = False
    lines = LineBuffer(budget if budget is not None else InputBudget())
    cancellable: set[asyncio.Task[None]] = set()
    fd = _fd_of(writer) if hangups is not None else -1

    async def send(data: bytes) -> None:
        nonlocal peer_gone
        if peer_gone:
            return
        try:
            async with lock:
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError) as e:
            peer_gone = True
            log.debug("control: client went away: %s", e)

    async def handle(line: bytes) -> None:
        try:
            try:
                req = decode_request(line)
            except BadRequest as e:
                await send(encode_error(e.id, _refused(f"bad request: {e}")))
                return
            task = asyncio.current_task()
            if req.op in CANCEL_ON_HANGUP and task is not None:
                if peer_gone:
                    return  # nobody to answer: not worth starting
                cancellable.add(task)
                task.add_done_callback(cancellable.discard)
            await send(await _call(handler, req, send, gone, writer))
        finally:
            slots.release()

    def gone() -> bool:
        return peer_gone

    def hung_up() -> None:
        nonlocal peer_gone
        peer_gone = True
        if cancellable:
            log.debug("control: client hung up; cancelling %d request(s)", len(cancellable))
        for t in cancellable:
            t.cancel()

    async def read_loop(tg: asyncio.TaskGroup) -> None:
        while not peer_gone:
            try:
                data = await reader.read(_CHUNK)
            except (ConnectionError, OSError):
                return
            if not data:
                if lines.pending.strip():
                    msg = "bad request: line not terminated by a newline"
                    await send(encode_error(None, _refused(msg)))
                return
            complete, fatal = lines.feed(data)
            for line in complete:
                if not line.strip():
                    continue
                await slots.acquire()
                if gone():  # hung up while we waited for a slot
                    slots.release()
                    return
                tg.create_task(handle(line))
            if fatal is not None:
                await send(encode_error(None, _refused(f"bad request: {fatal}")))
                return

    if hangups is not None:
        hangups.add(fd, hung_up)
    try:
        async with asyncio.TaskGroup() as tg:
            await read_loop(tg)
            lines.release()
    finally:
        lines.release()
        if hangups is not None:
            hangups.remove(fd)
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


class ControlServer:
    """The daemon's listening socket: ``async with ControlServer(state_dir, handler):``.

    On start it creates ``state_dir`` (mode 0700; an existing one of ours is
    tightened to 0700), refuses to run if another daemon answers on
    ``control.sock``, removes a stale socket file and listens on a socket
    bound under umask 077 (owner-only from the start, then 0600). On close it stops listening,
    cancels the connections' requests, waits for them and removes the socket
    file.
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        handler: ControlHandler | object,
        *,
        max_connections: int = MAX_CONNECTIONS,
        max_unfinished: int = MAX_UNFINISHED,
    ) -> None:
        self.state_dir = Path(state_dir).expanduser().absolute()
        self.path = control_socket_path(self.state_dir)
        self.handler = handler
        self.max_connections = max_connections
        self.budget = InputBudget(max_unfinished)
        self._server: asyncio.Server | None = None
        #: (st_dev, st_ino) of the socket file this server made: aclose removes only that
        self._inode: tuple[int, int] | None = None
        self._hangups: HangupWatch | None = None
        self._conns: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Listen.

        Raises:
            ResourceError: another daemon serves this state directory.
            ConfigError: the socket path exists and is not a socket, or the
                directory cannot be created.
        """
        try:
            secure_state_dir(self.state_dir)
        except OSError as e:
            raise ConfigError(f"{self.state_dir}: cannot create state directory: {e}") from e
        await self._clear_stale()
        self._hangups = HangupWatch()
        # bind() creates the socket file with 0777 & ~umask, and a connect()
        # needs only write permission on it: a chmod after listen() alone left
        # a window in which anyone who could reach the directory connected.
        # Bound under umask 077 it is owner-only from its first moment; the
        # chmod then only drops the meaningless x bit. The umask is
        # process-wide: 077 for a moment only takes group and other bits from
        # what another thread might create meanwhile (never the owner's).
        old = os.umask(0o077)
        try:
            # The listen backlog holds every connection the daemon would
            # serve: with asyncio's default (100), a burst of clients while the
            # loop is busy overflows it, and a Unix-socket connect() to a full
            # backlog fails with EAGAIN, which asyncio's sock_connect takes for
            # "in progress" and then reports as connected (the client's first
            # recv gets EINVAL).
            self._server = await asyncio.start_unix_server(
                self._accept, path=str(self.path), limit=_CHUNK, backlog=self.max_connections + 16
            )
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        st = os.lstat(self.path)
        self._inode = (st.st_dev, st.st_ino)

    async def _clear_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"{self.path}: exists and is not a socket; remove it")
        try:
            _r, w = await asyncio.open_unix_connection(str(self.path))
        except (ConnectionRefusedError, FileNotFoundError):
            self.path.unlink(missing_ok=True)  # a dead daemon's socket
            return
        w.close()
        with contextlib.suppress(ConnectionError, OSError):
            await w.wait_closed()
        raise ResourceError(f"a mic-host daemon already serves {self.state_dir}")

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._conns) >= self.max_connections:
            log.warning("control: %d connections open: refusing one more", len(self._conns))
            msg = f"too many connections ({self.max_connections}); try again later"
            writer.write(encode_error(None, _refused(msg)))
            writer.close()  # flushes the error first
            return
        task = asyncio.get_running_loop().create_task(
            serve_connection(
                reader, writer, self.handler, budget=self.budget, hangups=self._hangups
            ),
            name="control-connection",
        )
        self._conns.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._conns.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("control: connection failed", exc_info=exc)

    async def aclose(self) -> None:
        """Stop listening, cancel and reap the connections, remove the socket file
        (if it is still the one this server made: a daemon started on the same
        path after the state directory was removed keeps its own)."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        conns = list(self._conns)
        for t in conns:
            t.cancel()
        if conns:
            await asyncio.gather(*conns, return_exceptions=True)
        if self._hangups is not None:
            self._hangups.close()
            self._hangups = None
        if server is not None:
            await server.wait_closed()
            with contextlib.suppress(OSError):
                st = os.lstat(self.path)
                if (st.st_dev, st.st_ino) == self._inode:  # not another daemon's
                    self.path.unlink()

    async def __aenter__(self) -> ControlServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
