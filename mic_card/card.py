"""The card OS: boot over the PCIe link, the virtio bus, apps, heartbeats, shutdown.

Owns the life of one ``mic-card`` process after the link is up: it reads the
device page address from the scratchpads, runs the :class:`VirtioBus`, pumps
host->card doorbells into it, answers the host's lifecycle messages (the
COSM-like protocol of :mod:`transport.messages`: frozen dataclasses, decoded
with ``decode_from_host`` and matched on their classes; a message that does
not decode is logged and ignored) and runs card apps (``async def main(card)``,
loaded and tracked by :mod:`mic_card.apps`).

The composition root of ``mic_card``: nothing imports this module but
:mod:`mic_card.main`. What card code (shell, agent, offload, accelerators,
apps) sees of it is :class:`Card`, an implementation of
:class:`mic_card.services.CardServices`.

Console services: when a virtio console is bound at boot, the card shell
(:class:`mic_card.shell.InteractiveShell`) runs on its port 0 (``hvc0``) and the
agent (:class:`mic_card.agent.Agent`) on its port named ``org.mic-vop.agent.0``
(present only when MULTIPORT was negotiated). ``reboot``/``poweroff`` in the
shell end the card OS with shutdown status ``restart``/``poweroff``.

Must not import ``mic_host``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from mic_card.agent import AGENT_PORT, Agent
from mic_card.apps import AppRunner
from mic_card.bus import (
    CardRamAllocator,
    ClaimedDevice,
    DriverFactory,
    DriverRegistry,
    VirtioBus,
    claim_device,
)
from mic_card.drivers.console import ConsoleDevice
from mic_card.drivers.net import merge_params
from mic_card.drivers.plugins import load_driver_table
from mic_card.offload import bind_offload_endpoint, serve_offload_endpoint
from mic_card.services import SHUTDOWN_STATUSES
from mic_card.shell import CardFS, InteractiveShell, lazy_command
from transport import PcieCard, Region
from transport.messages import (
    AppsReply,
    AppsRequest,
    DevicesChanged,
    DevicesReply,
    DevicesRequest,
    Heartbeat,
    KillApp,
    NetParams,
    NetParamsReply,
    Online,
    Run,
    RunResult,
    Shutdown,
    ShutdownStatusReport,
    decode_from_host,
    encode,
)
from virtio import trace
from virtio.constants import DeviceType
from virtio.errors import (
    BrokenResourceError,
    ClosedResourceError,
    LocalProtocolError,
    MicError,
    RemoteProtocolError,
    WireError,
)
from virtio.memory import Memory

if TYPE_CHECKING:
    from mic_card.accel import AccelFramework

# The accelerator stack (engines, cryptography) loads on first use, not at boot:
# the help and usage are mic_card.accel.commands' ACCEL_HELP/ACCEL_USAGE (kept
# equal by tests/accel/test_shell_accel.py), written here so boot does not load it.
lazy_command(
    "accel",
    "mic_card.accel.commands",
    help="the card's accelerators: list them, or benchmark one",
    usage="accel list | accel bench --alg ALG --size N --seconds S "
    "[--batch B] [--mode sva|nosva] [--op OP] [--level L] [--json]",
)

__all__ = ["AGENT_WAIT", "Card", "CardOS", "DmesgHandler"]

log = logging.getLogger("mic_card")

#: How long apps get to see their I/O fail when the host vanishes, before exit.
_HOST_LOST_GRACE = 0.5

#: Card RAM below this is reserved (a "kernel" page nobody allocates).
_RESERVED = 0x1000
#: How long the card waits for the console's ports (MULTIPORT handshake) at boot.
AGENT_WAIT = 5.0


class DmesgHandler(logging.Handler):
    """Keeps the card's recent log lines (``dmesg``) in a bounded buffer."""

    def __init__(self, capacity: int = 2000) -> None:
        super().__init__()
        self.lines: collections.deque[str] = collections.deque(maxlen=capacity)
        self._t0 = time.monotonic()

    def emit(self, record: logging.LogRecord) -> None:
        # seconds since the card OS started, as Linux prints them: "[    1.234567] ..."
        # (record.created is wall-clock time: it cannot be compared with monotonic)
        self.lines.append(f"[{time.monotonic() - self._t0:12.6f}] {record.getMessage()}")


class _Platform:
    """The bus's :class:`~mic_card.bus.CardPlatform` over a connected :class:`PcieCard`."""

    def __init__(self, pc: PcieCard, dp_address: int) -> None:
        self._pc = pc
        self._dp = dp_address
        self._alloc = CardRamAllocator(_RESERVED, pc.card_ram.size)

    @property
    def mem(self) -> Memory:
        return self._pc.space

    @property
    def dp_address(self) -> int:
        return self._dp

    def card_ram_alloc(self, size: int, align: int) -> int:
        return self._alloc.alloc(size, align)

    def card_ram_free(self, addr: int) -> None:
        self._alloc.free(addr)

    def ring_host(self, db: int) -> None:
        self._pc.mmio.doorbell(db).ring()


class Card:
    """What a card app sees: ``async def main(card)``; the card OS's
    :class:`~mic_card.services.CardServices`.

    ``card.device("vda")`` is the bound driver (a ``BlockDevice``,
    ``ConsoleDevice``...); ``card.devices()`` lists them; ``card.memory`` is
    the card-physical address space; ``card.alloc``/``card.free`` hand out card
    RAM; ``card.log`` logs to the card's dmesg.
    """

    def __init__(self, os_: CardOS) -> None:
        self._os = os_
        self.name = os_.name
        self.log = log

    @property
    def boot_params(self) -> dict[str, Any]:
        return self._os.boot_params

    @property
    def memory(self) -> Memory:
        return self._os.pcie.space

    @property
    def card_ram(self) -> Region:
        return self._os.pcie.card_ram

    @property
    def bus(self) -> VirtioBus:
        return self._os.bus

    def devices(self) -> list[dict[str, Any]]:
        return self._os.bus.devices()

    def device(self, name: str) -> Any:
        """The driver bound to ``name`` (``vda``, ``hvc0``...).

        Raises:
            LocalProtocolError: no such device (or no driver bound to it).
        """
        return self._os.bus.driver(name)

    async def wait_device(self, name: str, timeout: float = 10.0) -> Any:
        async with asyncio.timeout(timeout):
            await self._os.bus.wait_device(name)
        return self._os.bus.driver(name)

    async def unbind(self, name: str) -> None:
        """Detach ``name``'s driver and reset the device (it stays listed ``unbound``).

        Raises:
            LocalProtocolError: no such device.
            DeviceBusyError: an app holds a claim on it (the message names the app).
            MicTimeoutError: the host did not acknowledge the reset.
        """
        await self._os.bus.unbind(name)

    async def bind(self, name: str, driver: str | DriverFactory) -> Any:
        """Bind ``driver`` (a registered name such as ``"virtio-blk"``, or a factory
        object) to ``name``, which must have no driver; returns the bound driver.

        Raises:
            LocalProtocolError: no such device.
            UnknownDriverError: an unknown driver, or one for another device type.
            DeviceBusyError: the device has a driver, or an app holds a claim on it.
            DriverProbeError: the driver failed to probe (the device is ``failed``).
        """
        return (await self._os.bus.bind(name, driver)).driver

    def claim(
        self, name: str, holder: str | None = None
    ) -> contextlib.AbstractAsyncContextManager[ClaimedDevice]:
        """Raw access to ``name``: ``async with card.claim("vda") as dev:``
        (see :mod:`mic_card.bus.claim`). ``holder`` names the claimant in
        errors and ``micctl devices`` (default: the running app's task name).

        Raises (on entry):
            LocalProtocolError: no such device.
            DeviceBusyError: another app holds it (the message names the holder).
            MicTimeoutError: the host did not acknowledge the reset.
        """
        return claim_device(self._os.bus, name, holder or _current_app())

    def alloc(self, size: int, align: int = 64) -> int:
        return self._os.platform.card_ram_alloc(size, align)

    def free(self, addr: int) -> None:
        self._os.platform.card_ram_free(addr)

    def dmesg(self) -> list[str]:
        return list(self._os.dmesg.lines)

    @property
    def uptime(self) -> float:
        return time.monotonic() - self._os.started

    def shutdown(self, status: str = "halted") -> None:
        """End the card OS with ``status`` (``halted``, ``poweroff`` or ``restart``).

        Raises:
            LocalProtocolError: an unknown status.
        """
        self._os.request_shutdown(status)

    @property
    def agent(self) -> Agent | None:
        """The agent serving the host (None without a console agent port)."""
        return self._os.agent

    async def accelerators(self) -> AccelFramework:
        """The card's accelerator framework (``mic-zip``, ``mic-sec``), started on first use.

        Starting it spawns the engine worker processes, so a card that never
        offloads pays nothing at boot. It stops when the card OS shuts down.
        """
        return await self._os.accelerators()


def _current_app() -> str:
    """Who is asking: the running task's name (an app's task is ``app module:function``)."""
    task = asyncio.current_task()
    return task.get_name() if task is not None else "the card OS"


def _first(eg: BaseExceptionGroup[Any]) -> BaseException:
    """The first leaf of an exception group (the error that ended the card OS)."""
    exc: BaseException = eg
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


class CardOS:
    """One booted card OS over a connected :class:`PcieCard`."""

    def __init__(
        self,
        pcie: PcieCard,
        *,
        apps: tuple[str, ...] = (),
        dmesg: DmesgHandler,
        console_multiport: bool = True,
    ) -> None:
        self.pcie = pcie
        self.name = pcie.identity.name
        self.boot_params = dict(pcie.boot_params)
        self.apps = apps
        self.dmesg = dmesg
        self.started = time.monotonic()
        self.platform = _Platform(pcie, pcie.mmio.spad.device_page())
        # The driver table: the built-in drivers (the console with MULTIPORT
        # left unacked on request: a card that only knows the legacy
        # single-port console), then the mic_vop.drivers plug-ins installed
        # here. The bus keeps this very table: it picks each device's default
        # driver from it at probe time, and card.bind() resolves names in it.
        self.drivers: DriverRegistry = load_driver_table(console_multiport=console_multiport)
        self.bus = VirtioBus(
            self.platform,
            used_in_card=bool(self.boot_params.get("used_ring_in_card", False)),
            drivers=self.drivers,
        )
        self.bus.params = self.boot_params
        self.card = Card(self)
        self.runner = AppRunner(
            self.card, name=self.name, uptime=lambda: self.card.uptime, reply=self._reply
        )
        self.fs = CardFS(self.card)
        self.shell: InteractiveShell | None = None
        self.agent: Agent | None = None
        self.shutdown_status = "halted"
        self._stop = asyncio.Event()
        self._apps: set[asyncio.Task[None]] = set()
        self._accel: AccelFramework | None = None
        self._accel_lock = asyncio.Lock()
        #: what runs until shutdown and is stopped before the bus closes (the
        #: accelerator framework, once started); entered by :meth:`_serve`
        self._resources: contextlib.AsyncExitStack | None = None

    async def accelerators(self) -> AccelFramework:
        """Start the accelerator framework once (see :meth:`Card.accelerators`).

        Raises:
            ClosedResourceError: the card OS is not serving (booting or shut down).
        """
        async with self._accel_lock:
            if self._accel is None:
                from mic_card.accel import AccelFramework, default_devices

                if self._resources is None:
                    raise ClosedResourceError(f"{self.name}: the card OS is not running")
                fw = await self._resources.enter_async_context(AccelFramework(default_devices()))
                self._accel = fw
                log.info("%s: accelerators up: %s", self.name, ", ".join(fw.devices))
            return self._accel

    async def _host_lost(self, exc: BrokenResourceError) -> None:
        """The host is gone: fail every pending request with a clear error, give the
        apps a moment to see it, then let the card OS end (exit status 3)."""
        log.error("%s: link to the host lost (%s): failing pending I/O", self.name, exc)
        self.bus.fail_all(BrokenResourceError(f"{self.name}: link to the host lost"))
        tasks = [*self._apps, *self.runner.tasks]
        if tasks:
            await asyncio.wait(tasks, timeout=_HOST_LOST_GRACE)

    def request_shutdown(self, status: str = "halted") -> None:
        """Shut the card OS down in order with ``status`` (the card's own decision).

        Raises:
            LocalProtocolError: an unknown status.
        """
        if status not in SHUTDOWN_STATUSES:
            raise LocalProtocolError(f"unknown shutdown status {status!r}")
        log.info("%s: %s requested on the card", self.name, status)
        self.shutdown_status = status
        self._stop.set()

    async def run(self) -> str:
        """Boot, serve until the host asks for a shutdown; return the shutdown status.

        Raises:
            BrokenResourceError: the link to the host was lost.
        """
        mmio = self.pcie.mmio
        for db in range(self.pcie.layout.h2c_doorbells):
            mmio.route(db, 0)
        interval = float(self.boot_params.get("heartbeat_interval", 1.0))
        try:
            return await self._serve(interval)
        except* BrokenResourceError as eg:
            raise _first(eg) from None
        except* MicError as eg:
            raise _first(eg) from None

    async def _serve(self, interval: float) -> str:
        link = self.pcie.link
        async with asyncio.TaskGroup() as tg:
            pump = tg.create_task(self._pump(), name="doorbells")
            async with self.bus, contextlib.AsyncExitStack() as resources:
                self._resources = resources
                log.info("%s: %d device(s) on the bus", self.name, len(self.bus.devices()))
                # host scripts open accelerator channels here (mic_card.offload):
                # listening before "online", so an online card always has it
                offload = bind_offload_endpoint(self.boot_params.get("accel_socket"), self.name)
                await link.send(encode(Online(self.bus.devices())))
                hb = tg.create_task(self._heartbeat(interval), name="heartbeat")
                reports = tg.create_task(self._report_devices(), name="device reports")
                msgs = tg.create_task(self._messages(tg), name="link")
                for spec in self.apps:
                    self._start_app(tg, None, spec, [])
                self._start_console(tg)
                if offload is not None:
                    self._track(tg.create_task(serve_offload_endpoint(offload, self.card)))
                await self._stop.wait()
                log.info("%s: shutting down (%s)", self.name, self.shutdown_status)
                # Tell the host now, not once everything is closed (COSM's card
                # sends its shutdown status from the reboot notifier, first): the
                # host's status says shutting_down while we tear down. The last
                # report, after the teardown, is main's.
                with contextlib.suppress(MicError):
                    await link.send(encode(ShutdownStatusReport(self.shutdown_status)))
                hb.cancel()
                msgs.cancel()
                reports.cancel()
                # Shutdown stops the apps still running (an app waiting on a
                # timer or a socket would otherwise hold the card up until the
                # host's shutdown_timeout resets it).
                for app in list(self._apps):
                    app.cancel()
                self.runner.cancel_all()
                # the accelerators stop before the bus closes
                async with self._accel_lock:
                    self._resources = None
                    self._accel = None
                    await resources.aclose()
            # Closing the bus detached the NICs and closed their TAPs; their
            # namespaces are the daemon's (it outlives the card).
            pump.cancel()
        return self.shutdown_status

    def _start_console(self, tg: asyncio.TaskGroup) -> None:
        """The shell on ``hvc0`` and the agent on its named port, if a console is bound."""
        for d in self.bus.devices():
            if d["type"] == DeviceType.CONSOLE and d["driver"] is not None:
                console = self.bus.driver(d["name"])
                self._track(tg.create_task(self._run_shell(console), name="shell"))
                self._track(tg.create_task(self._run_agent(console), name="agent"))
                return
        log.info("%s: no console: no shell, no agent", self.name)

    def _track(self, task: asyncio.Task[None]) -> None:
        self._apps.add(task)
        task.add_done_callback(self._apps.discard)

    async def _run_shell(self, console: ConsoleDevice) -> None:
        try:
            async with asyncio.timeout(AGENT_WAIT):
                port = await console.console_port()
        except (TimeoutError, BrokenResourceError) as e:
            log.error("%s: no console port for the shell: %r", self.name, e)
            return
        self.shell = InteractiveShell(self.card, port, self.fs)
        await self.shell.run()

    async def _run_agent(self, console: ConsoleDevice) -> None:
        if not console.multiport:
            log.info("%s: console without MULTIPORT: no agent port", self.name)
            return
        try:
            async with asyncio.timeout(AGENT_WAIT):
                port = await console.wait_port(AGENT_PORT)
        except (TimeoutError, BrokenResourceError) as e:
            log.error("%s: no agent port %s: %r", self.name, AGENT_PORT, e)
            return
        self.agent = Agent(self.card, port, self.fs)
        await self.agent.run()

    async def _pump(self) -> None:
        """Host->card doorbells into the bus, from the eventfd's reader callback
        (an ISR: the completed requests' futures resolve in the same iteration)."""
        mmio = self.pcie.mmio

        def on_rings(_n: int) -> None:
            if trace.ON:
                trace.mark(trace.CARD_IRQ)
            for db in sorted(mmio.ack_doorbells(0)):
                self.bus.on_doorbell(db)

        try:
            await mmio.vector(0).serve(on_rings)
        except BrokenResourceError:
            return  # link lost: the link reader fails pending I/O and ends the card OS

    async def _report_devices(self) -> None:
        """Tell the host whenever the device list changes (bind, unbind, claim, a failed
        probe, hot add/remove), so ``micctl status`` shows it without asking. Changes
        that come while a report is being sent are coalesced into the next one."""
        seen = self.bus.generation
        while True:
            seen = await self.bus.wait_changed(seen)
            try:
                await self.pcie.link.send(encode(DevicesChanged(self.bus.devices())))
            except BrokenResourceError:
                return  # link lost: the link reader ends the card OS

    async def _heartbeat(self, interval: float) -> None:
        while True:
            await self.pcie.link.send(encode(Heartbeat(self.card.uptime)))
            await asyncio.sleep(interval)

    async def _messages(self, tg: asyncio.TaskGroup) -> None:
        link = self.pcie.link
        while True:
            try:
                obj = await link.recv()
            except BrokenResourceError as e:
                await self._host_lost(e)
                raise
            try:
                msg = decode_from_host(obj)
            except RemoteProtocolError as e:
                log.warning("%s: ignoring a message from the host (%s): %.200r", self.name, e, obj)
                continue
            match msg:
                case Shutdown(status=status):
                    self.shutdown_status = status if status in SHUTDOWN_STATUSES else "halted"
                    self._stop.set()
                case DevicesRequest(id=rid):
                    await link.send(encode(DevicesReply(rid, self.bus.devices())))
                case NetParams(id=rid, net=entries):
                    # A net device is about to be hot-added: its card-side
                    # parameters (address, namespace, mode), as boot_params["net"].
                    known = self.boot_params.setdefault("net", [])
                    if isinstance(known, list):
                        merge_params(known, entries)
                    await link.send(encode(NetParamsReply(rid)))
                case Run(id=rid, app=app, args=args, code=code, tag=tag):
                    self._start_app(tg, rid, app, list(args), code, tag)
                case AppsRequest(id=rid):
                    await link.send(encode(AppsReply(rid, self.runner.listing())))
                case KillApp(id=rid, app=app_id, tag=tag):
                    await link.send(encode(AppsReply(rid, self.runner.kill(app_id, tag))))

    def _start_app(
        self,
        tg: asyncio.TaskGroup,
        rid: int | None,
        spec: str,
        args: list[Any],
        code: dict[str, Any] | None = None,
        tag: str | None = None,
    ) -> None:
        """Start one card app (:mod:`mic_card.apps`); its result goes back to ``rid``."""
        self.runner.start(tg, rid, spec, args, code, tag)

    async def _reply(self, msg: RunResult) -> None:
        """Send an app's result; one the link cannot carry (over its size bound)
        becomes an error naming the app, never a failure of the card OS."""
        with contextlib.suppress(BrokenResourceError):
            try:
                await self.pcie.link.send(encode(msg))
            except LocalProtocolError as e:
                err = LocalProtocolError(f"app {msg.app}: its result cannot be sent: {e}")
                log.error("%s", err)
                bad = RunResult(msg.id, msg.app, ok=False, error=WireError.from_exception(err))
                await self.pcie.link.send(encode(bad))
