"""One VOP device on the host: its entry, rings, status, queues, and the handshake adapter.

Owns a :class:`VopDevice`: the asyncio side of the host half of
:mod:`virtio.handshake` (feed it the card's doorbells and the adapter's own
events, perform the actions it returns, bound every wait with
``asyncio.timeout`` and report :class:`~virtio.errors.MicTimeoutError`), the
device-side queues the backend uses, and the device's lifecycle
(active -> removing -> removed/zombie). Everything a device needs from the
set of devices it belongs to comes through the small :class:`DeviceOwner`
protocol, never through the owner's private members.

Must not import :mod:`mic_host.vop.devices` (the owner), ``transport`` or
``mic_card``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

from mic_host.backends import Backend, ExternalRings, RingSpec
from mic_host.backends.datapath import DmaLease
from mic_host.endpoint import EndpointState, QueueEndpoint
from mic_host.events import MAX_MESSAGE, emit
from virtio import packed
from virtio.constants import MicConfigChange
from virtio.devpage import (
    H2C_DOORBELLS,
    MAX_QUEUE_SIZE,
    RING_PACKED,
    TRANSPORT_FEATURES,
    Ctrl,
    EntryView,
    packed_vring,
)
from virtio.errors import LocalProtocolError, MicError, MicTimeoutError
from virtio.handshake import (
    Action,
    BeginReset,
    CardGone,
    ConfigAcked,
    Doorbell,
    Fault,
    HostHandshake,
    HostState,
    NeedsReset,
    Publish,
    PublishStatus,
    PublishType,
    PublishUsedAddress,
    ResetDrained,
    RingConfig,
    RingPeer,
    StartConfigChange,
    StartQueues,
    Stop,
    StopQueues,
    Tick,
    TimedOut,
    publish,
)
from virtio.memory import Memory
from virtio.ratelimit import LimitedLogger
from virtio.split import DeviceQueue, SplitLayout
from virtio.status import DeviceStatusMachine

__all__ = ["HOST_TRANSPORT_FEATURES", "DeviceOwner", "VopDevice", "VopDeviceState", "Vring"]

log = logging.getLogger("mic_host.vop")

#: Transport features every VOP device offers on top of its backend's.
HOST_TRANSPORT_FEATURES = TRANSPORT_FEATURES
#: Re-check period while waiting for ``guest_ack`` (Linux polls every 100 ms).
_CONFIG_POLL = 0.1
#: The events are values without fields: one instance each (doorbells are hot).
_DOORBELL, _TICK = Doorbell(), Tick()


class DeviceOwner(Protocol):
    """What a :class:`VopDevice` uses of the set of devices it belongs to (``Vop``)."""

    @property
    def host_ram(self) -> memoryview:
        """The host RAM region (vrings and their ``_mic_vring_info``)."""

    @property
    def card_view(self) -> Memory:
        """Card-physical addresses as the host reaches them."""

    @property
    def config_db(self) -> int:
        """The card's config doorbell (``h2c_config_db``), -1 while it does not listen."""

    @property
    def config_timeout(self) -> float: ...

    @property
    def drain_timeout(self) -> float: ...

    def device_log(self, name: str) -> LimitedLogger:
        """The logger of device ``name``, behind the card's log budget (the card
        provokes most of what a device logs)."""

    def in_host_ram(self, addr: int, length: int) -> bool:
        """True if card-physical ``[addr, addr + length)`` overlaps host RAM."""

    def ring(self, db: int) -> None:
        """Ring host->card doorbell ``db`` (failures are counted, not raised)."""

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Run ``coro`` as a task the owner cancels when it closes."""

    def open_dma(self, bounce_size: int) -> AbstractAsyncContextManager[DmaLease]:
        """The card's DMA engine and a bounce buffer (:mod:`mic_host.backends.datapath`)."""


class VopDeviceState(Enum):
    ACTIVE = "active"
    REMOVING = "removing"
    REMOVED = "removed"
    ZOMBIE = "zombie"  # the card never acknowledged removal; slot and rings held until reset


@dataclass(slots=True)
class Vring:
    """One vring the host allocated in host RAM."""

    offset: int  # in host RAM
    num: int
    bus: int  # card-physical address of desc (vqconfig.address)
    default_used: int  # card-physical address of the contiguous used ring
    info: int  # in host RAM: this vring's _mic_vring_info (computed once, read per flush)


class VopDevice:
    """One virtio device of a card: its entry, rings, status machine and queues.

    Implements :class:`mic_host.backends.BackendContext` for its backend and
    :class:`mic_host.endpoint.EndpointOwner` for its endpoints. The protocol
    rules live in :attr:`hs` (:class:`virtio.handshake.HostHandshake`).
    """

    def __init__(
        self,
        owner: DeviceOwner,
        backend: Backend,
        view: EntryView,
        vrings: list[Vring],
        c2h_db: int,
        *,
        packed: bool = False,
    ) -> None:
        """``packed``: also offer VIRTIO_F_RING_PACKED (the device's ``ring = "packed"``)."""
        self._owner = owner
        self.backend = backend
        self.name = backend.name
        self.device_type = int(backend.device_type)
        self.vrings = vrings
        self.c2h_db = c2h_db
        self.offered = int(backend.features()) | HOST_TRANSPORT_FEATURES
        if packed:
            self.offered |= RING_PACKED
        self.machine = DeviceStatusMachine(self.offered)
        self.hs = HostHandshake(
            view,
            self.machine,
            [v.num for v in vrings],
            [v.default_used for v in vrings],
            self._check_used,
        )
        self.endpoints = [QueueEndpoint(self, i, v.num) for i, v in enumerate(vrings)]
        #: a backend that serves its rings itself (vhost-user): no DeviceQueue here
        self.external = backend if isinstance(backend, ExternalRings) else None
        self.state = VopDeviceState.ACTIVE
        self._config_lock = asyncio.Lock()
        self._ctrl_event = asyncio.Event()
        self._bad_db_logged = False
        #: the backend's logger (BackendContext); :attr:`card_log` for what the card provokes
        self.log = logging.getLogger(f"mic_host.vop.{self.name}")
        self.card_log = owner.device_log(self.name)
        self.task: asyncio.Task[None] | None = None
        self.doorbells = 0
        self.card_interrupts = 0
        self.config_interrupts = 0
        self.errors = 0
        self.resets = 0
        self.last_error = ""

    @property
    def view(self) -> EntryView:
        """Live accessors to the device's entry (replaced when the page is rewritten)."""
        return self.hs.view

    @view.setter
    def view(self, view: EntryView) -> None:
        self.hs.view = view

    # -- BackendContext ------------------------------------------------------
    @property
    def queues(self) -> Sequence[QueueEndpoint]:
        return self.endpoints

    @property
    def features(self) -> int:
        return self.machine.features

    def open_dma(self, bounce_size: int) -> AbstractAsyncContextManager[DmaLease]:
        """Lend the card's DMA engine (:class:`mic_host.backends.datapath.DmaProvider`)."""
        return self._owner.open_dma(bounce_size)

    async def update_config(self, config: bytes) -> None:
        """Write a new config space; if the card is using the device, run the
        config-change handshake (``config_change = 2``, config doorbell,
        ``guest_ack``) as ``MIC_VIRTIO_CONFIG_CHANGE`` does.

        Raises:
            LocalProtocolError: wrong config length, or the device was removed.
            MicTimeoutError: the card did not set ``guest_ack`` in time (the
                flags are cleared again; unlike Linux this is reported).
        """
        if self.state is not VopDeviceState.ACTIVE:
            raise LocalProtocolError(f"device {self.name} is {self.state.value}")
        async with self._config_lock:
            self.view.config = bytes(config)
            if self._owner.config_db < 0 or self.machine.status == 0:
                return  # nobody listening: the card reads the new config at probe
            await self._config_handshake(MicConfigChange.CONFIG_CHANGE, self._owner.config_timeout)

    # -- EndpointOwner -------------------------------------------------------
    def _interrupt(self) -> None:
        db = self.view.ctrl(Ctrl.H2C_VDEV_DB)
        if db < 0:
            return
        if db >= H2C_DOORBELLS:
            if not self._bad_db_logged:
                self.card_log.error("card chose h2c_vdev_db %d, outside 0..15: not rung", db)
                self._bad_db_logged = True
            return
        self.card_interrupts += 1
        self._owner.ring(db)

    def _ring_error(self, index: int, exc: MicError) -> None:
        self._act(self.hs.receive(Fault(f"queue {index}: {exc}")))

    # -- RingHost (a backend that serves its rings itself) ------------------------
    def ring_interrupt(self) -> None:
        self._interrupt()

    def ring_fault(self, reason: str) -> None:
        self._act(self.hs.receive(Fault(reason)))

    def _published(self, index: int, next_avail: int) -> None:
        off = self.vrings[index].info
        self._owner.host_ram[off : off + 2] = (next_avail & 0xFFFF).to_bytes(2, "little")

    # -- the handshake adapter ---------------------------------------------------
    def on_doorbell(self) -> None:
        """The card rang this device's c2h doorbell. Never raises for card faults."""
        self.doorbells += 1
        self._ctrl_event.set()
        self._act(self.hs.receive(_DOORBELL))
        if self.hs.state is HostState.SERVING:
            for ep in self.endpoints:
                ep.notify()
            if self.external is not None:
                self.external.kick()

    def _act(self, actions: list[Action]) -> None:
        """Perform the handshake core's actions, in order."""
        for a in actions:
            match a:
                case Publish() | PublishStatus() | PublishType() | PublishUsedAddress():
                    publish(self.view, a)
                case RingPeer():
                    self._interrupt()
                case RingConfig(db):
                    self.config_interrupts += 1
                    self._owner.ring(db)
                case StartQueues(used, features):
                    try:
                        self._start_queues(used, features)
                    except MicError as e:
                        # a RingError, or a MemoryFault zeroing a used ring the
                        # card pointed outside its memory: only this device pays
                        self._act(self.hs.receive(Fault(str(e))))
                case StopQueues(reason):
                    self.card_log.info("%s: queues stopped: %s", self.name, reason)
                    self.stop_queues(EndpointState.IDLE, reason)
                case NeedsReset(reason):
                    self.errors += 1
                    self.last_error = reason
                    self.card_log.error("device %s needs reset: %s", self.name, reason)
                    emit("device_needs_reset", name=self.name, reason=reason[:MAX_MESSAGE])
                    self.stop_queues(EndpointState.BROKEN, reason)
                    self._owner.spawn(self._notify_needs_reset(), f"{self.name}-needs-reset")
                case BeginReset():
                    self.resets += 1
                    self.stop_queues(EndpointState.IDLE, "device reset by the card")
                    self._owner.spawn(self._vdev_reset(), f"{self.name}-reset")
                case ConfigAcked():
                    pass  # the waiter in _config_handshake sees it done
                case _:  # pragma: no cover - the card half's actions never reach the host
                    raise LocalProtocolError(f"host cannot perform {a!r}")

    def _check_used(self, index: int, addr: int, nbytes: int) -> str | None:
        """Why the card's used ring ``index`` at ``addr`` is unusable, or None."""
        if self._owner.in_host_ram(addr, nbytes):
            # The trick moves the used ring into *card* RAM; pointing it into
            # host RAM would make the host scribble over its own device page
            # or another device's rings.
            return "lies in host RAM"
        try:
            self._owner.card_view.view(addr, nbytes, True)
        except MicError as e:
            return f"unreachable: {e}"
        return None

    def _start_queues(self, used: Sequence[int], features: int) -> None:
        """DRIVER_OK: build a DeviceQueue per vring over the card view (may raise RingError).

        The split ring's used ring is where the card last put it (zeroed
        here); a packed ring is :func:`virtio.devpage.packed_vring` of the
        block the host allocated (the card zeroed its descriptors; the
        device queue writes its own event area).
        """
        mem = self._owner.card_view
        if self.external is not None:
            self._start_external(self.external, mem, used, features)
            return
        is_packed = bool(features & RING_PACKED)
        for i, (vr, ep) in enumerate(zip(self.vrings, self.endpoints, strict=True)):
            q: DeviceQueue | packed.DeviceQueue
            if is_packed:
                q = packed.DeviceQueue(
                    mem, packed_vring(vr.bus, vr.num), features, max_size=MAX_QUEUE_SIZE
                )
            else:
                layout = SplitLayout(vr.num, vr.bus, vr.bus + 16 * vr.num, used[i])
                q = DeviceQueue(mem, layout, features, max_size=MAX_QUEUE_SIZE)
                ring = mem.view(layout.used, layout.used_bytes, True)
                ring[:] = bytes(len(ring))
            q.activate()
            ep.attach(q)
        where = [
            "host" if u == v.default_used else "card"
            for u, v in zip(used, self.vrings, strict=True)
        ]
        self.card_log.info(
            "%s live: features %#x, queues %s, %s",
            self.name,
            features,
            [v.num for v in self.vrings],
            "packed rings" if is_packed else f"used rings {where}",
        )

    def _start_external(
        self, ext: ExternalRings, mem: Memory, used: Sequence[int], features: int
    ) -> None:
        """DRIVER_OK of a device whose backend serves the rings: hand them over."""
        specs = []
        for i, vr in enumerate(self.vrings):
            layout = SplitLayout(vr.num, vr.bus, vr.bus + 16 * vr.num, used[i])
            ring = mem.view(layout.used, layout.used_bytes, True)
            ring[:] = bytes(len(ring))
            specs.append(RingSpec(i, vr.num, layout.desc, layout.avail, layout.used))
        ext.start_rings(self, mem, specs, features)
        self.card_log.info(
            "%s live (rings served by the backend): features %#x, queues %s",
            self.name,
            features,
            [v.num for v in self.vrings],
        )

    def stop_queues(self, state: EndpointState, reason: str) -> None:
        """Detach every queue from its ring (requests in flight fail or park)."""
        for ep in self.endpoints:
            ep.detach(state, reason)
        if self.external is not None:
            self.external.stop_rings(reason)

    async def _notify_needs_reset(self) -> None:
        if self._owner.config_db < 0:
            return
        async with self._config_lock:
            if self.state is not VopDeviceState.ACTIVE:
                return
            try:
                await self._config_handshake(
                    MicConfigChange.CONFIG_CHANGE, self._owner.config_timeout
                )
            except MicTimeoutError as e:
                self.card_log.warning(
                    "card did not acknowledge NEEDS_RESET of %s: %s", self.name, e
                )

    async def _config_handshake(self, kind: MicConfigChange, limit: float) -> None:
        """Run one host-initiated handshake; the caller holds ``_config_lock``.

        The fields are cleared whatever happens (by the core, on the ack or
        when we stop waiting).

        Raises:
            MicTimeoutError: no ``guest_ack`` within ``limit`` seconds.
        """
        self._act(self.hs.receive(StartConfigChange(kind, self._owner.config_db)))
        try:
            async with asyncio.timeout(limit):
                while self.hs.config_pending:
                    self._ctrl_event.clear()
                    # The card rings c2h after guest_ack; re-check every
                    # 100 ms anyway for a card that does not (Linux polls).
                    try:
                        async with asyncio.timeout(_CONFIG_POLL):
                            await self._ctrl_event.wait()
                    except TimeoutError:
                        self._act(self.hs.receive(_TICK))
        except TimeoutError as e:
            raise MicTimeoutError(
                f"{self.name}: card did not acknowledge config change {kind.name} within {limit} s"
            ) from e
        finally:
            if self.hs.config_pending:
                self._act(self.hs.receive(TimedOut()))

    # -- resets ----------------------------------------------------------------
    async def _drain(self) -> None:
        limit = self._owner.drain_timeout
        try:
            async with asyncio.timeout(limit):
                for ep in self.endpoints:
                    await ep.drain()
                if self.external is not None:
                    await self.external.drain_rings()
        except TimeoutError:
            self.card_log.warning(
                "%s: backend still holds stale requests after %s s; resetting anyway",
                self.name,
                limit,
            )

    def _zero_rings(self) -> None:
        """Zero each host-RAM vring and ``info.avail_idx`` (the magic stays).

        Linux zeroes the vringh indices and ``avail_idx`` on reset, and the
        ring core's ``reset()`` does not clear ``used.idx`` in memory, so this
        must. A used ring the card moved into card RAM is left alone: the card
        may already have freed that memory, and it zeroes a used ring itself
        whenever it allocates one.
        """
        ram = self._owner.host_ram
        for vr in self.vrings:
            ram[vr.offset : vr.info + 2] = bytes(vr.info + 2 - vr.offset)

    async def _vdev_reset(self) -> None:
        """The card asked for a reset (Linux ``vop_virtio_device_reset``)."""
        await self._drain()  # in-flight copies finish before we acknowledge
        self._zero_rings()
        self._act(self.hs.receive(ResetDrained()))
        self.card_log.info("%s reset by the card", self.name)

    async def hard_reset(self) -> None:
        """The card is gone (crash/reset): fail everything, forget the card's state."""
        self.resets += 1
        self.stop_queues(EndpointState.IDLE, "card reset")
        await self._drain()
        self._zero_rings()
        self._act(self.hs.receive(CardGone()))

    # -- removal ---------------------------------------------------------------
    async def remove(self, limit: float) -> None:
        """Hot-remove: stop, drain, cancel the backend, DEV_REMOVE handshake, close.

        Raises:
            MicTimeoutError: the card did not acknowledge (state ZOMBIE).
        """
        async with self._config_lock:
            self.state = VopDeviceState.REMOVING
            self._act(self.hs.receive(Stop()))
            self.stop_queues(EndpointState.CLOSED, "device removed")
            await self._drain()
            if self.task is not None:
                self.task.cancel()
                await asyncio.gather(self.task, return_exceptions=True)
            listening = 0 <= self._owner.config_db < H2C_DOORBELLS
            try:
                if listening:
                    await self._config_handshake(MicConfigChange.DEV_REMOVE, limit)
            except MicTimeoutError:
                self.state = VopDeviceState.ZOMBIE
                raise
            finally:
                await self.close_backend()
            self.state = VopDeviceState.REMOVED

    async def close_backend(self) -> None:
        """Close the backend (errors are logged: the device is going anyway)."""
        try:
            await self.backend.aclose()
        except (OSError, MicError) as e:
            self.card_log.warning("closing backend %s: %s", self.name, e)

    # -- stats -----------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """A JSON-ready snapshot of this device: VOP's counters (``doorbells``: the
        card's doorbell is per device), each queue's, and the backend's own
        (``backend``: its ``stats()``, e.g. block I/O errors, console drops)."""
        backend_stats = getattr(self.backend, "stats", None)
        return {
            "name": self.name,
            "type": self.device_type,
            "state": self.state.value,
            "status": self.machine.status,
            "dev_state": self.machine.state.value,
            "offered": self.offered,
            "features": self.machine.features,
            "ring": "packed" if self.machine.features & RING_PACKED else "split",
            "slot": self.view.offset,
            "c2h_db": self.c2h_db,
            "h2c_db": self.view.ctrl(Ctrl.H2C_VDEV_DB),
            "doorbells": self.doorbells,
            "card_interrupts": self.card_interrupts,
            "config_interrupts": self.config_interrupts,
            "errors": self.errors,
            "resets": self.resets,
            "last_error": self.last_error,
            "queues": [ep.stats() for ep in self.endpoints],
            "backend": backend_stats() if callable(backend_stats) else {},
        }
