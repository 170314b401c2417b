"""A connection to the mic-host daemon: :class:`Client`, :class:`CardClient`, :func:`connect`.

Owns the client end of the control socket (``STATE_DIR/control.sock``): one
connection, requests with their own ids answered in any order, error
responses re-raised as the ``virtio.errors`` class they name
(:class:`virtio.errors.WireError`), and the per-card API on top (lifecycle,
devices, apps, shell commands, consoles, accelerator channels).

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
import base64
import contextlib
import itertools
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from mic_host.client.console import ConsoleStream, ExecResult, find_console
from mic_host.client.events import EventStream, LogStream, StreamQueue
from mic_host.control.wire import MAX_MESSAGE, StreamLine, decode_line, encode_request
from mic_host.lifecycle import CardState
from mic_host.paths import SOCKET_NAME, control_socket_path, resolve_state_dir
from virtio.agent import MAX_STDIN
from virtio.errors import (
    BrokenResourceError,
    ClosedResourceError,
    LocalProtocolError,
    MicError,
    RemoteProtocolError,
)

if TYPE_CHECKING:
    from mic_host.client.accel import OffloadPool, OffloadSession

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

    def card(self, name: str) -> CardClient:
        """A handle on one card (no request is made)."""
        return CardClient(self, name)


class CardClient:
    """Operations on one card through a :class:`Client`."""

    __slots__ = ("client", "name")

    def __init__(self, client: Client, name: str) -> None:
        self.client = client
        self.name = name

    def __repr__(self) -> str:
        return f"<CardClient {self.name}>"

    async def status(self) -> dict[str, Any]:
        """This card's status: ``{"name", "state", "shutdown_status", "pid", "devices", ...}``."""
        res = await self.client.request("status", self.name)
        cards = res.get("cards")
        if isinstance(cards, list) and len(cards) == 1 and isinstance(cards[0], dict):
            return cards[0]
        return res

    async def state(self) -> CardState:
        """This card's lifecycle state."""
        return CardState((await self.status())["state"])

    async def boot(self, wait: bool = True, timeout: float | None = None) -> dict[str, Any]:
        """Boot (ready -> booting); with ``wait``, until online. ``timeout=None``: the card's."""
        return await self.client.request("boot", self.name, wait=wait, timeout=timeout)

    async def shutdown(self, wait: bool = True, timeout: float | None = None) -> dict[str, Any]:
        """Shut down (online -> shutting_down); with ``wait``, until ready."""
        return await self.client.request("shutdown", self.name, wait=wait, timeout=timeout)

    async def reset(self) -> dict[str, Any]:
        """Reset (any state but ready -> resetting -> ready or reset_failed)."""
        return await self.client.request("reset", self.name)

    async def wait(self, state: str | CardState, timeout: float | None = None) -> dict[str, Any]:
        """Wait until the card is in ``state``.

        Raises:
            LocalProtocolError: ``state`` is not a card state.
            MicTimeoutError: not reached within ``timeout`` (the daemon's bound if None).
        """
        try:
            wanted = CardState(state)
        except ValueError:
            states = ", ".join(s.value for s in CardState)
            raise LocalProtocolError(f"unknown card state {state!r} (states: {states})") from None
        return await self.client.request("wait", self.name, state=wanted.value, timeout=timeout)

    async def attach(self, type: str, **options: Any) -> dict[str, Any]:  # noqa: A002
        """Hot-add a device; returns ``{"device": "vdb", ...}``."""
        return await self.client.request("attach", self.name, type=type, options=options)

    async def attach_block(
        self,
        path: str | os.PathLike[str],
        *,
        size: int | str | None = None,
        create: bool = False,
        read_only: bool = False,
        serial: str | None = None,
        **options: Any,
    ) -> str | None:
        """Hot-add a virtio-blk disk backed by the raw image ``path``; returns the
        card's device name (``"vdb"``), or None if the card is not running (the
        disk is then kept for its next boot).

        ``size`` (bytes or ``"64M"``) is the size of an image ``create`` makes
        when ``path`` is missing; ``options`` are further block options
        (``num_queues``, ``queue_size``, ``blk_size``, ``discard``, ``name``).
        A relative ``path`` is taken from the daemon's state directory.

        Raises:
            ConfigError: bad options (missing image without ``create``, bad size...).
            LocalProtocolError: the name is taken or the device page is full.
            MicTimeoutError: the card did not bind the disk in time.
        """
        opts: dict[str, Any] = {"image": os.fspath(path), **options}
        if size is not None:
            opts["size"] = size
        if create:
            opts["create"] = True
        if read_only:
            opts["read_only"] = True
        if serial is not None:
            opts["serial"] = serial
        res = await self.attach("block", **opts)
        dev = res.get("device")
        return dev if isinstance(dev, str) else None

    async def detach(self, device: str) -> dict[str, Any]:
        """Hot-remove a device by its card device name or its label."""
        return await self.client.request("detach", self.name, device=device)

    async def stats(self) -> dict[str, Any]:
        """Counters: per device (``doorbells``: the card rings one per device), per
        queue (``wakeups``, ``chains``, ``buffers``, ``interrupts``, ``bytes``,
        ``errors``) and the backend's own (``backend``: block ``io_errors``...)."""
        return await self.client.request("stats", self.name)

    async def net(self, device: str | None = None, *, link: bool | None = None) -> dict[str, Any]:
        """The card's net devices (``micctl net``): ``{"card", "devices": [...]}``, each
        with backend, host interface, host/card addresses, namespaces, link, counters.
        ``link=True/False`` first sets the link status (a config change the card sees).
        """
        args: dict[str, Any] = {"device": device}
        if link is not None:
            args["link"] = "up" if link else "down"
        return await self.client.request("net", self.name, **args)

    async def devices(self) -> list[dict[str, Any]]:
        """The card's virtio devices (``micctl devices``), one dict each: ``device``
        (the card's name, ``vda``), ``name`` (host name), ``type``, ``type_id``,
        ``driver`` (the bound driver's registered name, None without one),
        ``state`` (``live``, ``failed``, ``unbound``, ``claimed``...), ``error``
        (why a probe failed), ``holder`` (the app holding a claim).
        An online card is asked for its current list.

        Raises:
            LocalProtocolError: no such card.
            MicTimeoutError: the card did not answer.
        """
        res = await self.client.request("devices", self.name)
        rows = res.get("devices")
        return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []

    async def run(
        self, app: str, *args: Any, timeout: float | None = None, cwd: str | None = None
    ) -> dict[str, Any]:
        """Run a card app ``async def main(card, *args)`` with JSON ``args``; returns
        ``{"card", "app", "value"}`` (bytes come back as hex).

        ``app`` is ``module:function`` (found as ``python -m`` would from ``cwd``,
        default the current folder, then ``sys.path``) or ``path/to/file.py:function``;
        its code is sent with the run and loaded fresh on the card
        (:mod:`mic_host.client.apps`). Cancelling this call cancels the app on
        the card; so does ``timeout`` (seconds).

        Raises:
            LocalProtocolError: no such module/file, or the card is not online.
            AppCodeTooLarge: the app's code is over the size a run may send.
            AppError: the app raised (``e.traceback`` is the card-side traceback),
                or failed to import; or it returned a value that is not JSON.
            MicError: the app was cancelled on the card (``micctl kill``).
            MicTimeoutError: ``timeout`` passed (the app was cancelled).
        """
        from mic_host.client.apps import app_error, resolve_app

        resolved = resolve_app(app, cwd=cwd)
        tag = f"client-{os.getpid()}-{next(_run_tags)}"
        request: dict[str, Any] = {"app": resolved.app, "args": list(args), "tag": tag}
        if resolved.code is not None:
            request["code"] = resolved.code.to_wire()
        if timeout is not None:
            request["timeout"] = timeout
        try:
            return await self.client.request("run", self.name, **request)
        except asyncio.CancelledError:
            self.client.send_nowait("kill", self.name, tag=tag)  # cancel it on the card
            raise
        except RemoteProtocolError as e:
            raise app_error(e, resolved.app, self.name) from None

    async def apps(self) -> list[dict[str, Any]]:
        """The apps running on the card: ``[{"id", "app", "tag", "started", "elapsed"}]``
        (``started`` in seconds of card uptime)."""
        res = await self.client.request("apps", self.name)
        apps = res.get("apps")
        return apps if isinstance(apps, list) else []

    async def kill(self, app_id: int) -> list[dict[str, Any]]:
        """Cancel the app ``app_id`` (see :meth:`apps`) on the card; its run reports
        cancelled. Returns what was cancelled.

        Raises:
            LocalProtocolError: no such app running.
        """
        res = await self.client.request("kill", self.name, app_id=app_id)
        killed = res.get("killed")
        return killed if isinstance(killed, list) else []

    @asynccontextmanager
    async def accel_session(self, alg: str, **spec: Any) -> AsyncIterator[OffloadSession]:
        """A channel to the card's accelerators: ``out = await s.do(data)``.

        The data travels through card RAM and the card's engine workers serve
        it in place (:mod:`mic_host.client.accel`, docs/accel.md). ``spec``: ``op``,
        ``level``, ``key``, ``iv``, ``out_size``, ``heap_size``, ``policy``.

        Raises:
            BrokenResourceError: the card is not online; ResourceError: its
            accelerator is busy; LocalProtocolError: a bad spec.
        """
        from mic_host.client.accel import open_session

        s = await open_session(self.client.state_dir, self.name, alg, **spec)
        try:
            yield s
        finally:
            await s.aclose()

    @asynccontextmanager
    async def accel_pool(
        self, alg: str, channels: int = 2, **spec: Any
    ) -> AsyncIterator[OffloadPool]:
        """``channels`` accelerator channels (one card engine each) used together:
        ``outs = await p.do_many(items)`` runs the shares in parallel. As
        :meth:`accel_session` otherwise."""
        from mic_host.client.accel import open_pool

        p = await open_pool(self.client.state_dir, self.name, alg, channels=channels, **spec)
        try:
            yield p
        finally:
            await p.aclose()

    async def exec(
        self,
        *argv: str,
        line: str | None = None,
        timeout: float | None = None,
        max_output: int | None = None,
        stdin: bytes | None = None,
    ) -> ExecResult:
        """Run a shell command on the card through its agent:
        ``out, err, status = await card.exec("sha256sum", "/dev/vda")``.

        ``argv`` or a command ``line`` for the card shell (redirection, pipes,
        ``;``, ``&&``, ``||``); ``stdin`` (at most :data:`virtio.agent.MAX_STDIN`
        bytes) is the command's standard input. The card stops the command after
        ``timeout`` s (default 30; status 124).

        Raises:
            LocalProtocolError: card not online, no agent port, or ``stdin`` too large.
            MicTimeoutError: the agent did not answer.
        """
        args: dict[str, Any] = {
            "argv": list(argv) if line is None else None,
            "line": line,
            "timeout": timeout,
        }
        if max_output is not None:
            args["max_output"] = max_output
        if stdin is not None:
            if len(stdin) > MAX_STDIN:
                raise LocalProtocolError(
                    f"exec: stdin of {len(stdin)} bytes is over the {MAX_STDIN}-byte bound"
                )
            args["stdin"] = base64.b64encode(stdin).decode()
        return ExecResult.from_result(await self.client.request("exec", self.name, **args))

    async def console_path(self, device: str | None = None) -> str:
        """The pty path of the card's console (the first one, or ``device``).

        Raises:
            LocalProtocolError: the card has no such console.
        """
        return find_console(await self.status(), self.name, device)

    @asynccontextmanager
    async def console(self, device: str | None = None) -> AsyncIterator[ConsoleStream]:
        """``async with card.console() as con:`` a stream over the console's pty
        (``write``, ``read_until``, ``command``); see :class:`mic_host.client.ConsoleStream`.

        Raises:
            LocalProtocolError: the card has no such console.
            BrokenResourceError: the pty cannot be opened.
        """
        stream = await ConsoleStream.open(await self.console_path(device))
        try:
            yield stream
        finally:
            await stream.aclose()

    async def console_resize(self, cols: int, rows: int, device: str | None = None) -> None:
        """Set the console's window size (the card gets VIRTIO_CONSOLE_RESIZE)."""
        await self.client.request("console_resize", self.name, cols=cols, rows=rows, device=device)

    async def reboot(self, wait: bool = True, timeout: float | None = None) -> dict[str, Any]:
        """Bring the card down and boot it again, as ``micctrl --reboot``: an online
        card is shut down, a booting, crashed or reset_failed one reset, a
        shutting_down or resetting one waited for; then it boots (with ``wait``,
        until online). ``timeout`` bounds each step (None: the card's bounds).

        Raises:
            LocalProtocolError: the card cannot be rebooted (e.g. it was suspended).
            MicTimeoutError: a step did not finish in time.
        """
        state = await self.state()
        if state is CardState.ONLINE:
            await self.shutdown(wait=True, timeout=timeout)
        elif state in (CardState.BOOTING, CardState.CRASHED, CardState.RESET_FAILED):
            await self.reset()
        if state is not CardState.READY:
            await self.wait(CardState.READY, timeout=timeout)
        return await self.boot(wait=wait, timeout=timeout)

    def events(self, kinds: list[str] | None = None, *, buffer: int | None = None) -> EventStream:
        """This card's events (and the daemon's own): :meth:`Client.events`."""
        return self.client.events(self.name, kinds, buffer=buffer)

    def logs(
        self,
        *,
        source: str = "all",
        lines: int = 50,
        follow: bool = False,
        device: str | None = None,
    ) -> LogStream:
        """``micctl logs``: the card's console log (``source="console"``), the daemon's
        log lines about it (``"host"``) or both: the last ``lines`` of each, then
        with ``follow`` new ones until the card goes down. Yields dicts:
        ``{"source": "console", "text": ...}`` or ``{"source": "host", "level",
        "line"}`` (``{"source": "host", "lost": N}`` if a slow reader lost lines).
        Use as ``async with card.logs(follow=True) as logs: async for item in logs``.
        """
        args = {"source": source, "lines": lines, "follow": follow, "device": device}
        return LogStream(lambda: open_connection(self.client.state_dir), self.name, args)


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
