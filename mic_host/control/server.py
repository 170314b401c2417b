"""The control socket's server: accept clients, serve their requests, answer.

Owns the asyncio side of the control socket: :class:`ControlServer` (the
listening socket in the state directory, one per daemon), :func:`serve_connection`
(one client: requests served concurrently, answers in any order) and the
:class:`ControlHandler` seam the daemon implements (one method per op of
:data:`~mic_host.control.wire.OPS`). What travels is the codec's
(:mod:`mic_host.control.wire`); a handler's exception travels as
:class:`virtio.errors.WireError`. Imports asyncio, the codec, ``mic_host.paths``
and ``virtio.errors``; never the card manager or the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from mic_host.control.wire import (
    MAX_MESSAGE,
    BadRequest,
    Request,
    decode_request,
    encode_error,
    encode_response,
)
from mic_host.paths import control_socket_path
from virtio.errors import INTERNAL_ERROR, ConfigError, ResourceError, WireError

__all__ = ["MAX_IN_FLIGHT", "ControlHandler", "ControlServer", "serve_connection"]

log = logging.getLogger(__name__)

#: Requests served at once per connection; reading pauses beyond (back-pressure).
MAX_IN_FLIGHT = 64


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
    async def run(self, card: str, app: str, args: list[Any]) -> dict[str, Any]: ...
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


def _refused(message: str) -> WireError:
    """A request this server refuses: the client's fault (``LocalProtocolError`` to it)."""
    return WireError("LocalProtocolError", "LocalProtocolError", message)


def _internal(message: str) -> WireError:
    return WireError(INTERNAL_ERROR, INTERNAL_ERROR, message)


async def _call(handler: object, req: Request) -> bytes:
    method = getattr(handler, req.op, None)
    if method is None:
        return encode_error(req.id, _refused(f"op {req.op!r} is not supported by this daemon"))
    try:
        result = await method(**req.handler_kwargs())
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
        return encode_response(req.id, result)
    except (TypeError, ValueError) as e:
        log.error("control: %s result cannot be sent: %s", req.op, e)
        return encode_error(req.id, _internal(f"internal error in {req.op}: {e}"))


async def serve_connection(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    handler: ControlHandler | object,
    *,
    max_in_flight: int = MAX_IN_FLIGHT,
) -> None:
    """Serve one client until it closes its side and its requests are answered.

    Each request runs as a child task (so one connection can ``wait`` and ask
    ``status`` at once). Handler errors become error responses; nothing a
    client sends or a handler raises ends the server except the connection's
    own failure. The writer is closed on return. Cancellation cancels the
    in-flight requests.
    """
    lock = asyncio.Lock()
    slots = asyncio.Semaphore(max_in_flight)
    peer_gone = False

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
            await send(await _call(handler, req))
        finally:
            slots.release()

    try:
        async with asyncio.TaskGroup() as tg:
            while not peer_gone:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError as e:
                    if e.partial.strip():
                        msg = "bad request: line not terminated by a newline"
                        await send(encode_error(None, _refused(msg)))
                    break
                except asyncio.LimitOverrunError:
                    msg = f"bad request: line exceeds the {MAX_MESSAGE}-byte bound; closing"
                    await send(encode_error(None, _refused(msg)))
                    break
                except (ConnectionError, OSError):
                    break
                if not line.strip():
                    continue
                await slots.acquire()
                tg.create_task(handle(line))
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


class ControlServer:
    """The daemon's listening socket: ``async with ControlServer(state_dir, handler):``.

    On start it creates ``state_dir`` (mode 0700), refuses to run if another
    daemon answers on ``control.sock``, removes a stale socket file, listens,
    and makes the socket 0600. On close it stops listening, cancels the
    connections' requests, waits for them and removes the socket file.
    """

    def __init__(self, state_dir: str | os.PathLike[str], handler: ControlHandler | object) -> None:
        self.state_dir = Path(state_dir).expanduser().absolute()
        self.path = control_socket_path(self.state_dir)
        self.handler = handler
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Listen.

        Raises:
            ResourceError: another daemon serves this state directory.
            ConfigError: the socket path exists and is not a socket, or the
                directory cannot be created.
        """
        try:
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"{self.state_dir}: cannot create state directory: {e}") from e
        await self._clear_stale()
        self._server = await asyncio.start_unix_server(
            self._accept, path=str(self.path), limit=MAX_MESSAGE + 1
        )
        os.chmod(self.path, 0o600)

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
        task = asyncio.get_running_loop().create_task(
            serve_connection(reader, writer, self.handler), name="control-connection"
        )
        self._conns.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._conns.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("control: connection failed", exc_info=exc)

    async def aclose(self) -> None:
        """Stop listening, cancel and reap the connections, remove the socket file."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        conns = list(self._conns)
        for t in conns:
            t.cancel()
        if conns:
            await asyncio.gather(*conns, return_exceptions=True)
        if server is not None:
            await server.wait_closed()
            with contextlib.suppress(OSError):
                self.path.unlink(missing_ok=True)

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
