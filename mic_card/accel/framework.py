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

Every started queue has an engine worker of its own (taken from a pool of
``DeviceSpec.workers`` ready processes, spawned beyond it), so a worker fault
never reaches anything but its queue: its in-flight requests end with
``Status.ENGINE_FAULT``, the queue is disabled until ``reset()``, the worker
is respawned. The management interface is the driver side of the device's
management queue (``mic_card.accel.mgmt``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Coroutine, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any

from mic_card.accel.channel import QueueResources, WorkerLink, close_fds, spawn_worker
from mic_card.accel.engine import CIPHER_ALGS, COMP_ALGS
from mic_card.accel.errors import AccelError, DeviceIsolated, QueueBusy
from mic_card.accel.mgmt import FaultEvent, Management
from mic_card.accel.owner import ServedQueue
from mic_card.accel.queue import AccelQueue
from mic_card.accel.spec import DevFlag, DeviceSpec, default_devices
from mic_card.accel.wire import API, Alg, QueueGeometry, StatusWord, alg_by_name
from transport import LinkLost, NotifyMode, NotifyPolicy
from virtio.errors import ClosedResourceError, ConfigError, MicError

if TYPE_CHECKING:
    from mic_card.accel.providers import ProviderRegistry
    from mic_card.accel.session import SessionLike

__all__ = [
    "AccelDevice",
    "ServedQueue",
    "AccelFramework",
    "DevFlag",
    "DeviceSpec",
    "FaultEvent",
    "Management",
    "default_devices",
]

log = logging.getLogger("mic_card.accel")
_HOUR_NS = 3600 * 1_000_000_000


class _Worker:
    def __init__(self, device: AccelDevice, index: int) -> None:
        self.device = device
        self.index = index
        self.wl: WorkerLink | None = None
        self.queues: set[ServedQueue] = set()
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
        self.queues: dict[int, ServedQueue] = {}
        self.workers = [_Worker(self, i) for i in range(spec.workers)]
        self._worker_ids = itertools.count(spec.workers)
        self.worker_restarts = 0
        self.mgmt = Management(self)
        self._faults: collections.deque[int] = collections.deque()
        self._qids = itertools.count()
        self._placement: dict[ServedQueue, _Worker] = {}

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

    def ring_fault(self, q: ServedQueue, detail: str) -> None:
        """A queue's driver side found its ring broken (:class:`QueueOwner`)."""
        self.record_fault("ring", q.qid, detail)

    # -- queues -----------------------------------------------------------------------
    async def open(self) -> AccelQueue:
        """A new queue in state INIT (uacce ``open``); ``await q.start()`` to use it.

        Raises:
            QueueBusy: ``available_instances`` is 0.
            DeviceIsolated: the device isolated itself.
            ClosedResourceError: the framework is not running.
        """
        qid, pasid = self.admit()
        geo = QueueGeometry(pasid, self.spec.heap_size)
        res = QueueResources.create(geo, self.fw.policy)
        q = AccelQueue(self, qid, res, sva=self.spec.sva, policy=self.fw.policy)
        self.queues[qid] = q
        return q

    def admit(self) -> tuple[int, int]:
        """A queue id and a PASID for a new queue, if the device may take one.

        Raises:
            QueueBusy, DeviceIsolated, ClosedResourceError: as :meth:`open`.
        """
        self.fw._check_running()
        if self.isolate:
            raise DeviceIsolated(
                f"{self.name} is isolated after {self.fault_count()} faults "
                f"(isolate_strategy {self.isolate_strategy}/h)"
            )
        if self.available_instances <= 0:
            raise QueueBusy(f"{self.name} is busy: all {self.spec.max_queues} queues are in use")
        return next(self._qids), self.fw._new_pasid()

    @contextlib.asynccontextmanager
    async def queue(self) -> AsyncIterator[AccelQueue]:
        """Open and start a queue; release it on exit."""
        q = await self.open()
        async with q:
            yield q

    async def _take_worker(self, q: ServedQueue) -> _Worker:
        """An engine worker of its own for ``q``: an idle one, else a new one.

        Each started queue has its own worker process, so an engine crash or
        hang fails that queue's requests only. ``spec.workers`` idle workers
        are kept ready so starting a queue rarely waits for a process.
        """
        for w in self.workers:
            if not w.queues and w.ready.is_set() and not w.expected_exit:
                w.queues.add(q)  # reserved before any await
                return w
        w = _Worker(self, next(self._worker_ids))
        w.queues.add(q)
        self.workers.append(w)
        self.fw._spawn(self._run_worker(w), f"accel-{self.name}-{w.index}")
        try:
            async with asyncio.timeout(60):
                await w.ready.wait()
        except BaseException:
            w.queues.discard(q)
            await self._retire(w)
            raise
        return w

    async def _retire(self, w: _Worker) -> None:
        """Stop an idle worker beyond the ``spec.workers`` kept ready."""
        w.expected_exit = True
        if w.wl is not None and w.ready.is_set():
            with contextlib.suppress(MicError, OSError, TimeoutError):
                async with asyncio.timeout(2):
                    await w.request({"type": "stop"})

    async def attach(self, q: ServedQueue) -> None:
        """Hand ``q`` to an engine worker of its own (:class:`QueueOwner`)."""
        w = await self._take_worker(q)
        geo = q.geometry
        fw = self.fw
        extra, fds = q.attach_request()
        msg = {
            **extra,
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
        self._placement[q] = w
        try:
            await w.request(msg, fds)
        except BaseException:
            w.queues.discard(q)
            self._placement.pop(q, None)
            raise

    async def detach(self, q: ServedQueue) -> None:
        """Take ``q`` back from its worker (:class:`QueueOwner`)."""
        w = self._placement.pop(q, None)
        if w is None:
            return
        w.queues.discard(q)
        if w.wl is not None and w.ready.is_set():
            with contextlib.suppress(MicError, OSError, TimeoutError):
                await w.request({"type": "detach", "qid": q.qid})
        idle = [x for x in self.workers if not x.queues and not x.expected_exit]
        if len(idle) > self.spec.workers and not w.queues and not self.fw._closing:
            await self._retire(w)

    def released(self, q: ServedQueue) -> None:
        """``q`` is freed (:class:`QueueOwner`)."""
        self.queues.pop(q.qid, None)

    def adopt(self, q: ServedQueue) -> None:
        """Count ``q``, admitted with :meth:`admit`, among the queues (:class:`ChannelOwner`)."""
        self.queues[q.qid] = q

    def clear_isolation(self) -> None:
        """Forget the fault history and un-isolate the device (:class:`ManagedDevice`)."""
        self._faults.clear()
        self.isolate = False

    def worker_of(self, q: ServedQueue) -> int | None:
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
                if w in self.workers and not self.fw._closing:
                    self.workers.remove(w)
                return
            kind = "hang" if w.pid in self.fw._killed else "crash"
            self.fw._killed.discard(w.pid or 0)
            for q in list(w.queues):
                self._placement.pop(q, None)
                q.fault(f"engine {kind} (worker exit {rc})")
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
                        q.fault(f"ring error: {msg.get('detail')}")

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
        self._stack: contextlib.AsyncExitStack | None = None
        self._mgmt_tasks: list[asyncio.Task[None]] = []
        self._providers: ProviderRegistry | None = None

    # -- lifecycle ---------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _lifetime(self) -> AsyncIterator[AccelFramework]:
        """The framework's task group around its running life: workers, watchdog,
        management units; on the way out every queue is released, the workers stopped."""
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            try:
                for d in self.devices.values():
                    for w in d.workers:
                        tg.create_task(d._run_worker(w), name=f"accel-{d.name}-{w.index}")
                tg.create_task(self._watchdog(), name="accel-watchdog")
                for d in self.devices.values():
                    self._mgmt_tasks.append(
                        tg.create_task(d.mgmt.run(), name=f"accel-mgmt-{d.name}")
                    )
                async with asyncio.timeout(60):
                    for d in self.devices.values():
                        for w in d.workers:
                            await w.ready.wait()
                self._running = True
                yield self
            finally:
                self._tg = None
                await self._shutdown()

    async def __aenter__(self) -> AccelFramework:
        """Start every device's workers and wait until they are ready.

        Raises:
            TimeoutError: the workers did not come up within 60 s.
        """
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(self._lifetime())
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Release every queue, stop the workers (idempotent)."""
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()

    async def _shutdown(self) -> None:
        self._running = False
        for d in self.devices.values():
            for q in list(d.queues.values()):
                with contextlib.suppress(MicError):
                    await q.aclose()
        self._closing = True
        await asyncio.gather(*(d._stop_workers() for d in self.devices.values()))
        for t in self._mgmt_tasks:
            t.cancel()
        for t in self._mgmt_tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._mgmt_tasks.clear()
        for d in self.devices.values():
            d.mgmt.close()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Run ``coro`` as a child of the framework's task group (workers added on demand)."""
        if self._tg is None:
            coro.close()
            raise ClosedResourceError("the accelerator framework is not running")
        self._tg.create_task(coro, name=name)

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
                    busy = q.status_word(StatusWord.BUSY_SINCE) if not q.closed else 0
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
