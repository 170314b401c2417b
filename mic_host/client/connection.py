"""A connection to the mic-host daemon: :class:`Client` and :func:`connect`.

Owns the client end of the control socket (``STATE_DIR/control.sock``): one
connection, requests with their own ids answered in any order, error
responses re-raised as the ``virtio.errors`` class they name
(:class:`virtio.errors.WireError`), event and log streams on connections of
their own. The per-card API on top (:class:`CardClient`) is
:mod:`mic_host.client.card`, re-exported here.

Imports the control socket's codec (:mod:`mic_host.control.wire`),
``mic_host.paths``, ``mic_host.lifecycle`` (state names) and the client's own
lower modules (:mod:`~mic_host.client.console`, :mod:`~mic_host.client.accel`);
never the daemon side (card manager, VOP, backends, control server)::

    async with mic_host.connect(state_dir) as client:
        card = client.card("mic0")
        await card.wait("online", timeout=60)
        print(await card.stats())
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from mic_host.client.card import CardClient
from mic_host.client.events import EventStream, LogStream, StreamQueue
from mic_host.control.wire import MAX_MESSAGE, StreamLine, decode_line, encode_request
from mic_host.paths import SOCKET_NAME, control_socket_path, resolve_state_dir
from virtio.errors import (
    BrokenResourceError,
    ClosedResourceError,
    MicError,
    RemoteProtocolError,
)

if TYPE_CHECKING:
    pass

__all__ = ["CardClient", "Client", "connect", "open_connection"]

log = logging.getLogger(__name__)

_run_tags = itertools.count(1)
#: ids of abandoned requests remembered (their late answers are dropped quietly)
_ABANDONED = 1024


class Client:
    """One connection to a daemon. Requests may run concurrently; each gets its own id.

    Use :func:`connect` or :func:`launch` rather than the constructor.
    """

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state_dir: Path
    ) -> None:
        self.state_dir = state_dir
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        #: streaming requests (``events``, ``logs``): their items, ends and late errors
        self._streams: dict[int, StreamQueue] = {}
        self._lost: MicError | None = None
        self._closed = False
        self._write_lock = asyncio.Lock()
        #: requests the caller gave up on (cancelled): their answers are not news
        self._abandoned: dict[int, None] = {}
        self._task = asyncio.get_running_loop().create_task(
            self._read_loop(), name="mic-host-client-reader"
        )

    # -- plumbing

    async def _read_loop(self) -> None:
        why: MicError = BrokenResourceError("connection to the mic-host daemon stopped")
        try:
            while True:
                try:
                    line = await self._reader.readuntil(b"\n")
                except asyncio.IncompleteReadError:
                    why = BrokenResourceError(
                        f"the mic-host daemon at {self.state_dir} closed the connection"
                    )
                    break
                except asyncio.LimitOverrunError:
                    why = RemoteProtocolError(
                        f"daemon sent a line over the {MAX_MESSAGE}-byte bound", reason="too-long"
                    )
                    break
                except OSError as e:
                    why = BrokenResourceError(f"connection to the mic-host daemon lost: {e}")
                    break
                try:
                    resp = decode_line(line)
                except RemoteProtocolError as e:
                    why = e
                    break
                if isinstance(resp, StreamLine):
                    sq = self._streams.get(resp.id)
                    if sq is not None:
                        await sq.put(resp)  # a full queue stops reading: back-pressure
                    continue
                fut = self._pending.pop(resp.id, None) if resp.id is not None else None
                if fut is None and resp.id in self._streams and resp.error is not None:
                    await self._streams[resp.id].put(resp.error.exception(reason="daemon"))
                    continue
                if fut is None:
                    if resp.id in self._abandoned:
                        del self._abandoned[resp.id]
                        continue
                    if resp.error is not None:
                        log.warning("mic-host daemon: %s: %s", resp.error.type, resp.error.message)
                    continue
                if not fut.done():
                    try:
                        fut.set_result(resp.unwrap())
                    except MicError as e:
                        fut.set_exception(e)
        finally:
            if self._closed:
                why = ClosedResourceError("client closed")
            self._fail_pending(why)

    def _fail_pending(self, why: MicError) -> None:
        self._lost = why
        for sq in self._streams.values():
            sq.fail(why)
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(why)

    async def open_stream(
        self, op: str, card: str | None = None, **args: Any
    ) -> tuple[dict[str, Any], StreamQueue]:
        """Send a streaming request (``events``, ``logs``); its first result and
        the queue its items arrive on. The stream lasts as long as the
        connection: give it a connection of its own (:meth:`events` does).

        Raises:
            as :meth:`request`.
        """
        sq = StreamQueue()
        rid = next(self._ids)
        self._streams[rid] = sq
        try:
            return await self.request(op, card, _id=rid, **args), sq
        except BaseException:
            self._streams.pop(rid, None)
            raise

    def events(
        self,
        card: str | None = None,
        kinds: list[str] | None = None,
        *,
        buffer: int | None = None,
    ) -> EventStream:
        """The daemon's events (of ``card``, of ``kinds``: names or categories), as
        ``async for ev in client.events(): ...`` or, to be sure to see what you
        do next, ``async with client.events() as evs: await card.boot(); async
        for ev in evs: ...`` (the subscription is in place when ``async with``
        returns). Each :class:`~mic_host.events.Event` has ``kind``, ``card``,
        ``data``, ``wall``, ``mono``, ``seq``. Runs on a connection of its own.
        ``buffer``: events the daemon holds for a slow reader (then it drops the
        oldest and sends ``events_lost``).
        """
        args: dict[str, Any] = {"kinds": list(kinds or [])}
        if buffer is not None:
            args["buffer"] = buffer
        return EventStream(lambda: open_connection(self.state_dir), card, args)

    def logs(
        self,
        card: str,
        *,
        source: str = "all",
        lines: int = 50,
        follow: bool = False,
        device: str | None = None,
    ) -> LogStream:
        """A card's logs (:meth:`CardClient.logs`), on a connection of its own."""
        args = {"source": source, "lines": lines, "follow": follow, "device": device}
        return LogStream(lambda: open_connection(self.state_dir), card, args)

    async def request(self, op: str, card: str | None = None, **args: Any) -> dict[str, Any]:
        """Send one request and wait for its result.

        Raises:
            LocalProtocolError: a bad op or argument (checked before sending).
            MicError subclasses: the daemon's error, as the class it names.
            BrokenResourceError: the connection was lost.
            ClosedResourceError: the client was closed.
        """
        if self._closed:
            raise ClosedResourceError("client closed")
        if self._lost is not None:
            raise BrokenResourceError(f"connection to the mic-host daemon lost: {self._lost}")
        rid = args.pop("_id", None) or next(self._ids)
        data = encode_request(rid, op, card, **args)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            async with self._write_lock:
                self._writer.write(data)
                await self._writer.drain()
        except OSError as e:
            self._pending.pop(rid, None)
            lost = BrokenResourceError(f"connection to the mic-host daemon lost: {e}")
            self._fail_pending(lost)
            raise lost from e
        try:
            return await fut
        finally:
            self._pending.pop(rid, None)
            if not fut.done():
                self._abandon(rid)

    def _abandon(self, rid: int) -> None:
        self._abandoned[rid] = None
        if len(self._abandoned) > _ABANDONED:
            del self._abandoned[next(iter(self._abandoned))]

    def send_nowait(self, op: str, card: str | None = None, **args: Any) -> None:
        """Send one request without waiting for (or reading) its answer; usable
        while the calling task is being cancelled. Errors are dropped: best effort."""
        if self._closed or self._lost is not None:
            return
        rid = next(self._ids)
        try:
            data = encode_request(rid, op, card, **args)
            self._writer.write(data)
        except (MicError, OSError, RuntimeError) as e:
            log.debug("send_nowait %s: %s", op, e)
            return
        self._abandon(rid)

    async def aclose(self) -> None:
        """Close the connection; pending requests fail with ClosedResourceError."""
        if self._closed:
            return
        self._closed = True
        self._writer.close()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def lost(self) -> bool:
        """The connection is gone (daemon exited, or it broke the protocol)."""
        return self._lost is not None and not self._closed

    # -- daemon-wide operations

    async def ping(self) -> dict[str, Any]:
        """``{"pid": int, "version": int, ...}`` of the daemon."""
        return await self.request("ping")

    async def status(self, card: str | None = None) -> dict[str, Any]:
        """``{"cards": [card status, ...], ...}`` for every card, or only ``card``."""
        return await self.request("status", card)

    async def suspend(self) -> dict[str, Any]:
        """Host PM suspend: the daemon stops every card (COSM ``cosm_stop``)."""
        return await self.request("suspend")

    async def resume(self) -> dict[str, Any]:
        """Host PM resume: the daemon boots again the cards suspend stopped."""
        return await self.request("resume")

    async def vhost_user_export(self, socket: str, switch: str, mtu: int = 1500) -> dict[str, Any]:
        """Serve a vhost-user net socket (absolute path) on the daemon's switch
        ``switch``: a QEMU guest's ``-netdev vhost-user`` then shares it with cards."""
        return await self.request("vhost_user_export", socket=socket, switch=switch, mtu=mtu)

    async def vhost_user_unexport(self, socket: str) -> dict[str, Any]:
        """Stop serving an exported vhost-user socket (its guest loses the link)."""
        return await self.request("vhost_user_unexport", socket=socket)

    async def vhost_user_exports(self) -> dict[str, Any]:
        """``{"exports": [{socket, switch, port, connected, counters, ...}, ...]}``."""
        return await self.request("vhost_user_exports")

    def card(self, name: str) -> CardClient:
        """A handle on one card (no request is made)."""
        return CardClient(self, name)


# ------------------------------------------------------------------ connect


async def open_connection(state_dir: Path) -> Client:
    """A :class:`Client` connected to the daemon of ``state_dir`` (close it with ``aclose``).

    Raises:
        BrokenResourceError: no daemon there, or it refuses connections.
        ConfigError: the socket path is too long.
    """
    path = control_socket_path(state_dir)
    if not path.exists():
        raise BrokenResourceError(f"no mic-host daemon at {state_dir} ({SOCKET_NAME} missing)")
    try:
        reader, writer = await asyncio.open_unix_connection(str(path), limit=MAX_MESSAGE + 1)
    except ConnectionRefusedError as e:
        raise BrokenResourceError(
            f"no mic-host daemon at {state_dir} ({SOCKET_NAME} refuses connections; "
            "a daemon that died?)"
        ) from e
    except FileNotFoundError as e:
        raise BrokenResourceError(
            f"no mic-host daemon at {state_dir} ({SOCKET_NAME} missing)"
        ) from e
    except OSError as e:
        raise BrokenResourceError(f"cannot connect to {path}: {e}") from e
    return Client(reader, writer, state_dir)


@asynccontextmanager
async def connect(
    state_dir: str | os.PathLike[str] | None = None,
) -> AsyncIterator[Client]:
    """Connect to the daemon serving ``state_dir`` (default: ``$MIC_STATE_DIR``, then the
    per-user default of :func:`mic_host.paths.default_state_dir`).

    Raises:
        BrokenResourceError: no daemon there ("no mic-host daemon at DIR
            (control.sock missing)"), or it refuses connections.
        ConfigError: the socket path is too long.
    """
    client = await open_connection(resolve_state_dir(state_dir).absolute())
    try:
        yield client
    finally:
        await client.aclose()
