"""The accelerator framework of the card OS (uacce semantics, Revere-AMU management).

Owns the registered devices and their attributes, the engine worker
processes ("hardware agents") and their supervision, queue allocation with a
per-device limit (``QueueBusy``), fault accounting against
``isolate_strategy`` (faults per hour, as Linux 6.1 uacce), the watchdog that
kills a hung engine, and each device's management interface (capabilities,
queue reset, statistics, fault notifications).

The card OS creates it at boot::

    async with AccelFramework(default_devices()) as accel:
        card.accel = accel            # apps: accel.device("mic-zip"), accel.open_session(...)

Worker faults never reach anything but the queues that worker served: their
in-flight requests end with ``Status.ENGINE_FAULT``, the queues are disabled
until ``reset()``, the worker is respawned.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from enum import IntFlag
from types import TracebackType
from typing import TYPE_CHECKING, Any

from mic_card.accel.channel import QueueResources, WorkerLink, close_fds, spawn_worker
from mic_card.accel.engine import CIPHER_ALGS, COMP_ALGS
from mic_card.accel.errors import AccelError, DeviceIsolated, QueueBusy
from mic_card.accel.queue import AccelQueue, QState
from mic_card.accel.wire import (
    ALG_NAMES,
    API,
    QUEUE_RING_SIZE,
    Alg,
    QueueGeometry,
    StatusWord,
    alg_by_name,
)
from transport import LinkLost, NotifyMode, NotifyPolicy
from virtio.errors import ClosedResourceError, ConfigError, MicError

if TYPE_CHECKING:
    from mic_card.accel.providers import ProviderRegistry
    from mic_card.accel.session import SessionLike

__all__ = [
    "AccelDevice",
    "AccelFramework",
    "DevFlag",
    "DeviceSpec",
    "FaultEvent",
    "Management",
    "default_devices",
]

log = logging.getLogger("mic_card.accel")
_HOUR_NS = 3600 * 1_000_000_000


class DevFlag(IntFlag):
    """uacce device flags."""

    SVA = 1  #: UACCE_DEV_SVA: requests may point into memory the app shared with the queue


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """A device to register: name, algorithms and resources.

    ``isolate_strategy`` is the number of faults per hour at which the device
    isolates itself (0 = never), ``workers`` the engine processes behind it,
    ``heap_size`` each queue's shared memory (half bounce pool, half shared
    buffers on SVA devices).
    """

    name: str
    algorithms: tuple[str, ...]
    max_queues: int = 16
    workers: int = 2
    sva: bool = True
    node: int = 0
    isolate_strategy: int = 0
    heap_size: int = 8 << 20
    chaining: bool = True
    allow_inject: bool = False

    def __post_init__(self) -> None:
        for a in self.algorithms:
            try:
                alg_by_name(a)
            except KeyError as e:
                raise ConfigError(f"device {self.name!r}: {e.args[0]}") from None
        if not 1 <= self.max_queues <= 1024 or not 1 <= self.workers <= 64:
            raise ConfigError(f"device {self.name!r}: max_queues/workers out of range")
        if self.heap_size <= 0 or self.heap_size % 8192:
            raise ConfigError(f"device {self.name!r}: heap_size must be a multiple of 8 KiB")
        if not 0 <= self.isolate_strategy <= 65535:
            raise ConfigError(f"device {self.name!r}: isolate_strategy outside 0..65535")


def default_devices(**overrides: Any) -> tuple[DeviceSpec, ...]:
    """The card's two accelerators: ``mic-zip`` (compression) and ``mic-sec`` (security)."""
    comp = tuple(ALG_NAMES[a] for a in sorted(COMP_ALGS))
    sec = tuple(ALG_NAMES[a] for a in sorted(Alg) if a >= Alg.AES_CBC)
    return (
        DeviceSpec("mic-zip", comp, **overrides),
        DeviceSpec("mic-sec", sec, **overrides),
    )


@dataclass(frozen=True, slots=True)
class FaultEvent:
    """A fault notification of the management interface."""

    device: str
    qid: int | None
    kind: str  #: "crash", "hang", "ring", "access"
    detail: str
    time: float = field(default_factory=time.time)


class _Worker:
    def __init__(self, device: AccelDevice, index: int) -> None:
        self.device = device
        self.index = index
        self.wl: WorkerLink | None = None
        self.queues: set[AccelQueue] = set()
        self.replies: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.ids = itertools.count(1)
        self.ready = asyncio.Event()
        self.pid: int | None = None
        self.generation = 0
        self.expected_exit = False

    async def request(self, msg: dict[str, Any], fds: list[int] | None = None) -> dict[str, Any]:
        await self.ready.wait()
        wl = self.wl
        if wl is None:
            raise ClosedResourceError("worker is gone")
        rid = next(self.ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.replies[rid] = fut
        try:
            await wl.link.send_frame({**msg, "id": rid}, fds or ())
            async with asyncio.timeout(10):
                reply = await fut
        finally:
            self.replies.pop(rid, None)
        if not reply.get("ok"):
            raise AccelError(f"worker refused {msg['type']}: {reply.get('error')}")
        return reply


class Management:
    """A device's management interface (Revere-AMU): capabilities, reset, stats, faults."""

    def __init__(self, device: AccelDevice) -> None:
        self._dev = device
        self._subscribers: list[asyncio.Queue[FaultEvent]] = []
        self.log: collections.deque[FaultEvent] = collections.deque(maxlen=256)

    def capabilities(self) -> dict[str, Any]:
        d = self._dev
        return {
            "name": d.name,
            "api": d.api,
            "flags": int(d.flags),
            "algorithms": list(d.algorithms),
            "chaining": d.spec.chaining,
            "max_queues": d.spec.max_queues,
            "workers": d.spec.workers,
            "ring_size": QUEUE_RING_SIZE,
            "heap_size": d.spec.heap_size,
            "node": d.node_id,
        }

    async def reset_queue(self, qid: int) -> None:
        """Reset queue ``qid`` of this device (recovers it after a fault).

        Raises:
            KeyError: no such open queue.
        """
        await self._dev.queues[qid].reset()

    def stats(self) -> dict[str, Any]:
        """Per-queue counters (from the status pages) and device totals."""
        per: dict[int, dict[str, int]] = {}
        tot: dict[str, int] = collections.Counter()
        for qid, q in self._dev.queues.items():
            if q.state is not QState.STARTED:
                continue
            s = {
                w.name.lower(): q.status_word(w)
                for w in (
                    StatusWord.REQUESTS,
                    StatusWord.ERRORS,
                    StatusWord.BYTES_IN,
                    StatusWord.BYTES_OUT,
                    StatusWord.ACCESS_FAULTS,
                    StatusWord.ENGINE_NS,
                )
            }
            s["submitted"] = q.stats.submitted
            s["doorbells"] = q.stats.doorbells
            per[qid] = s
            tot.update(s)
        return {
            "queues": per,
            "totals": dict(tot),
            "faults": self._dev.fault_count(),
            "isolate": self._dev.isolate,
            "worker_restarts": self._dev.worker_restarts,
        }

    def notify(self, ev: FaultEvent) -> None:
        self.log.append(ev)
        for q in self._subscribers:
            q.put_nowait(ev)

    @contextlib.asynccontextmanager
    async def faults(self) -> AsyncIterator[asyncio.Queue[FaultEvent]]:
        """Subscribe to fault notifications: ``async with mgmt.faults() as q: await q.get()``."""
        q: asyncio.Queue[FaultEvent] = asyncio.Queue()
        self._subscribers.append(q)
        try:
            yield q
        finally:
            self._subscribers.remove(q)

    def clear_isolation(self) -> None:
        """Forget the fault history and un-isolate the device."""
        self._dev._faults.clear()
        self._dev.isolate = False


class AccelDevice:
    """One registered accelerator (a uacce device).

    Attributes: ``api``, ``flags``, ``available_instances``, ``algorithms``,
    ``isolate``, ``isolate_strategy`` (settable), ``node_id``; ``mgmt`` is
    the management interface.
    """

    def __init__(self, fw: AccelFramework, spec: DeviceSpec, dev_id: int) -> None:
        self.fw = fw
        self.spec = spec
        self.name = spec.name
        self.id = dev_id
        self.api = API
        self.flags = DevFlag.SVA if spec.sva else DevFlag(0)
        self.algorithms = spec.algorithms
        self.algs = frozenset(alg_by_name(a) for a in spec.algorithms)
        self.node_id = spec.node
        self.isolate = False
        self.isolate_strategy = spec.isolate_strategy
        self.queues: dict[int, AccelQueue] = {}
        self.workers = [_Worker(self, i) for i in range(spec.workers)]
        self.worker_restarts = 0
        self.mgmt = Management(self)
        self._faults: collections.deque[int] = collections.deque()
        self._qids = itertools.count()
        self._placement: dict[AccelQueue, _Worker] = {}

    # -- attributes ---------------------------------------------------------------
    @property
    def available_instances(self) -> int:
        return self.spec.max_queues - len(self.queues)

    def supports(self, alg: str) -> bool:
        return alg in self.algorithms or (
            self.spec.chaining and "+" in alg and _chain_ok(alg, self.algs)
        )

    def attrs(self) -> dict[str, Any]:
        """The sysfs-like attribute set (``accel list``)."""
        return {
            "name": self.name,
            "api": self.api,
            "flags": int(self.flags),
            "available_instances": self.available_instances,
            "algorithms": "\n".join(self.algorithms),
            "isolate": int(self.isolate),
            "isolate_strategy": self.isolate_strategy,
            "node_id": self.node_id,
        }

    # -- faults ---------------------------------------------------------------------
    def fault_count(self) -> int:
        now = time.monotonic_ns()
        while self._faults and now - self._faults[0] > _HOUR_NS:
            self._faults.popleft()
        return len(self._faults)

    def record_fault(self, kind: str, qid: int | None, detail: str) -> None:
        self._faults.append(time.monotonic_ns())
        n = self.fault_count()
        log.warning("accel %s: %s fault on queue %s: %s", self.name, kind, qid, detail)
        if self.isolate_strategy and n >= self.isolate_strategy and not self.isolate:
            self.isolate = True
            log.error("accel %s: isolated after %d faults in an hour", self.name, n)
        self.mgmt.notify(FaultEvent(self.name, qid, kind, detail))

    def _ring_fault(self, q: AccelQueue, detail: str) -> None:
        self.record_fault("ring", q.qid, detail)

    # -- queues -----------------------------------------------------------------------
    async def open(self) -> AccelQueue:
        """A new queue in state INIT (uacce ``open``); ``await q.start()`` to use it.

        Raises:
            QueueBusy: ``available_instances`` is 0.
            DeviceIsolated: the device isolated itself.
            ClosedResourceError: the framework is not running.
        """
        self.fw._check_running()
        if self.isolate:
            raise DeviceIsolated(
                f"{self.name} is isolated after {self.fault_count()} faults "
                f"(isolate_strategy {self.isolate_strategy}/h)"
            )
        if self.available_instances <= 0:
            raise QueueBusy(f"{self.name} is busy: all {self.spec.max_queues} queues are in use")
        qid = next(self._qids)
        pasid = self.fw._new_pasid()
        geo = QueueGeometry(pasid, self.spec.heap_size)
        res = QueueResources.create(geo, self.fw.policy)
        q = AccelQueue(self, qid, res, sva=self.spec.sva, policy=self.fw.policy)
        self.queues[qid] = q
        return q

    @contextlib.asynccontextmanager
    async def queue(self) -> AsyncIterator[AccelQueue]:
        """Open and start a queue; release it on exit."""
        q = await self.open()
        async with q:
            yield q

    def _pick_worker(self) -> _Worker:
        return min(self.workers, key=lambda w: len(w.queues))

    async def _attach(self, q: AccelQueue) -> None:
        w = self._pick_worker()
        geo = q.geometry
        fw = self.fw
        msg = {
            "type": "attach",
            "qid": q.qid,
            "pasid": geo.pasid,
            "heap_size": geo.heap_size,
            "algs": sorted(int(a) for a in self.algs),
            "chaining": self.spec.chaining,
            "inject": self.spec.allow_inject,
            "spin_ns": fw.worker_policy.spin_ns,
            "mode": int(fw.worker_policy.mode),
        }
        w.queues.add(q)
        self._placement[q] = w
        try:
            await w.request(msg, q.resources.fds())
        except BaseException:
            w.queues.discard(q)
            self._placement.pop(q, None)
            raise

    async def _detach(self, q: AccelQueue) -> None:
        w = self._placement.pop(q, None)
        if w is None:
            return
        w.queues.discard(q)
        if w.wl is not None and w.ready.is_set():
            with contextlib.suppress(MicError, OSError, TimeoutError):
                await w.request({"type": "detach", "qid": q.qid})

    def _released(self, q: AccelQueue) -> None:
        self.queues.pop(q.qid, None)

    def worker_of(self, q: AccelQueue) -> int | None:
        """pid of the worker serving ``q`` (None if unattached)."""
        w = self._placement.get(q)
        return None if w is None else w.pid

    # -- workers ----------------------------------------------------------------------
    async def _run_worker(self, w: _Worker) -> None:
        """Keep worker ``w`` alive: spawn, read its messages, fail its queues when it dies."""
        while not self.fw._closing:
            wl = await spawn_worker(f"{self.name}.{w.index}")
            w.wl = wl
            w.pid = wl.proc.pid
            w.generation += 1
            reader = asyncio.create_task(self._read_worker(w, wl))
            try:
                rc = await wl.proc.wait()
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
                w.ready.clear()
                w.wl = None
                wl.link.close()
                for fut in w.replies.values():
                    if not fut.done():
                        fut.set_exception(AccelError("worker died"))
            if self.fw._closing or w.expected_exit:
                return
            kind = "hang" if w.pid in self.fw._killed else "crash"
            self.fw._killed.discard(w.pid or 0)
            for q in list(w.queues):
                self._placement.pop(q, None)
                q._fault(f"engine {kind} (worker exit {rc})")
                self.record_fault(kind, q.qid, f"worker pid {w.pid} exit {rc}")
            if not w.queues:
                self.record_fault(kind, None, f"worker pid {w.pid} exit {rc}")
            w.queues.clear()
            self.worker_restarts += 1

    async def _read_worker(self, w: _Worker, wl: WorkerLink) -> None:
        with contextlib.suppress(LinkLost, MicError, OSError):
            while True:
                msg, fds = await wl.link.recv_frame()
                close_fds(fds)
                kind = msg.get("type")
                if kind == "ready":
                    w.ready.set()
                elif kind == "reply":
                    fut = w.replies.get(int(msg.get("id", -1)))
                    if fut is not None and not fut.done():
                        fut.set_result(msg)
                elif kind == "fault":
                    qid = int(msg.get("qid", -1))
                    q = self.queues.get(qid)
                    fk = str(msg.get("kind"))
                    self.record_fault(fk, qid, str(msg.get("detail")))
                    if q is not None and fk == "ring":
                        q._fault(f"ring error: {msg.get('detail')}")

    async def _stop_workers(self) -> None:
        async def stop(w: _Worker) -> None:
            wl = w.wl
            if wl is None:
                return
            w.expected_exit = True
            with contextlib.suppress(MicError, OSError, TimeoutError):
                async with asyncio.timeout(2):
                    await w.request({"type": "stop"})
            try:
                async with asyncio.timeout(3):
                    await wl.proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    wl.proc.kill()

        await asyncio.gather(*(stop(w) for w in self.workers))


def _chain_ok(alg: str, algs: frozenset[Alg]) -> bool:
    parts = alg.split("+")
    if len(parts) != 2:
        return False
    try:
        a, b = (alg_by_name(p) for p in parts)
    except KeyError:
        return False
    comp, ciph = (a, b) if a in COMP_ALGS else (b, a)
    return comp in COMP_ALGS and ciph in CIPHER_ALGS and (comp in algs or ciph in algs)


class AccelFramework:
    """The card's accelerator framework: devices, engine workers, providers.

    ``async with AccelFramework(specs) as fw`` starts every device's workers
    (and waits until they are ready); exiting releases every queue and stops
    the workers. ``hang_timeout`` is how long one request may keep an engine
    busy before the watchdog kills it.
    """

    def __init__(
        self,
        devices: Iterable[DeviceSpec] | None = None,
        *,
        policy: NotifyPolicy | None = None,
        worker_policy: NotifyPolicy | None = None,
        hang_timeout: float = 10.0,
        watchdog_interval: float = 0.1,
    ) -> None:
        specs = tuple(default_devices() if devices is None else devices)
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ConfigError(f"duplicate accelerator names in {names}")
        self.policy = policy or NotifyPolicy(NotifyMode.HYBRID, spin_ns=20_000)
        self.worker_policy = worker_policy or NotifyPolicy(NotifyMode.HYBRID, spin_ns=50_000)
        self.hang_timeout = hang_timeout
        self.watchdog_interval = watchdog_interval
        self.devices: dict[str, AccelDevice] = {
            s.name: AccelDevice(self, s, i) for i, s in enumerate(specs)
        }
        self._pasids = itertools.count(1)
        self._closing = False
        self._running = False
        self._killed: set[int] = set()
        self._tg: asyncio.TaskGroup | None = None
        self._providers: ProviderRegistry | None = None

    # -- lifecycle ---------------------------------------------------------------------
    async def __aenter__(self) -> AccelFramework:
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        try:
            for d in self.devices.values():
                for w in d.workers:
                    self._tg.create_task(d._run_worker(w), name=f"accel-{d.name}-{w.index}")
            self._tg.create_task(self._watchdog(), name="accel-watchdog")
            async with asyncio.timeout(60):
                for d in self.devices.values():
                    for w in d.workers:
                        await w.ready.wait()
            self._running = True
        except BaseException as e:
            await self._shutdown()
            await self._tg.__aexit__(type(e), e, e.__traceback__)
            raise
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Release every queue, stop the workers (idempotent)."""
        tg, self._tg = self._tg, None
        if tg is None:
            return
        try:
            await self._shutdown()
        finally:
            await tg.__aexit__(None, None, None)

    async def _shutdown(self) -> None:
        self._running = False
        for d in self.devices.values():
            for q in list(d.queues.values()):
                with contextlib.suppress(MicError):
                    await q.aclose()
        self._closing = True
        await asyncio.gather(*(d._stop_workers() for d in self.devices.values()))

    def _check_running(self) -> None:
        if not self._running:
            raise ClosedResourceError("the accelerator framework is not running")

    def _new_pasid(self) -> int:
        return next(self._pasids)

    async def _watchdog(self) -> None:
        """Kill a worker whose engine has been busy with one request too long (a hang)."""
        limit = int(self.hang_timeout * 1e9)
        while not self._closing:
            await asyncio.sleep(self.watchdog_interval)
            now = time.monotonic_ns()
            for d in self.devices.values():
                for q, w in list(d._placement.items()):
                    busy = q.status_word(StatusWord.BUSY_SINCE) if not q._closed else 0
                    if busy and now - busy > limit and w.wl is not None:
                        log.error(
                            "accel %s: queue %d hung; killing worker %s", d.name, q.qid, w.pid
                        )
                        if w.pid is not None:
                            self._killed.add(w.pid)
                        with contextlib.suppress(ProcessLookupError):
                            w.wl.proc.kill()

    # -- discovery ---------------------------------------------------------------------
    def device(self, name: str) -> AccelDevice:
        """The device called ``name`` (KeyError with the known names)."""
        try:
            return self.devices[name]
        except KeyError:
            raise KeyError(f"no accelerator {name!r}; have {', '.join(self.devices)}") from None

    def find(self, alg: str, node: int | None = None) -> list[AccelDevice]:
        """Devices offering ``alg``, usable ones first, nearest node first (wd_get_accel_list)."""
        devs = [d for d in self.devices.values() if d.supports(alg)]
        return sorted(
            devs,
            key=lambda d: (
                d.isolate,
                d.available_instances <= 0,
                0 if node is None else abs(d.node_id - node),
                -d.available_instances,
            ),
        )

    @property
    def providers(self) -> ProviderRegistry:
        """The provider registry bound to this framework (entry points loaded once)."""
        if self._providers is None:
            from mic_card.accel.providers import ProviderRegistry

            self._providers = ProviderRegistry.default(self)
        return self._providers

    async def open_session(self, alg: str, **kw: Any) -> SessionLike:
        """A session for ``alg`` from the best provider (see ``ProviderRegistry.open_session``)."""
        return await self.providers.open_session(alg, **kw)
