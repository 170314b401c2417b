"""The public operations on one card of the daemon (what ``micctl`` and the client reach).

Owns everything per card that lives longer than a boot: its config, the
devices attached at run time, the consoles' ptys, the lifecycle state machine
(:mod:`mic_host.lifecycle`) and the current :class:`~mic_host.card.session.BootSession`.
Each operation (status, stats, boot, shutdown, reset, run, attach, detach,
net, exec, console resize) checks the state, acts on the session, and maps
the reason a session ended to a table event. Whatever the card does, this
module never lets it crash the daemon.

Top of ``mic_host.card``: imports the session and the link dispatch below it,
never the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from mic_host.agent import DEFAULT_EXEC_TIMEOUT, MAX_EXEC_OUTPUT
from mic_host.backends.console import ConsoleBackend
from mic_host.card.apps import kill_app, list_apps, run_app
from mic_host.card.devices import DeviceSet
from mic_host.card.devlist import card_fields, card_info
from mic_host.card.dispatch import CardLink
from mic_host.card.session import BootSession, net_params
from mic_host.config import CardConfig, check_card_devices, validate_device_options
from mic_host.lifecycle import (
    CardEvent,
    CardLifecycle,
    CardState,
    ShutdownStatus,
    Transition,
    session_end_events,
)
from mic_host.vop import Vop
from transport.messages import DevicesReply, DevicesRequest, NetParams, Shutdown
from virtio.errors import (
    BrokenResourceError,
    LocalProtocolError,
    MicError,
    MicTimeoutError,
    RemoteProtocolError,
)

__all__ = ["CardManager"]

log = logging.getLogger("mic_host.card")

_SHUTTING = CardState.SHUTTING_DOWN
#: Seconds a reset may take (the boot session ending) before the card is reset_failed.
RESET_TIMEOUT = 15.0


class CardManager:
    """One card of the daemon. Every public coroutine is safe to call at any time;
    a request that does not fit the current state raises :class:`LocalProtocolError`.
    """

    def __init__(self, cfg: CardConfig, *, state_dir: Path, node_id: int) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.state_dir = state_dir
        self.node_id = node_id
        self.lifecycle = CardLifecycle(cfg.name)
        self.device_set = DeviceSet(
            cfg.name, list(cfg.devices), state_dir=state_dir, node_id=node_id
        )
        self.last_error = ""
        self.boots = 0
        self.boot_seconds: float | None = None
        #: the current (or last) boot, and the task running it
        self._session: BootSession | None = None
        self._session_task: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()
        self._tasks: set[asyncio.Task[None]] = set()
        #: the watchdog of the current state (shutting_down, resetting), if it has one
        self._deadline: asyncio.Task[None] | None = None
        self.lifecycle.add_listener(self._on_transition)

    # -- state -------------------------------------------------------------
    @property
    def state(self) -> CardState:
        return self.lifecycle.state

    @property
    def vop(self) -> Vop | None:
        """The running boot's VOP layer (None when the card is down)."""
        return self._session.vop if self._session is not None else None

    @property
    def link(self) -> CardLink | None:
        """The running boot's control link (None before the card connects)."""
        return self._session.link if self._session is not None else None

    @property
    def pid(self) -> int | None:
        return self._session.pid if self._session is not None else None

    @property
    def card_devices(self) -> list[dict[str, Any]]:
        """The devices the card OS reported (last ``online``/``devices`` message)."""
        return self._session.card_devices if self._session is not None else []

    def _on_transition(self, tr: Transition) -> None:
        if tr.new is not tr.old:
            self._arm_deadline(tr.new)
        log.info(
            "%s: state %s (shutdown status %s)",
            self.name,
            self.state,
            self.lifecycle.shutdown_status,
        )
        self._spawn(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    async def wait_state(self, *states: CardState, timeout: float | None) -> CardState:
        """Wait until the card is in one of ``states``.

        Raises:
            MicTimeoutError: not reached within ``timeout`` (the message says
                where the card is instead).
        """
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(lambda: self.state in states)
        except TimeoutError:
            want = "/".join(states)
            raise MicTimeoutError(
                f"{self.name}: still {self.state} after {timeout}s (waiting for {want})"
                + (f"; last error: {self.last_error}" if self.last_error else "")
            ) from None
        return self.state

    def _card_names(self) -> dict[str, str | None]:
        """Host device name -> the card's name for it (``vda``), when known."""
        if self.vop is None:
            return {}
        by_offset = {d.get("offset"): d.get("name") for d in self.card_devices}
        return {n: by_offset.get(d.view.offset) for n, d in self.vop.devices.items()}

    def status(self) -> dict[str, Any]:
        """JSON-ready status (what ``micctl status`` shows)."""
        session = self._session
        hb = None
        if session is not None and session.link is not None:
            hb = time.monotonic() - session.last_heartbeat
        names = self._card_names()
        reported = card_info(self.vop, self.card_devices)  # driver, state, error, holder
        devs: list[dict[str, Any]] = []
        ptys = self.device_set.ptys
        for name, d in self.device_set.named():
            entry: dict[str, Any] = {"device": names.get(name), "type": d.type, "name": name}
            entry |= reported.get(name) or card_fields(None)
            if self.vop is not None and name in self.vop.devices:
                vdev = self.vop.devices[name]
                entry |= {"status": vdev.machine.status, "features": vdev.machine.features}
            if name in ptys:
                entry["pty"] = ptys[name].path
                entry["log"] = str(self.device_set.console_log(name))
            devs.append(entry)
        return {
            "name": self.name,
            "state": str(self.state),
            "shutdown_status": str(self.lifecycle.shutdown_status),
            "pid": self.pid,
            "node_id": self.node_id,
            "boots": self.boots,
            "boot_seconds": self.boot_seconds,
            "heartbeat_age": None if hb is None else round(hb, 3),
            "last_error": self.last_error or None,
            "devices": devs,
        }

    def stats(self) -> dict[str, Any]:
        """Per device (doorbells, the backend's own counters) and per queue (wakeups,
        chains, buffers, interrupts, bytes, errors) counters.

        Raises:
            LocalProtocolError: the card is not running.
        """
        if self.vop is None:
            raise LocalProtocolError(f"{self.name}: no statistics, the card is {self.state}")
        raw = self.vop.stats()
        names = self._card_names()
        types = {n: d.type for n, d in self.device_set.named()}
        devices = []
        for name, d in raw.pop("devices").items():
            queues = [q | {"bytes": int(q["bytes_in"]) + int(q["bytes_out"])} for q in d["queues"]]
            devices.append(
                d
                | {
                    "device": names.get(name),
                    "name": name,
                    "type": types.get(name),
                    "queues": queues,
                }
            )
        return {"card": self.name, "state": str(self.state), "devices": devices, "vop": raw}

    # -- boot, shutdown, reset ----------------------------------------------
    async def boot(self, *, wait: bool = False, timeout: float | None = None) -> dict[str, Any]:
        """Boot the card (``ready`` → ``booting``; ``online`` when the card OS says so).

        A card that is ``crashed`` or ``reset_failed`` is reset first (mpssd's
        ``reset`` then ``boot``).

        Raises:
            LocalProtocolError: the card is not ready (booting, online...).
            MicTimeoutError: ``wait`` and not online in time.
        """
        if self.state in (CardState.CRASHED, CardState.RESET_FAILED):
            await self.reset()
        self.lifecycle.fire(CardEvent.BOOT)
        self._start_session()
        if wait:
            await self.wait_state(
                CardState.ONLINE,
                CardState.CRASHED,
                CardState.RESET_FAILED,
                timeout=timeout if timeout is not None else self.cfg.boot_timeout + 5,
            )
            if self.state is not CardState.ONLINE:
                raise MicError(f"{self.name}: boot failed, card is {self.state}: {self.last_error}")
        return self.status()

    def _start_session(self) -> None:
        self.last_error = ""
        self.boots += 1
        session = self._session = BootSession(self)
        self._session_task = asyncio.get_running_loop().create_task(
            self._run_session(session), name=f"{self.name} session"
        )

    async def _run_session(self, session: BootSession) -> None:
        event, status = await session.run()
        self._after_session(event, status)

    async def shutdown(
        self,
        *,
        wait: bool = False,
        timeout: float | None = None,
        status: str = "halted",
    ) -> dict[str, Any]:
        """Ask the card OS to shut down in order (``online`` → ``shutting_down`` → ``ready``).

        A card that does not finish within ``shutdown_timeout`` is reset.

        Raises:
            LocalProtocolError: the card is not online.
            MicTimeoutError: ``wait`` and not ready in time.
        """
        self.lifecycle.fire(CardEvent.SHUTDOWN)
        link = self.link
        try:
            if link is None:
                raise BrokenResourceError("no link")
            await link.send(Shutdown(status=status))
        except BrokenResourceError:
            self._finish(CardEvent.CRASH)
        if wait:
            await self.wait_state(
                CardState.READY,
                CardState.CRASHED,
                CardState.RESET_FAILED,
                timeout=timeout if timeout is not None else self.cfg.shutdown_timeout + 5,
            )
        return self.status()

    def _arm_deadline(self, state: CardState) -> None:
        """Cancel the last state's watchdog; arm the new one's: ``shutting_down`` is reset
        after ``shutdown_timeout``, ``resetting`` fails after :data:`RESET_TIMEOUT`."""
        t, self._deadline = self._deadline, None
        if t is not None and t is not asyncio.current_task():
            t.cancel()
        if state is CardState.SHUTTING_DOWN and self._session is not None:
            self._deadline = self._spawn(self._shutdown_deadline(self._session))
        elif state is CardState.RESETTING:
            self._deadline = self._spawn(self._reset_deadline())

    async def _shutdown_deadline(self, session: BootSession) -> None:
        # never another boot's shutdown, nor a session already ending (it reports)
        await asyncio.sleep(self.cfg.shutdown_timeout)
        if session.finished or self._session is not session or self.state is not _SHUTTING:
            return
        self.last_error = f"card did not shut down within {self.cfg.shutdown_timeout}s"
        log.warning("%s: %s; resetting it", self.name, self.last_error)
        self.lifecycle.fire(CardEvent.RESET)
        self._finish(CardEvent.RESET)

    async def _reset_deadline(self) -> None:
        await asyncio.sleep(RESET_TIMEOUT)
        if self.state is CardState.RESETTING:
            self.last_error = f"reset did not stop the card within {RESET_TIMEOUT}s"
            log.error("%s: %s", self.name, self.last_error)
            self.lifecycle.fire(CardEvent.RESET_FAILED)

    async def reset(self, *, timeout: float = RESET_TIMEOUT + 2) -> dict[str, Any]:
        """Stop the card whatever it is doing (kill the card OS), back to ``ready``.

        Never left ``resetting``: a session that does not end within
        :data:`RESET_TIMEOUT` makes it ``reset_failed`` (``ready`` if it ends later).

        Raises:
            LocalProtocolError: the card is already ``ready``.
            MicTimeoutError: the reset did not complete (state ``reset_failed``).
        """
        self.lifecycle.fire(CardEvent.RESET)
        if self._session_task is not None and not self._session_task.done():
            self._finish(CardEvent.RESET)
            await self.wait_state(CardState.READY, CardState.RESET_FAILED, timeout=timeout)
        else:
            self.lifecycle.fire(CardEvent.RESET_DONE)
        return self.status()

    def _finish(self, event: CardEvent, status: ShutdownStatus | None = None) -> None:
        """End the current session for ``event`` (the first reason wins)."""
        if self._session is not None:
            self._session.finish(event, status)

    async def aclose(self) -> None:
        """Daemon exit: shut an online card down (bounded), kill anything left."""
        if self.state is CardState.ONLINE:
            with contextlib.suppress(MicError):
                await self.shutdown(wait=True, timeout=self.cfg.shutdown_timeout + 2)
        task = self._session_task
        if task is not None and not task.done():
            self._finish(CardEvent.RESET)
            with contextlib.suppress(asyncio.CancelledError, MicError):
                await asyncio.wait_for(asyncio.shield(task), 10)
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for t in list(self._tasks):
            t.cancel()
        await self.device_set.aclose()

    def _after_session(self, event: CardEvent, status: ShutdownStatus | None) -> None:
        steps = session_end_events(self.state, event, status)
        if steps == [(CardEvent.CRASH, None)] and event is not CardEvent.CRASH:
            log.warning("%s: session ended (%s) while %s: crashed", self.name, event, self.state)
        try:
            for step, recorded in steps:
                self.lifecycle.fire(step, status=recorded)
                if step is CardEvent.BOOT:  # the card OS asked for a restart
                    self._start_session()
        except LocalProtocolError as e:  # a race between reasons: report, stay consistent
            log.error("%s: after session (%s): %s", self.name, event, e)

    # -- requests to the card OS -------------------------------------------
    def _online_link(self) -> CardLink:
        link = self.link
        if self.state is not CardState.ONLINE or link is None:
            raise LocalProtocolError(f"{self.name} is {self.state}, not online")
        return link

    async def run(
        self,
        app: str,
        args: list[Any],
        timeout: float | None = None,
        *,
        code: dict[str, Any] | None = None,
        tag: str | None = None,
    ) -> dict[str, Any]:
        """Run ``module:function`` on the card OS; return its result (see
        :func:`mic_host.card.apps.run_app` for what it raises)."""
        return await run_app(self, app, args, code=code, tag=tag, timeout=timeout)

    async def apps(self) -> dict[str, Any]:
        """The apps running on the card (:func:`mic_host.card.apps.list_apps`)."""
        return await list_apps(self)

    async def kill(self, app_id: int | None, tag: str | None) -> dict[str, Any]:
        """Cancel one app on the card (:func:`mic_host.card.apps.kill_app`)."""
        return await kill_app(self, app_id, tag)

    async def refresh_devices(self) -> list[dict[str, Any]]:
        """Ask the card OS for its device list (and remember it).

        Raises:
            LocalProtocolError: card not online.
            MicTimeoutError: no answer in 10 s.
        """
        reply = await self._online_link().ask(lambda rid: DevicesRequest(id=rid), 10.0)
        if not isinstance(reply, DevicesReply):
            raise RemoteProtocolError(f"{self.name} answered devices with {reply.TYPE}")
        return self.card_devices

    # -- hot plug --------------------------------------------------------------
    async def attach(
        self, dtype: str, options: dict[str, Any], *, timeout: float = 10.0
    ) -> dict[str, Any]:
        """Add a device (kept across reboots); hot-add it if the card is running.

        Returns the host name and, when online, the card's name for it (``vdb``).

        Raises:
            ConfigError: unknown type or bad options.
            LocalProtocolError: name taken, device page full.
            MicTimeoutError: the card did not bind it in time.
        """
        opts = dict(options)
        name = opts.pop("name", None)
        checked = validate_device_options(dtype, opts, state_dir=self.state_dir, card=self.name)
        devices = self.device_set
        dev = devices.new_entry(dtype, name, checked)
        # The whole list must fit the device page and the host RAM window, so an
        # attach to a card that is down fails now, not at its next boot.
        check_card_devices(self.cfg, [*devices.entries, dev])
        backend = await devices.open_backend(dev, len(devices.entries))  # validates (the image)
        card_name = None
        if self.vop is not None:
            try:
                params = net_params([backend])
                if params and self.state is CardState.ONLINE:
                    # Before the device appears, so the card's driver finds them.
                    link = self._online_link()
                    await link.ask(lambda rid: NetParams(id=rid, net=params), timeout)
                vdev = self.vop.add_device(backend, packed=devices.packed(dev))
            except MicError:
                await backend.aclose()
                await devices.release(devices.name_of(dev, len(devices.entries)))
                raise
            if self.state is CardState.ONLINE:
                card_name = await self._card_name_of(vdev.view.offset, timeout)
        else:
            await backend.aclose()
        devices.append(dev)
        return {"card": self.name, "name": dev.name, "device": card_name, "type": dtype}

    async def _card_name_of(self, offset: int, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            for d in await self.refresh_devices():
                if d.get("offset") == offset and d.get("state") == "live":
                    return str(d["name"])
            if time.monotonic() > deadline:
                raise MicTimeoutError(
                    f"{self.name}: the card did not bind the new device in {timeout}s"
                )
            await asyncio.sleep(0.02)

    def _find(self, device: str) -> int:
        by_card = {d.get("offset"): d.get("name") for d in self.card_devices}
        for i, (name, _) in enumerate(self.device_set.named()):
            if device == name:
                return i
            if (
                self.vop is not None
                and name in self.vop.devices
                and by_card.get(self.vop.devices[name].view.offset) == device
            ):
                return i
        raise LocalProtocolError(f"{self.name}: no device {device!r}")

    async def detach(self, device: str) -> dict[str, Any]:
        """Hot-remove a device (by host name or card name, e.g. ``vdb``).

        Raises:
            LocalProtocolError: no such device.
            MicTimeoutError: the card did not acknowledge the removal.
        """
        if self.vop is not None and self.state is CardState.ONLINE:
            with contextlib.suppress(MicError):
                await self.refresh_devices()
        name = self.device_set.remove(self._find(device))
        if self.vop is not None and name in self.vop.devices:
            await self.vop.remove_device(name)
        await self.device_set.release(name)
        return {"card": self.name, "removed": name}

    # -- console and agent -------------------------------------------------------
    async def net(self, device: str | None, link: bool | None) -> dict[str, Any]:
        """``micctl net``: every net device (or ``device``) with its backend's view
        (backend, host interface, addresses, namespaces, link, counters) and, when
        the card is online, the card driver's (``card``: mode, namespace, counters).
        ``link`` first sets the link status (a config change the card sees).

        Raises:
            LocalProtocolError: no such device, not a net device, or a link
                change while the card is not running.
        """
        nets = self.device_set.named("net")
        if device is not None:
            name, d = self.device_set.named()[self._find(device)]
            if d.type != "net":
                raise LocalProtocolError(f"{self.name}: {device} is a {d.type} device, not net")
            nets = [(name, d)]
        vop = self.vop
        if link is not None:
            if vop is None:
                raise LocalProtocolError(f"{self.name} is {self.state}: no link to set")
            for name, _ in nets:
                set_link = getattr(vop.devices[name].backend, "set_link", None)
                if callable(set_link):
                    await set_link(link)
        by_offset: dict[int, dict[str, Any]] = {}
        if self.state is CardState.ONLINE:
            with contextlib.suppress(MicError):
                by_offset = {d["offset"]: d for d in await self.refresh_devices()}
        out = []
        for name, d in nets:
            entry: dict[str, Any] = {"name": name}
            if vop is not None and name in vop.devices:
                vdev = vop.devices[name]
                info = getattr(vdev.backend, "info", None)
                if callable(info):
                    entry |= info()
                card_dev = by_offset.get(vdev.view.offset)
                if card_dev is not None:
                    entry["device"] = card_dev.get("name")
                    entry["card"] = card_dev.get("driver_info")
            else:
                entry |= {"backend": d.options.get("backend", "tap"), "options": dict(d.options)}
            out.append(entry)
        return {"card": self.name, "state": str(self.state), "devices": out}

    def _consoles(self) -> list[ConsoleBackend]:
        if self.vop is None:
            return []
        return [
            d.backend for d in self.vop.devices.values() if isinstance(d.backend, ConsoleBackend)
        ]

    async def exec(
        self,
        argv: list[str] | None,
        line: str | None,
        *,
        timeout: float | None = None,
        max_output: int = MAX_EXEC_OUTPUT,
        stdin: str | None = None,
    ) -> dict[str, Any]:
        """Run a shell command on the card through the agent (see :mod:`mic_host.agent`).

        Raises:
            LocalProtocolError: card not online, or it has no agent port (no
                console, or MULTIPORT not negotiated).
            MicTimeoutError: the agent did not answer in time.
            RemoteProtocolError: the agent refused the request.
            BrokenResourceError: the card went down meanwhile.
        """
        if self.state is not CardState.ONLINE:
            raise LocalProtocolError(f"{self.name} is {self.state}, not online")
        agents = [c for c in self._consoles() if c.agent is not None]
        if not agents:
            raise LocalProtocolError(f"{self.name}: no console with an agent port")
        console = agents[0]
        agent = console.agent
        assert agent is not None
        if console.negotiated and not console.multiport_active:
            raise LocalProtocolError(
                f"{self.name}: the card did not negotiate VIRTIO_CONSOLE_F_MULTIPORT: no agent port"
            )
        t = DEFAULT_EXEC_TIMEOUT if timeout is None else timeout
        result = await agent.exec(argv, line=line, timeout=t, max_output=max_output, stdin=stdin)
        return {"card": self.name, **result}

    async def console_resize(self, cols: int, rows: int, device: str | None) -> dict[str, Any]:
        """Set a console's window size (the pty's, and RESIZE to the card when it runs).

        Raises:
            LocalProtocolError: no such console, or a bad size.
        """
        names = [n for n, _ in self.device_set.named("console")]
        if device is not None:
            if device not in names:
                by_card = {n for n, c in self._card_names().items() if c == device}
                names = [n for n in names if n in by_card]
                if not names:
                    raise LocalProtocolError(f"{self.name}: no console {device!r}")
            else:
                names = [device]
        if not names:
            raise LocalProtocolError(f"{self.name}: no console")
        name = names[0]
        if not (0 < cols < 65536 and 0 < rows < 65536):
            raise LocalProtocolError(f"bad window size {cols}x{rows}")
        self.device_set.pty(name).resize(cols, rows)
        if self.vop is not None and name in self.vop.devices:
            backend = self.vop.devices[name].backend
            if isinstance(backend, ConsoleBackend):
                await backend.resize(cols, rows)
        return {"card": self.name, "device": name, "cols": cols, "rows": rows}
