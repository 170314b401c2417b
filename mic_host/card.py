"""One card as the host daemon runs it: lifecycle, PCIe link, VOP, card process.

Owns everything per card that lives longer than a boot (its config, the
devices attached at run time, the lifecycle state machine) and, per boot, a
*session*: a fresh :class:`transport.PcieHost` (zeroed regions, like a reset
card), a :class:`mic_host.vop.Vop` with one backend per device, the
``mic-card`` child process, and the tasks that pump doorbells, read link
messages and watch heartbeats. A session ends for exactly one reason (the
card shut down, crashed, went silent, never came online, or was reset); the
lifecycle table (:mod:`mic_host.lifecycle`) decides what state that leads to.

Whatever the card does, this module never lets it crash the daemon: card
faults end the card's session and are reported in its state and log.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from mic_host.agent import DEFAULT_EXEC_TIMEOUT, MAX_EXEC_OUTPUT
from mic_host.backends import Backend, create_backend
from mic_host.backends.console import ConsoleBackend, ConsolePty
from mic_host.config import CardConfig, DeviceConfig, validate_device_options
from mic_host.lifecycle import CardEvent, CardLifecycle, CardState, ShutdownStatus
from mic_host.paths import accel_socket_path
from mic_host.vop import Vop
from transport import CardIdentity, PcieConfig, PcieHost, Perm
from transport.link import MessageLink
from virtio.errors import (
    BrokenResourceError,
    LocalProtocolError,
    MicError,
    MicTimeoutError,
    RemoteProtocolError,
)
from virtio.memory import Memory

__all__ = ["CardManager"]

log = logging.getLogger("mic_host.card")

#: AF_UNIX sun_path holds 108 bytes including the terminating NUL.
_SUN_PATH_MAX = 107
#: How long a lost link may precede the process exit before we call it a crash.
_LINK_GRACE = 2.0


def _net_params(backends: list[Backend]) -> list[dict[str, Any]]:
    """The card-side parameters of the net backends among ``backends``."""
    out = []
    for b in backends:
        card_params = getattr(b, "card_params", None)
        if callable(card_params):
            out.append(dict(card_params()))
    return out


def _card_devices(raw: object) -> list[dict[str, Any]]:
    """The card's device list (``online``/``devices`` messages), keeping only
    well-formed entries (``offset`` an int, ``name`` a string): the card is
    untrusted, and status/stats/detach index this list.
    """
    if not isinstance(raw, list):
        return []
    return [
        d
        for d in raw
        if isinstance(d, dict) and type(d.get("offset")) is int and isinstance(d.get("name"), str)
    ]


class _SessionOver(Exception):
    """Raised inside a session's task group to end it (never escapes)."""


class _Platform:
    """:class:`mic_host.vop.HostPlatform` over a :class:`PcieHost`."""

    def __init__(self, pcie: PcieHost, host_ram_bus: int) -> None:
        self._pcie = pcie
        self._bus = host_ram_bus
        self._ram = pcie.host_ram.view()

    @property
    def host_ram(self) -> memoryview:
        return self._ram

    @property
    def host_ram_bus(self) -> int:
        return self._bus

    @property
    def card_view(self) -> Memory:
        return self._pcie.aperture

    def ring_card(self, db: int) -> None:
        self._pcie.mmio.doorbell(db).ring()


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
        self.devices: list[DeviceConfig] = list(cfg.devices)
        self.pid: int | None = None
        self.vop: Vop | None = None
        self.link: MessageLink | None = None
        self.card_devices: list[dict[str, Any]] = []
        self.last_error = ""
        self.boots = 0
        self.boot_seconds: float | None = None
        self._session_task: asyncio.Task[None] | None = None
        self._end: asyncio.Future[tuple[CardEvent, ShutdownStatus | None]] | None = None
        self._changed = asyncio.Condition()
        self._last_heartbeat = 0.0
        self._boot_started = 0.0
        self._reported_status: ShutdownStatus | None = None
        self._ids = itertools.count(1)
        self._replies: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        #: one pty per console device, for the daemon's life (survives reboots)
        self._ptys: dict[str, ConsolePty] = {}
        for i, d in enumerate(self.devices):
            if d.type == "console":
                self._pty(self._dev_name(d, i))
        self.lifecycle.add_listener(self._on_transition)

    def _pty(self, device: str) -> ConsolePty:
        pty = self._ptys.get(device)
        if pty is None or pty.closed:
            pty = self._ptys[device] = ConsolePty(f"{self.name} {device}")
            # mpssd's words, so scripts that grep for them keep working
            log.info("%s console message goes to %s", self.name, pty.path)
        return pty

    # -- state -------------------------------------------------------------
    @property
    def state(self) -> CardState:
        return self.lifecycle.state

    def _on_transition(self, *_: object) -> None:
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

    def _spawn(self, coro: Any) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

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
        hb = (time.monotonic() - self._last_heartbeat) if self.link is not None else None
        names = self._card_names()
        devs: list[dict[str, Any]] = []
        for i, d in enumerate(self.devices):
            name = self._dev_name(d, i)
            entry: dict[str, Any] = {"device": names.get(name), "type": d.type, "name": name}
            if self.vop is not None and name in self.vop.devices:
                vdev = self.vop.devices[name]
                entry |= {"status": vdev.machine.status, "features": vdev.machine.features}
            if name in self._ptys:
                entry["pty"] = self._ptys[name].path
                entry["log"] = str(self._console_log(name))
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
        """Per device, per queue counters (kicks, interrupts, buffers, bytes, errors).

        Raises:
            LocalProtocolError: the card is not running.
        """
        if self.vop is None:
            raise LocalProtocolError(f"{self.name}: no statistics, the card is {self.state}")
        raw = self.vop.stats()
        names = self._card_names()
        types = {self._dev_name(d, i): d.type for i, d in enumerate(self.devices)}
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
        sock = self.state_dir / f"{self.name}.sock"
        if len(os.fsencode(sock)) > _SUN_PATH_MAX:
            raise LocalProtocolError(f"{self.name}: socket path {sock} too long for AF_UNIX")
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
        self._reported_status = None
        self._boot_started = time.monotonic()
        self.boots += 1
        task = asyncio.get_running_loop().create_task(self._session(), name=f"{self.name} session")
        self._session_task = task

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
            await link.send({"type": "shutdown", "status": status})
        except BrokenResourceError:
            self._finish(CardEvent.CRASH)
        self._spawn(self._shutdown_watchdog())
        if wait:
            await self.wait_state(
                CardState.READY,
                CardState.CRASHED,
                CardState.RESET_FAILED,
                timeout=timeout if timeout is not None else self.cfg.shutdown_timeout + 5,
            )
        return self.status()

    async def _shutdown_watchdog(self) -> None:
        await asyncio.sleep(self.cfg.shutdown_timeout)
        if self.state is CardState.SHUTTING_DOWN:
            self.last_error = f"card did not shut down within {self.cfg.shutdown_timeout}s"
            log.warning("%s: %s; resetting it", self.name, self.last_error)
            with contextlib.suppress(LocalProtocolError):
                self.lifecycle.fire(CardEvent.RESET)
            self._finish(CardEvent.RESET)

    async def reset(self, *, timeout: float = 15.0) -> dict[str, Any]:
        """Stop the card whatever it is doing (kill the card OS), back to ``ready``.

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
        if self._end is not None and not self._end.done():
            self._end.set_result((event, status))

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
        for pty in self._ptys.values():
            pty.close()

    # -- the session ---------------------------------------------------------
    def _dev_name(self, dev: DeviceConfig, index: int) -> str:
        return dev.name or f"{dev.type}{index}"

    def _backend(self, dev: DeviceConfig, index: int) -> Backend:
        opts = dict(dev.options)
        name = self._dev_name(dev, index)
        if dev.type == "block":
            opts["path"] = opts.pop("image")
        elif dev.type == "console":
            opts.setdefault("log_path", str(self._console_log(name)))
            opts["pty"] = self._pty(name)
        elif dev.type == "net":
            # Defaults (TAP name, mpssd's 172.31.N+1.x addresses, MAC) derive from the card.
            opts |= {"card": self.name, "node": self.node_id, "state_dir": str(self.state_dir)}
        backend = create_backend(dev.type, name=name, **opts)
        if isinstance(backend, ConsoleBackend) and backend.agent is not None:
            backend.agent.label = self.name
        return backend

    def _console_log(self, device: str) -> Path:
        """``<card>-console.log`` for the first console, ``<card>-<device>.log`` for others."""
        first = next(
            (self._dev_name(d, i) for i, d in enumerate(self.devices) if d.type == "console"),
            device,
        )
        suffix = "console" if device == first else device
        return self.state_dir / f"{self.name}-{suffix}.log"

    def _boot_params(self, backends: list[Backend]) -> dict[str, Any]:
        return {
            "heartbeat_interval": self.cfg.heartbeat_interval,
            "used_ring_in_card": self.cfg.used_ring_in_card,
            "node_id": self.node_id,
            # What the card's net driver needs beyond the config space
            # (address, namespace, mode): mpssd put it on the kernel cmdline.
            "net": _net_params(backends),
            # where host scripts open accelerator channels (mic_host.accel)
            "accel_socket": str(accel_socket_path(self.state_dir, self.name)),
        }

    async def _spawn_card(self, sock: Path) -> asyncio.subprocess.Process:
        logf = self.state_dir / f"{self.name}-card.log"
        env = dict(os.environ)
        # Card apps (module:function) resolve like they would in the daemon.
        paths = [os.getcwd(), *[p for p in sys.path if p]]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        with logf.open("ab") as out:
            return await asyncio.create_subprocess_exec(
                *self.cfg.card_command,
                sys.executable,
                "-m",
                "mic_card",
                "--socket",
                str(sock),
                "--card",
                self.name,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=env,
                start_new_session=True,
            )

    async def _session(self) -> None:
        loop = asyncio.get_running_loop()
        self._end = loop.create_future()
        sock = self.state_dir / f"{self.name}.sock"
        pcfg = PcieConfig(card_ram_size=self.cfg.card_ram, host_ram_size=self.cfg.host_ram)
        proc: asyncio.subprocess.Process | None = None
        event, status = CardEvent.CRASH, None
        backends: list[Backend] = []
        try:
            # Backends first: a TAP that cannot be created fails the boot with
            # its own message, and the card's boot parameters come from them.
            for i, dev in enumerate(self.devices):
                backends.append(self._backend(dev, i))
            async with PcieHost(
                str(sock),
                card=CardIdentity(self.name, node_id=self.node_id),
                config=pcfg,
                boot_params=self._boot_params(backends),
            ) as pcie:
                win = pcie.smpt.open(0, self.cfg.host_ram, Perm.RW)
                async with Vop(_Platform(pcie, win.addr(0))) as vop:
                    self.vop = vop
                    while backends:
                        vop.add_device(backends[0])
                        backends.pop(0)  # the Vop owns (and closes) it now
                    pcie.mmio.spad.set_device_page(win.addr(0))
                    for db in range(pcie.config.layout.c2h_doorbells):
                        pcie.mmio.route(db, 0)
                    proc = await self._spawn_card(sock)
                    self.pid = proc.pid
                    log.info("%s: booting, card OS pid %d", self.name, proc.pid)
                    try:
                        async with asyncio.TaskGroup() as tg:
                            tg.create_task(self._watch_process(proc))
                            tg.create_task(self._watchdog())
                            tg.create_task(self._accept(pcie, vop, tg))
                            event, status = await self._end
                            raise _SessionOver
                    except* _SessionOver:
                        pass
                    await self._stop_process(proc)
                    self._fail_replies(BrokenResourceError(f"{self.name} went {event}"))
                    self.link = None
                    await vop.reset_all()
        except* (MicError, OSError) as eg:
            event, status = CardEvent.CRASH, ShutdownStatus.CRASHED
            self.last_error = f"boot session failed: {eg.exceptions[0]}"
            log.error("%s: %s", self.name, self.last_error, exc_info=eg.exceptions[0])
        finally:
            for backend in backends:  # built but never handed to a Vop
                with contextlib.suppress(MicError, OSError):
                    await backend.aclose()
            if proc is not None:
                await self._stop_process(proc)
            self.vop = None
            self.link = None
            self.pid = None
            self._fail_replies(BrokenResourceError(f"{self.name} is down"))
        self._after_session(event, status)

    def _after_session(self, event: CardEvent, status: ShutdownStatus | None) -> None:
        st = self.state
        try:
            if event is CardEvent.SHUTDOWN_DONE:
                if st is CardState.ONLINE:  # the card OS shut itself down (poweroff)
                    self.lifecycle.fire(CardEvent.SHUTDOWN, status=status)
                self.lifecycle.fire(CardEvent.SHUTDOWN_DONE, status=status)
                if status is ShutdownStatus.RESTART:
                    self.lifecycle.fire(CardEvent.BOOT)
                    self._start_session()
            elif event is CardEvent.RESET:
                if st is not CardState.RESETTING:
                    self.lifecycle.fire(CardEvent.RESET)
                self.lifecycle.fire(CardEvent.RESET_DONE)
            elif self.lifecycle.can_fire(event):
                self.lifecycle.fire(event)
            elif st is CardState.RESETTING:
                self.lifecycle.fire(CardEvent.RESET_DONE)
        except LocalProtocolError as e:  # a race between reasons: report, stay consistent
            log.error("%s: after session (%s): %s", self.name, event, e)

    async def _stop_process(self, proc: asyncio.subprocess.Process) -> None:
        # The card OS runs in its own session/process group (start_new_session):
        # kill the whole group, so what a card_command wrapper (or the card)
        # started does not outlive the boot.
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            await proc.wait()

    async def _accept(self, pcie: PcieHost, vop: Vop, tg: asyncio.TaskGroup) -> None:
        link = await pcie.accept()
        self.link = link
        self._last_heartbeat = time.monotonic()
        tg.create_task(self._pump(pcie, vop))
        tg.create_task(self._messages(link))

    async def _pump(self, pcie: PcieHost, vop: Vop) -> None:
        """Card->host doorbells (all routed to vector 0) into the VOP layer."""
        vec = pcie.mmio.vector(0)
        mmio = pcie.mmio
        try:
            while True:
                await vec.wait()
                for db in sorted(mmio.ack_doorbells(0)):
                    vop.on_doorbell(db)
        except BrokenResourceError:
            return  # link lost: the process watcher and link reader decide why

    async def _messages(self, link: MessageLink) -> None:
        try:
            while True:
                msg = await link.recv()
                self._on_message(msg)
        except BrokenResourceError as e:
            if self.state is not CardState.SHUTTING_DOWN or self._reported_status is None:
                log.warning("%s: link lost: %s", self.name, e)
            await asyncio.sleep(_LINK_GRACE)
            self.last_error = self.last_error or f"link lost: {e}"
            self._finish(CardEvent.CRASH)

    def _on_message(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "heartbeat":
            self._last_heartbeat = time.monotonic()
        elif kind == "online":
            self.card_devices = _card_devices(msg.get("devices"))
            self._last_heartbeat = time.monotonic()
            if self.state is CardState.BOOTING:
                self.boot_seconds = round(time.monotonic() - self._boot_started, 4)
                self.lifecycle.fire(CardEvent.ONLINE)
        elif kind == "shutdown_status":
            try:
                self._reported_status = ShutdownStatus(str(msg.get("status")))
            except ValueError:
                log.warning("%s: bad shutdown status %.100r", self.name, msg.get("status"))
                self._reported_status = ShutdownStatus.HALTED
        elif kind == "crashed":
            self.last_error = f"card OS crashed: {str(msg.get('error'))[:500]}"
            self._reported_status = ShutdownStatus.CRASHED
        elif kind in ("devices", "run_result", "net-params"):
            if kind == "devices" and isinstance(msg.get("devices"), list):
                self.card_devices = _card_devices(msg["devices"])
            rid = msg.get("id")
            fut = None
            if isinstance(rid, int) and not isinstance(rid, bool):
                fut = self._replies.pop(rid, None)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        else:
            log.warning("%s: unknown message from card: %.200r", self.name, msg)

    async def _watch_process(self, proc: asyncio.subprocess.Process) -> None:
        rc = await proc.wait()
        status = self._reported_status
        if status is not None and status is not ShutdownStatus.CRASHED and rc == 0:
            self._finish(CardEvent.SHUTDOWN_DONE, status)
        else:
            self.last_error = self.last_error or f"card OS exited with status {rc}"
            log.error("%s: %s", self.name, self.last_error)
            self._finish(CardEvent.CRASH)

    async def _watchdog(self) -> None:
        """Boot timeout and heartbeat loss (COSM's heartbeat monitor)."""
        period = min(0.25, self.cfg.heartbeat_interval)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            if self.state is CardState.BOOTING and now - self._boot_started > self.cfg.boot_timeout:
                self.last_error = f"card did not come online within {self.cfg.boot_timeout}s"
                self._finish(CardEvent.BOOT_TIMEOUT)
            elif (
                self.state is CardState.ONLINE
                and now - self._last_heartbeat > self.cfg.heartbeat_timeout
            ):
                self.last_error = f"no heartbeat for {self.cfg.heartbeat_timeout}s"
                self._finish(CardEvent.HEARTBEAT_LOST)

    # -- requests to the card OS -------------------------------------------
    async def _ask(self, msg: dict[str, Any], timeout: float | None) -> dict[str, Any]:
        if self.state is not CardState.ONLINE or self.link is None:
            raise LocalProtocolError(f"{self.name} is {self.state}, not online")
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[rid] = fut
        try:
            await self.link.send({**msg, "id": rid})
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:
            raise MicTimeoutError(
                f"{self.name}: no answer to {msg.get('type')} in {timeout}s"
            ) from None
        finally:
            self._replies.pop(rid, None)

    def _fail_replies(self, exc: MicError) -> None:
        for fut in self._replies.values():
            if not fut.done():
                fut.set_exception(exc)
        self._replies.clear()

    async def run(self, app: str, args: list[Any], timeout: float | None = None) -> dict[str, Any]:
        """Run ``module:function`` on the card OS; return its result.

        Raises:
            LocalProtocolError: card not online.
            RemoteProtocolError: the app failed (its error type and message).
            BrokenResourceError: the card went down meanwhile.
        """
        reply = await self._ask({"type": "run", "app": app, "args": args}, timeout)
        if not reply.get("ok"):
            err = reply.get("error") or {}
            raise RemoteProtocolError(
                f"{app} failed on {self.name}: {err.get('type')}: {err.get('message')}",
                reason="app",
            )
        return {"card": self.name, "app": app, "value": reply.get("result")}

    async def refresh_devices(self) -> list[dict[str, Any]]:
        reply = await self._ask({"type": "devices"}, 10.0)
        return self.card_devices if reply else []

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
        index = len(self.devices)
        dev = DeviceConfig(type=dtype, name=name or f"{dtype}{index}", options=checked)
        taken = {self._dev_name(d, i) for i, d in enumerate(self.devices)}
        if dev.name in taken:
            raise LocalProtocolError(f"{self.name}: a device named {dev.name!r} exists")
        backend = self._backend(dev, index)  # validates (opens/creates the image)
        card_name = None
        if self.vop is not None:
            try:
                params = _net_params([backend])
                if params and self.state is CardState.ONLINE:
                    # Before the device appears, so the card's driver finds them.
                    await self._ask({"type": "net-params", "net": params}, timeout)
                vdev = self.vop.add_device(backend)
            except MicError:
                await backend.aclose()
                raise
            if self.state is CardState.ONLINE:
                card_name = await self._card_name_of(vdev.view.offset, timeout)
        else:
            await backend.aclose()
        self.devices.append(dev)
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
        for i, d in enumerate(self.devices):
            name = self._dev_name(d, i)
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
        i = self._find(device)
        dev = self.devices.pop(i)
        name = self._dev_name(dev, i)
        # later devices keep their (explicit or derived) names
        for j in range(i, len(self.devices)):
            d = self.devices[j]
            if d.name is None:
                self.devices[j] = DeviceConfig(
                    type=d.type, name=self._dev_name(d, j + 1), options=d.options
                )
        if self.vop is not None and name in self.vop.devices:
            await self.vop.remove_device(name)
        pty = self._ptys.pop(name, None)
        if pty is not None:
            pty.close()
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
        nets = [(self._dev_name(d, i), d) for i, d in enumerate(self.devices) if d.type == "net"]
        if device is not None:
            idx = self._find(device)
            d = self.devices[idx]
            if d.type != "net":
                raise LocalProtocolError(f"{self.name}: {device} is a {d.type} device, not net")
            nets = [(self._dev_name(d, idx), d)]
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
        names = [self._dev_name(d, i) for i, d in enumerate(self.devices) if d.type == "console"]
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
        self._pty(name).resize(cols, rows)
        if self.vop is not None and name in self.vop.devices:
            backend = self.vop.devices[name].backend
            if isinstance(backend, ConsoleBackend):
                await backend.resize(cols, rows)
        return {"card": self.name, "device": name, "cols": cols, "rows": rows}
