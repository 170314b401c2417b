"""One boot of a card: everything that lives from ``boot`` until the card is down again.

A :class:`BootSession` builds the card's backends, a fresh
:class:`transport.PcieHost` (zeroed regions, like a reset card), a
:class:`mic_host.vop.Vop` holding the backends, and the ``mic-card`` child
process; then runs the tasks that accept the card's link, pump its
doorbells, read its messages (:class:`~mic_host.card.dispatch.CardLink`),
watch the process and watch the boot timeout and heartbeat. It ends for
exactly one reason (the first :meth:`BootSession.finish` wins: the card shut
down, crashed, went silent, never came online, or was reset) and
:meth:`BootSession.run` returns that reason as a lifecycle event; the card
manager maps it through the table (:mod:`mic_host.lifecycle`).

Whatever the card does, a session never lets it crash the daemon: card
faults end the session and are reported in ``last_error``. Whatever ends a
session, even an exception nobody foresaw, :meth:`BootSession.run` returns
(a crash, with the reason in ``last_error``) after closing everything the
boot held (the link, the card OS, the backends), so ``reset`` and ``boot``
work again. Every line the card can make the daemon log in a boot (link
garbage, forged replies, ring faults in VOP) goes through one
:class:`virtio.ratelimit.LogBudget` per boot: a few lines per second, and a
"suppressed N" summary.

What the session needs from its card (config, lifecycle, the device set that
builds its backends) is the :class:`SessionOwner` protocol; it never
imports the card manager. Imports below it: ``mic_host.card.dispatch``,
``mic_host.card.devices``, ``mic_host.card.process``, ``mic_host.vop``, ``mic_host.lifecycle``,
``mic_host.paths``, ``transport``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, assert_never

from mic_host.backends import Backend
from mic_host.card.devices import DeviceSet
from mic_host.card.dispatch import CardLink, card_devices
from mic_host.card.process import spawn_card_os, stop_card_os
from mic_host.config import CardConfig
from mic_host.lifecycle import CardEvent, CardLifecycle, CardState, ShutdownStatus
from mic_host.paths import accel_socket_path
from mic_host.vop import Vop
from transport import (
    CardIdentity,
    Mmio,
    NotifyMode,
    NotifyPolicy,
    PcieConfig,
    PcieHost,
    Perm,
)
from transport.dma import DmaEngine
from transport.messages import (
    AppsReply,
    CardMessage,
    Crashed,
    DevicesChanged,
    DevicesReply,
    Heartbeat,
    NetParamsReply,
    Online,
    RunResult,
    ShutdownStatusReport,
)
from virtio import trace
from virtio.errors import BrokenResourceError, MicError, MicTimeoutError, RemoteProtocolError
from virtio.memory import Memory
from virtio.ratelimit import LogBudget

__all__ = ["LINK_GRACE", "BootSession", "SessionOwner", "net_params"]

log = logging.getLogger("mic_host.card")

#: How the doorbell pump's vector waits: armed at once, no spin inside a task
#: (a spin there holds the loop while the backend it just woke is ready to run);
#: the loop itself polls before it sleeps (``transport.spinloop``).
PUMP_NOTIFY = NotifyPolicy(NotifyMode.EVENTFD)
#: How long a lost link may precede the process exit before we call it a crash.
LINK_GRACE = 2.0


async def pump_doorbells(mmio: Mmio, on_doorbell: Callable[[int], None]) -> None:
    """Forever: ack vector 0's doorbells and hand each to ``on_doorbell``, from the
    eventfd's reader callback (:meth:`transport.Vector.serve`).

    The work runs in the callback that noticed the ring, as an ISR does: no
    task to wake, no extra loop iteration between a card's kick and the
    backend it wakes. A card that never stops ringing gets one delivery per
    loop iteration, and every other card's work runs between two of them.

    Raises:
        BrokenResourceError: the link was lost (the vector failed).
    """

    def on_rings(_n: int) -> None:
        if trace.ON:
            trace.mark(trace.HOST_WAKE)
        for db in sorted(mmio.ack_doorbells(0)):
            on_doorbell(db)

    await mmio.vector(0).serve(on_rings)


#: The statuses a card OS reports when it goes down on its own.
_GOING_DOWN = (ShutdownStatus.HALTED, ShutdownStatus.POWEROFF, ShutdownStatus.RESTART)


class SessionOwner(Protocol):
    """What a boot session uses of its card (implemented by ``CardManager``)."""

    name: str
    cfg: CardConfig
    node_id: int
    state_dir: Path
    lifecycle: CardLifecycle
    device_set: DeviceSet
    last_error: str
    boot_seconds: float | None


def net_params(backends: list[Backend]) -> list[dict[str, Any]]:
    """The card-side parameters of the net backends among ``backends``."""
    out = []
    for b in backends:
        card_params = getattr(b, "card_params", None)
        if callable(card_params):
            out.append(dict(card_params()))
    return out


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

    def dma(self) -> DmaEngine:
        """The card's DMA engine (:class:`mic_host.backends.datapath.DmaPlatform`):
        VOP opens it while a device's ``data_path`` uses it."""
        return self._pcie.dma()


class BootSession:
    """One boot of ``owner``'s card; :meth:`run` it once (in its own task)."""

    def __init__(self, owner: SessionOwner) -> None:
        self.owner = owner
        self.name = owner.name
        self.vop: Vop | None = None
        self.link: CardLink | None = None
        self.pid: int | None = None
        #: what the card OS reported it probed (``online``/``devices``)
        self.card_devices: list[dict[str, Any]] = []
        self.last_heartbeat = 0.0
        self.started = time.monotonic()
        #: the status the card OS said it is going down with
        self.reported_status: ShutdownStatus | None = None
        #: what the card can make the daemon log in this boot
        self.log_budget = LogBudget(self.name, log, time.monotonic)
        self.log = self.log_budget.logger(log)
        self._end: asyncio.Future[tuple[CardEvent, ShutdownStatus | None]] = (
            asyncio.get_running_loop().create_future()
        )

    @property
    def state(self) -> CardState:
        return self.owner.lifecycle.state

    def finish(self, event: CardEvent, status: ShutdownStatus | None = None) -> None:
        """End the session for ``event`` (the first reason wins)."""
        if not self._end.done():
            self._end.set_result((event, status))

    @property
    def finished(self) -> bool:
        return self._end.done()

    def _error(self, text: str) -> None:
        self.owner.last_error = text

    # -- the boot --------------------------------------------------------------
    def _boot_params(self, backends: list[Backend]) -> dict[str, Any]:
        o = self.owner
        return {
            "heartbeat_interval": o.cfg.heartbeat_interval,
            "used_ring_in_card": o.cfg.used_ring_in_card,
            "node_id": o.node_id,
            # What the card's net driver needs beyond the config space
            # (address, namespace, mode): mpssd put it on the kernel cmdline.
            "net": net_params(backends),
            # where host scripts open accelerator channels (mic_host.client)
            "accel_socket": str(accel_socket_path(o.state_dir, o.name)),
        }

    async def run(self) -> tuple[CardEvent, ShutdownStatus | None]:
        """Boot, serve, and take the card down again; returns why it ended."""
        o = self.owner
        cfg = o.cfg
        pcfg = PcieConfig(card_ram_size=cfg.card_ram, host_ram_size=cfg.host_ram)
        proc: asyncio.subprocess.Process | None = None
        event: CardEvent = CardEvent.CRASH
        status: ShutdownStatus | None = None
        backends: list[Backend] = []
        try:
            # Backends first: a TAP that cannot be created fails the boot with
            # its own message, and the card's boot parameters come from them.
            for i, dev in enumerate(o.device_set.entries):
                backends.append(await o.device_set.open_backend(dev, i))
            packed = [o.device_set.packed(dev) for dev in o.device_set.entries]
            async with PcieHost(
                None,  # a socket pair: only the process we spawn can reach the link
                card=CardIdentity(o.name, node_id=o.node_id),
                config=pcfg,
                boot_params=self._boot_params(backends),
                notify=PUMP_NOTIFY,
            ) as pcie:
                win = pcie.smpt.open(0, cfg.host_ram, Perm.RW)
                async with Vop(_Platform(pcie, win.addr(0)), log_budget=self.log_budget) as vop:
                    self.vop = vop
                    while backends:
                        vop.add_device(backends[0], packed=packed.pop(0))
                        backends.pop(0)  # the Vop owns (and closes) it now
                    pcie.mmio.spad.set_device_page(win.addr(0))
                    for db in range(pcie.config.layout.c2h_doorbells):
                        pcie.mmio.route(db, 0)
                    try:
                        proc = await spawn_card_os(cfg, state_dir=o.state_dir, link_fd=pcie.card_fd)
                    finally:
                        pcie.close_card_end()  # the child has it: its death is EOF
                    self.pid = proc.pid
                    log.info("%s: booting, card OS pid %d", o.name, proc.pid)
                    try:
                        async with asyncio.TaskGroup() as tg:
                            tg.create_task(self._watch_process(proc))
                            tg.create_task(self._watchdog())
                            tg.create_task(self._accept(pcie, vop, tg))
                            event, status = await self._end
                            raise _SessionOver
                    except* _SessionOver:
                        pass
                    await stop_card_os(proc)
                    self._fail_replies(BrokenResourceError(f"{o.name} went {event}"))
                    self.link = None
                    await vop.reset_all()
        except* Exception as eg:
            # A card fault (MicError, OSError), or a bug of ours a card's data
            # tripped: either way this boot is over, and it ends as a crash
            # after everything above was closed (the link socket included).
            event, status = CardEvent.CRASH, ShutdownStatus.CRASHED
            first = eg.exceptions[0]
            why = str(first) if isinstance(first, MicError | OSError) else repr(first)
            self._error(f"boot session failed: {why}")
            log.error("%s: %s", o.name, o.last_error, exc_info=first)
        finally:
            for backend in backends:  # built but never handed to a Vop
                with contextlib.suppress(MicError, OSError):
                    await backend.aclose()
            if proc is not None:
                await stop_card_os(proc)
            self.vop = None
            self._fail_replies(BrokenResourceError(f"{o.name} is down"))
            self.link = None
            self.pid = None
            self.log_budget.flush(final=True)
        return event, status

    def _fail_replies(self, exc: MicError) -> None:
        if self.link is not None:
            self.link.fail_replies(exc)

    async def _accept(self, pcie: PcieHost, vop: Vop, tg: asyncio.TaskGroup) -> None:
        try:
            raw = await pcie.accept(card_pid=self.pid)
        except BrokenResourceError as e:
            # the card OS hung up before the handshake: its exit status (the
            # process watcher) or the boot timeout says why
            log.info("%s: the card OS closed its link before the handshake: %s", self.name, e)
            return
        except (RemoteProtocolError, MicTimeoutError) as e:
            # the one process that holds the other end failed the handshake:
            # nobody else can, so the boot is over
            self._error(f"card handshake failed: {e}")
            log.error("%s: %s", self.name, self.owner.last_error)
            self.finish(CardEvent.CRASH)
            return
        link = CardLink(self.name, raw, self.log)
        self.link = link
        self.last_heartbeat = time.monotonic()
        tg.create_task(self._pump(pcie, vop))
        tg.create_task(self._messages(link))

    async def _pump(self, pcie: PcieHost, vop: Vop) -> None:
        """Card->host doorbells (all routed to vector 0) into the VOP layer."""
        try:
            await pump_doorbells(pcie.mmio, vop.on_doorbell)
        except BrokenResourceError:
            return  # link lost: the process watcher and link reader decide why

    async def _messages(self, link: CardLink) -> None:
        try:
            await link.serve(self._on_message)
        except BrokenResourceError as e:
            if isinstance(e.__cause__, RemoteProtocolError):
                # the card broke the link protocol (garbage framing, a frame
                # nested too deeply, duplicate keys): that is why it crashed,
                # whatever its process does next
                self._error(f"card broke the link protocol: {e.__cause__}")
            if self.state is not CardState.SHUTTING_DOWN or self.reported_status is None:
                log.warning("%s: link lost: %s", self.name, e)
            await asyncio.sleep(LINK_GRACE)
            self._error(self.owner.last_error or f"link lost: {e}")
            self.finish(CardEvent.CRASH)

    def _on_message(self, msg: CardMessage) -> None:
        match msg:
            case Heartbeat():
                self.last_heartbeat = time.monotonic()
            case Online(devices=devices):
                self.card_devices = card_devices(devices)
                self.last_heartbeat = time.monotonic()
                if self.state is CardState.BOOTING:
                    self.owner.boot_seconds = round(time.monotonic() - self.started, 4)
                    self.owner.lifecycle.fire(CardEvent.ONLINE)
            case ShutdownStatusReport(status=reported):
                try:
                    self.reported_status = ShutdownStatus(reported)
                except ValueError:
                    self.log.warning("%s: bad shutdown status %.100r", self.name, reported)
                    self.reported_status = ShutdownStatus.HALTED
                    return
                if self.state is CardState.ONLINE and self.reported_status in _GOING_DOWN:
                    # the card OS started going down on its own (reboot, poweroff):
                    # COSM's shutting_down, so status no longer says online with a
                    # pid that is exiting; shutdown_timeout bounds it as any shutdown
                    self.owner.lifecycle.fire(CardEvent.SHUTDOWN)
            case Crashed(error=error):
                self._error(f"card OS crashed: {error[:500]}")
                self.reported_status = ShutdownStatus.CRASHED
            case DevicesReply(devices=devices) | DevicesChanged(devices=devices):
                self.card_devices = card_devices(devices)
            case RunResult() | NetParamsReply() | AppsReply():
                pass  # answers: the link handed them to the request waiting for them
            case _:
                assert_never(msg)

    async def _watch_process(self, proc: asyncio.subprocess.Process) -> None:
        rc = await proc.wait()
        status = self.reported_status
        if status is not None and status is not ShutdownStatus.CRASHED and rc == 0:
            self.finish(CardEvent.SHUTDOWN_DONE, status)
        else:
            self._error(self.owner.last_error or f"card OS exited with status {rc}")
            log.error("%s: %s", self.name, self.owner.last_error)
            self.finish(CardEvent.CRASH)

    async def _watchdog(self) -> None:
        """Boot timeout and heartbeat loss (COSM's heartbeat monitor)."""
        cfg = self.owner.cfg
        period = min(0.25, cfg.heartbeat_interval)
        while True:
            await asyncio.sleep(period)
            self.log_budget.flush()  # the "suppressed N" line of a window that ended
            now = time.monotonic()
            if self.state is CardState.BOOTING and now - self.started > cfg.boot_timeout:
                self._error(f"card did not come online within {cfg.boot_timeout}s")
                self.finish(CardEvent.BOOT_TIMEOUT)
            elif (
                self.state is CardState.ONLINE and now - self.last_heartbeat > cfg.heartbeat_timeout
            ):
                self._error(f"no heartbeat for {cfg.heartbeat_timeout}s")
                self.finish(CardEvent.HEARTBEAT_LOST)
