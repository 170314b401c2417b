"""One device the card's virtio bus found: its probe, queues, and the handshake adapter.

Owns :class:`CardDevice`: the asyncio side of the card half of
:mod:`virtio.handshake` (feed it events, perform the stores and doorbells it
returns, bound every wait with ``asyncio.timeout`` and report
:class:`~virtio.errors.MicTimeoutError`), the virtio probe sequence (virtio
1.2 §3.1.1; Linux ``vop_main.c`` ``vop_find_vqs``/``vop_reset``), the
driver-side queues, and the card RAM the device holds. Also the protocols
around it: :class:`CardPlatform` (what the bus needs from ``transport``),
:class:`Driver` (what the bus binds), :class:`BusOwner` (what a device uses
of its bus) and the :class:`CardRamAllocator`.

Must not import :mod:`mic_card.bus.devices` (the owner), the drivers,
``transport`` or ``mic_host``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

from mic_card.endpoint import AnyDriverQueue, DriverEndpoint
from virtio import packed
from virtio.constants import MIC_MAGIC, MIC_VIRTIO_RING_ALIGN, DeviceStatus, Feature
from virtio.devpage import (
    C2H_DOORBELLS,
    MAX_QUEUE_SIZE,
    RING_PACKED,
    TRANSPORT_FEATURES,
    Ctrl,
    EntryView,
    packed_vring,
    vring_info_offset,
)
from virtio.errors import (
    BrokenResourceError,
    LocalProtocolError,
    MicError,
    MicTimeoutError,
    RemoteProtocolError,
)
from virtio.handshake import (
    Action,
    CardHandshake,
    CardState,
    Doorbell,
    Event,
    MoveUsedRings,
    Publish,
    PublishStatus,
    PublishType,
    PublishUsedAddress,
    RequestReset,
    RingPeer,
    StatusAcked,
    Tick,
    TimedOut,
    WriteStatus,
    publish,
)
from virtio.layouts import DeviceEntry, MicVringInfo, field_offset
from virtio.memory import FirstFitAllocator, Memory
from virtio.split import DESC_SIZE, DriverQueue, SplitLayout

__all__ = [
    "CARD_TRANSPORT_FEATURES",
    "BusOwner",
    "CardDevice",
    "CardPlatform",
    "CardRamAllocator",
    "Driver",
    "DriverFactory",
]

log = logging.getLogger("mic_card.bus")

#: Transport features the card's virtio core supports: the packed ring too,
#: taken whenever the host offers it (a device configured ``ring = "packed"``).
CARD_TRANSPORT_FEATURES = TRANSPORT_FEATURES | RING_PACKED
_POLL = 0.05  # fallback re-check period while waiting for a handshake
_AWAITING = frozenset(
    {CardState.AWAIT_STATUS_ACK, CardState.AWAIT_RESET_ACK, CardState.AWAIT_USED_ACK}
)


class CardPlatform(Protocol):
    """What the bus needs from the PCIe emulation (``transport``), card side."""

    @property
    def mem(self) -> Memory:
        """Card-physical memory: card RAM and host RAM through SMPT windows."""

    @property
    def dp_address(self) -> int:
        """Card-physical address of the device page (from SPAD14/15)."""

    def card_ram_alloc(self, size: int, align: int) -> int:
        """Allocate card RAM; returns its card-physical address."""

    def card_ram_free(self, addr: int) -> None:
        """Free what :meth:`card_ram_alloc` returned."""

    def ring_host(self, db: int) -> None:
        """Ring card->host doorbell ``db`` (0..3)."""


class CardRamAllocator(FirstFitAllocator):
    """First-fit allocator over card-physical ``[start, end)`` (a card process's heap),
    in 64 B granules (the X100 DMA granule)."""

    GRANULE = 64

    def __init__(self, start: int, end: int) -> None:
        """Raises: LocalProtocolError: an empty or misaligned range."""
        if end <= start:
            raise LocalProtocolError(f"bad card RAM range [{start:#x}, {end:#x})")
        super().__init__(start, end, granule=self.GRANULE, what="card RAM")


class Driver(Protocol):
    """A card virtio driver bound to one :class:`CardDevice`.

    Constructed with the live device (queues set up, DRIVER_OK written).
    ``FEATURES`` are the device-specific bits it supports; a driver whose acks
    depend on the device may instead define a classmethod
    ``supported_features(dev: CardDevice) -> int`` (called before FEATURES_OK,
    config space and ``dev.bus.params`` readable; it may raise
    RemoteProtocolError).
    """

    FEATURES: ClassVar[int]

    def config_changed(self) -> None:
        """The host changed the config space (``config_change = 2``)."""

    def detach(self, exc: BrokenResourceError) -> None:
        """The device is going away (removed, reset, NEEDS_RESET): stop, fail waiters."""


DriverFactory = Callable[["CardDevice"], Driver]


class RawClient(Protocol):
    """What holds a device instead of a driver while an app claims it
    (:class:`mic_card.bus.claim.ClaimedDevice`): it hears what a driver would."""

    def on_interrupt(self) -> None:
        """The host rang the device's h2c doorbell."""

    def config_changed(self) -> None:
        """The host changed the config space."""

    def detach(self, exc: BrokenResourceError) -> None:
        """The device is going away (reset, removed, released): fail every waiter."""


class BusOwner(Protocol):
    """What a :class:`CardDevice` uses of the bus it sits on (``VirtioBus``)."""

    @property
    def platform(self) -> CardPlatform: ...

    @property
    def timeout(self) -> float:
        """Bound of every handshake wait, seconds (Linux: 10 s)."""

    @property
    def indirect_max(self) -> int: ...

    @property
    def extra_acks(self) -> int:
        """Fault injection: feature bits acked beyond the offer."""

    @property
    def params(self) -> dict[str, Any]:
        """Boot parameters drivers read (``params["net"]``)."""

    def ring(self, db: int) -> None:
        """Ring card->host doorbell ``db`` (failures are logged, not raised)."""

    def pick_h2c(self) -> int:
        """The least used host->card doorbell for a new device."""


class CardDevice:
    """One device the bus found: entry accessors, handshakes, queues, bound driver.

    Drivers use :attr:`endpoints`, :attr:`features`, :meth:`read_config`,
    :meth:`alloc`/:meth:`free` (card RAM) and :attr:`mem`. The protocol rules
    live in :attr:`hs` (:class:`virtio.handshake.CardHandshake`).
    """

    def __init__(self, bus: BusOwner, page: memoryview, offset: int, entry: DeviceEntry) -> None:
        self.bus = bus
        self.offset = offset
        self.type = entry.type
        self.num_vq = entry.num_vq
        self.feature_len = entry.feature_len
        self.config_len = entry.config_len
        self.queue_sizes = [v.num for v in entry.vqconfigs]
        self.name = ""
        self.state = "probing"
        self.features = 0
        self.offered = entry.host_features
        self.h2c_db = -1
        self.c2h_db = -1
        self.endpoints: list[DriverEndpoint] = []
        self.driver: Driver | None = None
        #: the registered name of the bound driver (``virtio-blk``), or of the
        #: last one that failed to probe
        self.driver_name = ""
        #: the app holding a claim on the device (``card.claim``), and its handle
        self.holder = ""
        self.raw: RawClient | None = None
        self.used_in_card = False
        self.error = ""
        self._allocs: list[int] = []
        self._event = asyncio.Event()
        #: live accessors to the entry (dimensions from our validated parse)
        self.view = EntryView(page, offset, entry.num_vq, entry.feature_len, entry.config_len)
        self.hs = CardHandshake(self.view)
        self._mv = self.view.raw

    # -- accessors (offsets from the parsed dimensions) ---------------------------
    @property
    def mem(self) -> Memory:
        return self.bus.platform.mem

    @property
    def status(self) -> int:
        return self.view.status

    @status.setter
    def status(self, value: int) -> None:
        self.view.status = value

    @property
    def entry_type(self) -> int:
        return self.view.device_type

    def host_features(self) -> int:
        return self.view.host_features

    def read_config(self) -> bytes:
        """The device's config space as it is now (one copy)."""
        return self.view.config

    def alloc(self, size: int, align: int = 64) -> int:
        """Card RAM for buffers (card-physical address)."""
        return self.bus.platform.card_ram_alloc(size, align)

    def free(self, addr: int) -> None:
        self.bus.platform.card_ram_free(addr)

    # -- doorbells and the handshake adapter -----------------------------------------
    def _notify_host(self) -> None:
        if 0 <= self.c2h_db < C2H_DOORBELLS:
            self.bus.ring(self.c2h_db)

    def on_interrupt(self) -> None:
        """The host rang this device's h2c doorbell: wake handshakes, serve the queues."""
        self._event.set()
        for ep in self.endpoints:
            ep.on_interrupt()
        if self.raw is not None:
            self.raw.on_interrupt()

    def act(self, actions: list[Action]) -> list[Action]:
        """Perform the core's stores and doorbells in order; return the other actions
        (answers and requests) for the caller."""
        rest: list[Action] = []
        for a in actions:
            match a:
                case Publish() | PublishStatus() | PublishType() | PublishUsedAddress():
                    publish(self.view, a)
                case RingPeer():
                    self._notify_host()
                case _:
                    rest.append(a)
        return rest

    async def _handshake(self, start: Event, what: str) -> Action:
        """Start a card-initiated handshake and wait for the host's answer.

        Raises:
            MicTimeoutError: no answer within the bus timeout.
            RemoteProtocolError: the host wrote a value it may not.
        """
        self.act(self.hs.receive(start))
        timeout = self.bus.timeout
        look: Event = Tick()
        try:
            async with asyncio.timeout(timeout):
                while True:
                    self._event.clear()
                    if answer := self.act(self.hs.receive(look)):
                        return answer[0]
                    try:
                        async with asyncio.timeout(_POLL):
                            await self._event.wait()
                        look = Doorbell()
                    except TimeoutError:
                        look = Tick()  # Linux polls; a host may not ring
        except TimeoutError as e:
            raise MicTimeoutError(
                f"{self.name or self.offset}: host did not {what} in {timeout} s"
            ) from e
        finally:
            if self.hs.state in _AWAITING:
                self.hs.receive(TimedOut())

    async def _set_status(self, value: int) -> int:
        """Write ``status`` and wait for the host to apply it; return the status it published."""
        answer = await self._handshake(WriteStatus(value), f"acknowledge status {value:#x}")
        return answer.status if isinstance(answer, StatusAcked) else self.status

    async def vdev_reset(self) -> None:
        """Linux ``vop_reset``: ``host_ack = 0``, ``vdev_reset = 1``, ring, wait ``host_ack``.

        Raises:
            MicTimeoutError: the host did not acknowledge.
            RemoteProtocolError: the host wrote a bad ``host_ack``.
        """
        await self._handshake(RequestReset(), "acknowledge the reset")
        self.features = 0

    # -- probe ------------------------------------------------------------------------
    def setup_doorbells(self) -> None:
        """Take the host's c2h doorbell from the entry, pick an h2c one and publish it
        (before any handshake: the host and card ring each other through them).

        Raises:
            RemoteProtocolError: the host's ``c2h_vdev_db`` is outside 0..3.
        """
        c2h = self.view.ctrl(Ctrl.C2H_VDEV_DB)
        if not 0 <= c2h < C2H_DOORBELLS:
            raise RemoteProtocolError(f"c2h_vdev_db {c2h} outside 0..3", reason="device-page")
        self.c2h_db = c2h
        self.h2c_db = self.bus.pick_h2c()
        self.view.set_ctrl(Ctrl.H2C_VDEV_DB, self.h2c_db)

    async def probe(self, supported: int) -> None:
        """Status ACK -> DRIVER -> acks -> FEATURES_OK -> queues -> DRIVER_OK.

        Raises:
            RemoteProtocolError: refused features, bad vring, NEEDS_RESET.
            MicTimeoutError: the host did not answer a handshake.
            ResourceError: out of card RAM.
        """
        bus = self.bus
        self.setup_doorbells()
        if self.status != 0:  # left over from an earlier boot: start clean
            await self.vdev_reset()
        S = DeviceStatus
        st = await self._set_status(S.ACKNOWLEDGE)
        st = await self._set_status(S.ACKNOWLEDGE | S.DRIVER)
        self.offered = self.host_features()
        acks = (self.offered & supported) | bus.extra_acks
        self.view.guest_acks = acks
        st = await self._set_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK)
        if not st & S.FEATURES_OK:
            raise RemoteProtocolError(
                f"host refused features {acks:#x} (offered {self.offered:#x})", reason="features"
            )
        self.features = acks
        self._setup_queues()
        if self.moves_used_rings:
            await self._handshake(MoveUsedRings(), "take the card's used rings")
        st = await self._set_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK)
        if st & S.DEVICE_NEEDS_RESET or not st & S.DRIVER_OK:
            raise RemoteProtocolError(f"host did not accept DRIVER_OK (status {st:#x})")
        self.state = "live"

    @property
    def packed(self) -> bool:
        """VIRTIO_F_RING_PACKED was negotiated: every queue is a packed ring."""
        return bool(self.features & RING_PACKED)

    @property
    def moves_used_rings(self) -> bool:
        """The used rings go to card RAM (``used_in_card``, split rings only: a
        packed ring has no used ring to move)."""
        return self.used_in_card and not self.packed

    def _setup_queues(self) -> None:
        imax = self.bus.indirect_max if self.features & Feature.INDIRECT_DESC else 0
        for i in range(self.num_vq):
            q, n_ind = self.make_queue(i, imax)
            self.endpoints.append(DriverEndpoint(q, self._notify_host, i, indirect_max=n_ind))

    def make_queue(self, i: int, indirect_max: int = 0) -> tuple[AnyDriverQueue[Any], int]:
        """The driver side of virtqueue ``i``: check the host's vring, map it, zero it.

        Every check of a hostile host's ring happens here (size, reachable
        memory, MIC vring magic) and in :class:`~virtio.split.DriverQueue`
        (every used-ring entry). With VIRTIO_F_RING_PACKED negotiated the
        queue is a :class:`virtio.packed.DriverQueue` at
        :func:`virtio.devpage.packed_vring` of the same block. With
        ``used_in_card`` a split ring's used ring moves to card RAM (the
        caller then runs the used-ring handshake). With
        ``indirect_max > 1`` (INDIRECT_DESC negotiated) an indirect-table area
        is allocated. Card RAM taken here is freed by :meth:`release`.
        Returns the queue and its indirect table length (0: none).

        Raises:
            RemoteProtocolError: a bad queue size, an unreachable vring, a wrong
                magic, an unusable ring.
            ResourceError: out of card RAM.
        """
        mem = self.mem
        addr = self.view.vq_address(i)
        num = self.view.vq_num(i)
        if num <= 0 or num & (num - 1) or num > MAX_QUEUE_SIZE:
            raise RemoteProtocolError(f"vq {i}: size {num} not a power of two <= 256")
        info = addr + vring_info_offset(num)
        try:
            magic = int.from_bytes(
                mem.view(info + field_offset(MicVringInfo, "magic"), 4), "little"
            )
        except MicError as e:
            raise RemoteProtocolError(f"vq {i}: vring at {addr:#x} unreachable: {e}") from e
        want = (MIC_MAGIC + self.type + i) & 0xFFFFFFFF
        if magic != want:
            raise RemoteProtocolError(
                f"vq {i}: vring magic {magic:#x}, want {want:#x}", reason="vring-magic"
            )
        layout = SplitLayout.contiguous(addr, num, MIC_VIRTIO_RING_ALIGN)
        if self.moves_used_rings:
            used = self._alloc(layout.used_bytes, 4096)
            mem.view(used, layout.used_bytes, True)[:] = bytes(layout.used_bytes)
            layout = SplitLayout(num, layout.desc, layout.avail, used)
            self.view.set_vq_used_address(i, used)
        n_ind = min(indirect_max, num) if self.features & Feature.INDIRECT_DESC else 0
        area = self._alloc(num * n_ind * DESC_SIZE, 64) if n_ind > 1 else None
        imax = n_ind if area is not None else 0
        try:
            q: AnyDriverQueue[Any]
            if self.packed:
                q = packed.DriverQueue(
                    mem,
                    packed_vring(addr, num),
                    self.features,
                    indirect_area=area,
                    indirect_max=imax,
                )
            else:
                q = DriverQueue(mem, layout, self.features, indirect_area=area, indirect_max=imax)
        except LocalProtocolError as e:
            raise RemoteProtocolError(f"vq {i}: host gave an unusable ring: {e}") from e
        return q, n_ind if area is not None else 0

    async def move_used_rings(self) -> None:
        """Hand the card's used rings to the host (``used_in_card``; before DRIVER_OK).

        Raises:
            MicTimeoutError: the host did not answer.
            RemoteProtocolError: the host wrote a bad answer.
        """
        await self._handshake(MoveUsedRings(), "take the card's used rings")

    async def set_status(self, value: int) -> int:
        """Write ``status`` and wait for the host to apply it (the ``host_ack``
        handshake); returns the status the host published.

        Raises:
            MicTimeoutError: the host did not answer.
            RemoteProtocolError: the host wrote a value it may not.
        """
        return await self._set_status(value)

    def alloc_tracked(self, size: int, align: int = 64) -> int:
        """Card RAM freed with the device's own (:meth:`release`, after a reset).

        Raises:
            ResourceError: card RAM is exhausted.
        """
        return self._alloc(size, align)

    def free_tracked(self, addr: int) -> None:
        """Free what :meth:`alloc_tracked` returned.

        Raises:
            LocalProtocolError: ``addr`` is not a tracked allocation of this device.
        """
        if addr not in self._allocs:
            raise LocalProtocolError(f"{self.name}: {addr:#x} is not card RAM this device holds")
        self._allocs.remove(addr)
        self.bus.platform.card_ram_free(addr)

    def _alloc(self, size: int, align: int) -> int:
        addr = self.bus.platform.card_ram_alloc(size, align)
        self._allocs.append(addr)
        return addr

    def unbind(self, exc: BrokenResourceError, state: str) -> None:
        """Fail everything outstanding and detach the driver (host state untouched)."""
        self.state = state
        for ep in self.endpoints:
            ep.fail(exc)
        if self.raw is not None:
            self.raw.detach(exc)
        if self.driver is not None:
            try:
                self.driver.detach(exc)
            except Exception:  # a driver may be user code (a plug-in): log, carry on
                log.exception("%s: driver %s failed to detach", self.name, self.driver_name)

    def release(self) -> None:
        """Free the card RAM this device holds (after the host stopped using it)."""
        self.endpoints = []
        for addr in self._allocs:
            self.bus.platform.card_ram_free(addr)
        self._allocs.clear()

    def info(self) -> dict[str, Any]:
        """A plain-dict description (JSON-ready)."""
        return {
            "name": self.name,
            "type": self.type,
            "offset": self.offset,
            "state": self.state,
            "status": self.status,
            "offered": self.offered,
            "features": self.features,
            "queue_sizes": list(self.queue_sizes),
            "h2c_db": self.h2c_db,
            "c2h_db": self.c2h_db,
            "used_in_card": self.moves_used_rings,
            "ring": "packed" if self.packed else "split",
            "driver": (self.driver_name or type(self.driver).__name__)
            if self.driver is not None
            else None,
            "driver_class": type(self.driver).__name__ if self.driver is not None else None,
            "holder": self.holder or None,
            "driver_info": _driver_info(self.driver),
            "error": self.error,
            "queues": [ep.stats() for ep in self.endpoints],
        }


def _driver_info(driver: Driver | None) -> dict[str, Any] | None:
    """The driver's own ``info()`` (net: mode, namespace, counters), when it has one."""
    info = getattr(driver, "info", None)
    if not callable(info):
        return None
    try:
        result = info()
    except Exception as e:  # a driver may be user code: a broken info() is shown, not fatal
        return {"error": f"{type(e).__name__}: {e}"}
    return result if isinstance(result, dict) else None
