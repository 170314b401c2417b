"""One card through a daemon connection: :class:`CardClient`.

The per-card API of the client library: lifecycle, devices, card apps, shell
commands, consoles, accelerator channels, events and logs. It talks through
any :class:`ControlClient` (a :class:`~mic_host.client.connection.Client`,
which hands these out with ``client.card("mic0")``), so this module never
imports the connection; the connection imports it.

Imports ``mic_host.lifecycle`` (state names), ``virtio`` and the client's lower
modules (apps, console, events, accel); never the daemon side.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from mic_host.client.console import ConsoleStream, ExecResult, find_console
from mic_host.client.events import EventStream, LogStream
from mic_host.lifecycle import CardState
from virtio.agent import MAX_STDIN
from virtio.errors import LocalProtocolError, RemoteProtocolError

if TYPE_CHECKING:
    from mic_host.client.accel import OffloadPool, OffloadSession

__all__ = ["CardClient", "ControlClient"]

_run_tags = itertools.count(1)


class ControlClient(Protocol):
    """What a :class:`CardClient` needs of its connection (the daemon's control socket)."""

    state_dir: Path

    async def request(self, op: str, card: str | None = None, **args: Any) -> dict[str, Any]: ...

    def send_nowait(self, op: str, card: str | None = None, **args: Any) -> None: ...

    def events(
        self, card: str | None = None, kinds: list[str] | None = None, *, buffer: int | None = None
    ) -> EventStream: ...

    def logs(
        self,
        card: str,
        *,
        source: str = "all",
        lines: int = 50,
        follow: bool = False,
        device: str | None = None,
    ) -> LogStream: ...


class CardClient:
    """Operations on one card through a :class:`~mic_host.client.connection.Client`."""

    __slots__ = ("client", "name")

    def __init__(self, client: ControlClient, name: str) -> None:
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
        (``num_queues``, ``queue_size``, ``blk_size``, ``discard``, ``name``,
        ``data_path="cpu"|"dma"|"auto"``, ``dma_threshold``).
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
        return self.client.logs(self.name, source=source, lines=lines, follow=follow, device=device)
