"""Streams from the daemon on the client side: events (``client.events()``) and logs.

A stream (the ``events`` or ``logs`` op, docs/cli.md) runs on a connection of
its own, so ending it is closing that connection. Items wait in a small
bounded queue (:class:`StreamQueue`); when the reader is slower than the
daemon, the connection's reading pauses, and the daemon, not this process,
holds the backlog (it keeps the newest and says how many it dropped: an
``events_lost`` event, a ``{"source": "host", "lost": N}`` log item).

- :class:`EventStream`: ``async for ev in client.events(): ...``, or
  ``async with client.events(card="mic0") as evs:`` (subscribed when the
  ``async with`` returns) and ``await evs.wait_for("online", timeout=30)``,
  which returns the first matching event after the last one it returned,
  keeping what it passed over in :attr:`EventStream.seen`.
- :class:`LogStream`: the items of ``micctl logs``.

Part of the client library: imports the events vocabulary
(:mod:`mic_host.events`) and the wire codec's stream line; the connection is
passed in (a factory), so this module never imports
:mod:`~mic_host.client.connection` (which imports it).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any, Protocol, Self

from mic_host.control.wire import StreamLine
from mic_host.events import Event
from virtio.errors import MicError, MicTimeoutError, RemoteProtocolError

__all__ = ["EventStream", "LogStream", "StreamQueue"]

#: Items a client holds per stream before it stops reading the connection.
QUEUE = 64


class StreamQueue:
    """The items, end and late error of one streaming request (bounded)."""

    def __init__(self, maxsize: int = QUEUE) -> None:
        self._q: asyncio.Queue[StreamLine | MicError] = asyncio.Queue(maxsize)

    async def put(self, x: StreamLine | MicError) -> None:
        await self._q.put(x)

    def fail(self, why: MicError) -> None:
        """The connection is gone: the reader gets ``why`` (after what it has, if room)."""
        if self._q.full():
            self._q.get_nowait()
        self._q.put_nowait(why)

    async def get(self) -> StreamLine | MicError:
        return await self._q.get()


class _Connection(Protocol):
    async def open_stream(
        self, op: str, card: str | None = None, **args: Any
    ) -> tuple[dict[str, Any], StreamQueue]: ...

    async def aclose(self) -> None: ...


class _ItemStream:
    """One streaming request on its own connection (opened on first use)."""

    op = ""

    def __init__(
        self,
        connect: Callable[[], Awaitable[_Connection]],
        card: str | None,
        args: dict[str, Any],
    ) -> None:
        self._connect = connect
        self.card = card
        self._args = args
        self._conn: _Connection | None = None
        self._q: StreamQueue | None = None
        self._managed = False
        #: the daemon's first answer, and its last (None until the stream ended)
        self.info: dict[str, Any] | None = None
        self.end: dict[str, Any] | None = None

    async def open(self) -> None:
        """Connect and send the request; returns when the daemon has set the stream up.

        Raises:
            BrokenResourceError: no daemon; LocalProtocolError: a bad argument, an unknown card.
        """
        if self._conn is not None:
            return
        conn = await self._connect()
        try:
            self.info, self._q = await conn.open_stream(self.op, self.card, **self._args)
        except BaseException:
            await conn.aclose()
            raise
        self._conn = conn

    async def next_item(self) -> dict[str, Any] | None:
        """The next item, or None once the stream has ended.

        Raises:
            BrokenResourceError: the daemon went away; MicError: its error.
        """
        await self.open()
        if self._q is None or self.end is not None:
            return None
        x = await self._q.get()
        if isinstance(x, MicError):
            raise x
        if x.end is not None:
            self.end = x.end
            return None
        return x.item

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.aclose()

    async def __aenter__(self) -> Self:
        self._managed = True
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class EventStream(_ItemStream):
    """The daemon's events (see the module docstring); made by ``client.events()``."""

    op = "events"

    def __init__(
        self,
        connect: Callable[[], Awaitable[_Connection]],
        card: str | None,
        args: dict[str, Any],
    ) -> None:
        super().__init__(connect, card, args)
        #: every event :meth:`wait_for` has read, in order
        self.seen: list[Event] = []
        self._cursor = 0

    async def next_event(self) -> Event | None:
        """The next event, or None once the stream has ended.

        Raises:
            RemoteProtocolError: the daemon sent something that is not an event.
        """
        item = await self.next_item()
        if item is None:
            return None
        try:
            return Event.from_wire(item)
        except ValueError as e:
            raise RemoteProtocolError(str(e), reason="daemon") from e

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        try:
            while (ev := await self.next_event()) is not None:
                yield ev
        finally:
            if not self._managed:  # `async for` alone: leaving the loop ends the stream
                await self.aclose()

    async def wait_for(
        self, kind: str, card: str | None = None, *, timeout: float = 30.0, **data: Any
    ) -> Event:
        """The first event after the one this last returned whose ``kind`` (or
        category) is ``kind``, for ``card`` if given, whose ``data`` has the
        given values: ``await evs.wait_for("link_down", "mic0", name="net0")``.

        Raises:
            MicTimeoutError: none within ``timeout`` seconds (the message lists
                the last events seen).
            BrokenResourceError: the stream ended (the daemon went away).
        """

        def match(ev: Event) -> bool:
            return (
                kind in (ev.kind, ev.category)
                and (card is None or ev.card == card)
                and all(ev.data.get(k) == v for k, v in data.items())
            )

        try:
            async with asyncio.timeout(timeout):
                while True:
                    for i in range(self._cursor, len(self.seen)):
                        if match(self.seen[i]):
                            self._cursor = i + 1
                            return self.seen[i]
                    self._cursor = len(self.seen)
                    ev = await self.next_event()
                    if ev is None:
                        raise MicError(f"the event stream ended while waiting for {kind}")
                    self.seen.append(ev)
        except TimeoutError:
            recent = ", ".join(f"{e.card or '-'} {e.kind}" for e in self.seen[-8:]) or "none"
            where = f" of {card}" if card else ""
            raise MicTimeoutError(
                f"no {kind} event{where} within {timeout}s (last seen: {recent})"
            ) from None


class LogStream(_ItemStream):
    """``micctl logs`` items (dicts); made by ``card.logs()``."""

    op = "logs"

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[dict[str, Any]]:
        try:
            while (item := await self.next_item()) is not None:
                yield item
        finally:
            if not self._managed:
                await self.aclose()
