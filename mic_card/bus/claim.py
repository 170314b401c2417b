"""Raw device access for driver authors: ``async with card.claim(name) as dev:``.

The card's equivalent of Linux VFIO/uio or DPDK's virtio-user: an app takes a
device away from its driver and drives it itself, so a new driver can be
written and tested inside a test file. Owns :func:`claim_device` (the context
manager behind ``card.claim``), :class:`ClaimedDevice` (what the app gets:
feature negotiation, status writes, config space, card RAM, virtqueues) and
:class:`RawQueue` (one virtqueue: the driver-side ring core with a doorbell
kick and interrupt wait/callback).

The life of a claim:

1. entering unbinds the device's driver (its requests fail with
   BrokenResourceError) and resets the device through the vdev-reset
   handshake, so the host's backend starts clean; the device is listed
   ``claimed`` with the holder's name (``micctl devices``);
2. the app negotiates as a driver would (virtio 1.2 §3.1.1)::

       async with card.claim("vda") as dev:
           await dev.negotiate(wanted_features)   # ACKNOWLEDGE, DRIVER, acks, FEATURES_OK
           (q,) = await dev.setup_queues()       # the host's vrings, checked and mapped
           await dev.driver_ok()
           buf = dev.alloc(4096)                 # card RAM for buffers
           q.ring.add([(hdr, 16)], [(buf, 512), (st, 1)], token="read0")
           q.publish()                           # avail.idx store, kick if the ring says so
           token, length = await q.get_used()    # waits for the host's interrupt

3. leaving the block (normally, by an exception, or by cancellation) fails
   the queues, resets the device, frees the card RAM the claim held and
   binds the type's default driver again. That release runs to its end even
   if the app is cancelled again meanwhile.

The hostile-peer rules stay: queues are the ring core
(:class:`virtio.split.DriverQueue`) itself, so every used-ring entry the
host writes is checked (id in range and outstanding, ``used.idx`` not moved
too far, length clamped to the chain's writable size) and a violation raises
:class:`~virtio.split.RingError` and latches the queue broken; the vring the
host offers is checked before it is mapped (size, reachable, MIC magic).
Nothing here has a fast path around those checks.

A claim on a device another app holds is refused with
:class:`~mic_card.bus.registry.DeviceBusyError` naming the holder. Must not
import the drivers, ``transport`` or ``mic_host``; runs on the card's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from mic_card.bus.device import CardDevice
from mic_card.bus.devices import VirtioBus
from mic_card.endpoint import AnyDriverQueue
from virtio.constants import DeviceStatus
from virtio.errors import (
    BrokenResourceError,
    ClosedResourceError,
    LocalProtocolError,
    RemoteProtocolError,
)
from virtio.memory import Memory

__all__ = ["ClaimedDevice", "RawQueue", "claim_device"]

log = logging.getLogger("mic_card.bus")

_S = DeviceStatus
#: releases still running after their claimant was cancelled (kept referenced)
_RELEASING: set[asyncio.Task[None]] = set()


class RawQueue:
    """One virtqueue of a claimed device: the ring core, the doorbell, the interrupt.

    - :attr:`ring` is the driver side of the split ring
      (:class:`virtio.split.DriverQueue`, or :class:`virtio.packed.DriverQueue`
      when the claim acked VIRTIO_F_RING_PACKED): ``add(readable, writable, token)``
      writes a chain, ``publish()`` exposes it and says whether to kick,
      ``get_used()`` returns ``(token, length)`` of a completed chain (or None),
      ``disable_interrupts()``/``enable_interrupts()`` suppress interrupts.
      Buffers are card-physical addresses (:meth:`ClaimedDevice.alloc`).
    - :meth:`kick` rings the device's card->host doorbell; :meth:`publish` is
      ``ring.publish()`` plus the kick it asks for.
    - :meth:`wait_interrupt` waits for the host's next interrupt;
      :attr:`on_interrupt`, if set, is called on each one (on the card's
      loop; what it raises is logged, never propagated to the bus);
      :meth:`get_used` waits until a chain completes.
    """

    def __init__(
        self, dev: CardDevice, index: int, ring: AnyDriverQueue[Any], indirect_max: int
    ) -> None:
        self._dev = dev
        self.index = index
        self.ring = ring
        self.size = ring.size
        #: longest indirect table a chain may use (0: INDIRECT_DESC not in use)
        self.indirect_max = indirect_max
        #: called on every interrupt of the device (after waiters are woken)
        self.on_interrupt: Callable[[], None] | None = None
        self.kicks = 0
        self.interrupts = 0
        self._irq = asyncio.Event()
        self._exc: BrokenResourceError | None = None

    def _check(self) -> None:
        if self._exc is not None:
            raise BrokenResourceError(f"queue {self.index}: {self._exc}") from self._exc

    def kick(self) -> None:
        """Ring the device's doorbell (the host then reads the avail ring).

        Raises:
            BrokenResourceError: the claim ended or the device went away.
        """
        self._check()
        self.kicks += 1
        self._dev._notify_host()

    def publish(self) -> bool:
        """Expose the chains added since the last publish; kick if the ring says the
        device wants it (EVENT_IDX ``avail_event`` or NO_NOTIFY). Returns whether it kicked.

        Raises:
            BrokenResourceError: the claim ended or the device went away.
        """
        self._check()
        if self.ring.publish():
            self.kick()
            return True
        return False

    async def wait_interrupt(self) -> None:
        """Wait for the host's next interrupt on this device.

        Raises:
            BrokenResourceError: the claim ended or the device went away.
        """
        self._check()
        irq = self._irq
        await irq.wait()
        self._check()

    async def get_used(self) -> tuple[Any, int]:
        """The next completed chain as ``(token, length)``, waiting for interrupts.

        ``length`` is what the host wrote, clamped to the chain's writable size.

        Raises:
            RingError: the host wrote an illegal used ring (the queue is broken).
            QueueBroken: the queue was broken by an earlier RingError.
            BrokenResourceError: the claim ended or the device went away.
        """
        while True:
            self._check()
            irq = self._irq  # taken before looking: an interrupt after the look wakes us
            done = self.ring.get_used()
            if done is not None:
                return done
            await irq.wait()

    def _interrupt(self) -> None:
        self.interrupts += 1
        self._irq.set()
        self._irq = asyncio.Event()
        if self.on_interrupt is not None:
            try:
                self.on_interrupt()
            except Exception:  # app code on the bus's doorbell path: never let it through
                log.exception("%s: queue %d interrupt callback failed", self._dev.name, self.index)

    def _fail(self, exc: BrokenResourceError) -> None:
        if self._exc is None:
            self._exc = exc
        self._irq.set()


class ClaimedDevice:
    """A device an app drives itself (from :func:`claim_device` / ``card.claim``).

    Identity: :attr:`name` (``vda``), :attr:`device_type` (virtio device ID),
    :attr:`num_queues`, :attr:`queue_sizes`, :attr:`holder`.

    Negotiation (virtio 1.2 §3.1.1; each status write is the device page's
    ``host_ack`` handshake): :attr:`offered_features` (what the host offers,
    read live), :meth:`write_status`, :meth:`ack_features`, :meth:`negotiate`
    (the usual sequence up to FEATURES_OK), :meth:`driver_ok`; :attr:`status`
    reads the status the host published; :meth:`read_config` the config space
    (:attr:`config_changes` counts the host's config-change notices, and
    :attr:`on_config_change` is called on each).

    Queues and memory: :meth:`setup_queues` (after FEATURES_OK) gives one
    :class:`RawQueue` per virtqueue; :meth:`alloc`/:meth:`free` hand out card
    RAM for buffers (freed when the claim ends); :attr:`memory` reads and
    writes card-physical addresses. :meth:`reset` resets the device in place
    to start over.

    Every method raises ClosedResourceError once the claim ended, and
    BrokenResourceError once the device went away (hot-removed, host lost).
    """

    def __init__(self, dev: CardDevice) -> None:
        self._dev = dev
        self.name = dev.name
        self.device_type = dev.type
        self.num_queues = dev.num_vq
        self.queue_sizes = list(dev.queue_sizes)
        self.holder = dev.holder
        self.queues: list[RawQueue] = []
        #: the feature bits acked (:meth:`ack_features` / :meth:`negotiate`)
        self.features = 0
        self.config_changes = 0
        #: called when the host changes the config space (on the card's loop)
        self.on_config_change: Callable[[], None] | None = None
        self._buffers: list[int] = []
        self._closed = False
        self._exc: BrokenResourceError | None = None

    # -- RawClient: what the bus tells us ------------------------------------------
    def on_interrupt(self) -> None:
        for q in self.queues:
            q._interrupt()

    def config_changed(self) -> None:
        self.config_changes += 1
        if self.on_config_change is not None:
            try:
                self.on_config_change()
            except Exception:  # app code on the bus's config path: never let it through
                log.exception("%s: config change callback failed", self.name)

    def detach(self, exc: BrokenResourceError) -> None:
        if self._exc is None:
            self._exc = exc
        for q in self.queues:
            q._fail(exc)

    # -- state -----------------------------------------------------------------------
    def _check(self) -> None:
        if self._closed:
            raise ClosedResourceError(f"the claim of {self.name} by {self.holder} has ended")
        if self._exc is not None:
            raise BrokenResourceError(f"{self.name}: {self._exc}") from self._exc

    @property
    def memory(self) -> Memory:
        """Card-physical memory (card RAM and host RAM through SMPT windows), checked."""
        return self._dev.mem

    @property
    def offered_features(self) -> int:
        """The feature bits the host offers (read from the device page now)."""
        return self._dev.host_features()

    @property
    def status(self) -> int:
        """The device status byte as the host last published it."""
        return self._dev.status

    # -- negotiation -------------------------------------------------------------------
    async def write_status(self, value: int) -> int:
        """Write the device status and wait for the host to apply it; returns the
        status the host published (a refused FEATURES_OK comes back cleared).

        Raises:
            MicTimeoutError: the host did not acknowledge within the bus timeout.
            RemoteProtocolError: the host wrote a value it may not.
            ClosedResourceError, BrokenResourceError: see the class.
        """
        self._check()
        return await self._dev.set_status(value)

    def ack_features(self, features: int) -> None:
        """Write the driver's feature acks (``guest_acks``); send them with a status
        write of FEATURES_OK. The host refuses bits it did not offer.

        Raises:
            LocalProtocolError: negative, or wider than 64 bits.
            ClosedResourceError, BrokenResourceError: see the class.
        """
        self._check()
        if not 0 <= features < 1 << 64:
            raise LocalProtocolError(f"{self.name}: features {features:#x} outside 64 bits")
        self._dev.view.guest_acks = features
        self._dev.features = features
        self.features = features

    async def negotiate(self, supported: int) -> int:
        """ACKNOWLEDGE, DRIVER, ack ``offered & supported``, FEATURES_OK; returns the acks.

        Raises:
            RemoteProtocolError: the host refused the features (FEATURES_OK not set).
            MicTimeoutError: the host did not answer a status write.
            ClosedResourceError, BrokenResourceError: see the class.
        """
        await self.write_status(_S.ACKNOWLEDGE)
        await self.write_status(_S.ACKNOWLEDGE | _S.DRIVER)
        acks = self.offered_features & supported
        self.ack_features(acks)
        st = await self.write_status(_S.ACKNOWLEDGE | _S.DRIVER | _S.FEATURES_OK)
        if not st & _S.FEATURES_OK:
            raise RemoteProtocolError(
                f"{self.name}: host refused features {acks:#x} (offered "
                f"{self.offered_features:#x})",
                reason="features",
            )
        return acks

    async def driver_ok(self) -> int:
        """Set DRIVER_OK (after :meth:`setup_queues`); returns the published status.

        Raises:
            RemoteProtocolError: the host did not accept it (or set NEEDS_RESET).
            MicTimeoutError: the host did not answer.
            ClosedResourceError, BrokenResourceError: see the class.
        """
        st = await self.write_status(self.status | _S.DRIVER_OK)
        if st & _S.DEVICE_NEEDS_RESET or not st & _S.DRIVER_OK:
            raise RemoteProtocolError(f"{self.name}: host did not accept DRIVER_OK ({st:#x})")
        return st

    def read_config(self) -> bytes:
        """The device's config space as it is now (one copy; the host may change it).

        Raises:
            ClosedResourceError, BrokenResourceError: see the class.
        """
        self._check()
        return self._dev.read_config()

    # -- queues and memory ------------------------------------------------------------------
    async def setup_queues(self, indirect_max: int = 0) -> list[RawQueue]:
        """Map every virtqueue the host offers (after FEATURES_OK, before DRIVER_OK).

        Each vring is checked first (size a power of two <= 256, reachable,
        MIC vring magic); rings are zeroed. ``indirect_max`` > 1 reserves
        indirect tables when INDIRECT_DESC was acked. With the card's
        used-ring-in-card option the used rings move to card RAM (handshake).

        Raises:
            LocalProtocolError: queues are already set up (:meth:`reset` first).
            RemoteProtocolError: the host offered an unusable vring.
            ResourceError: out of card RAM.
            MicTimeoutError: the host did not take the used rings.
            ClosedResourceError, BrokenResourceError: see the class.
        """
        self._check()
        if self.queues:
            raise LocalProtocolError(f"{self.name}: queues already set up; reset() first")
        queues = []
        for i in range(self.num_queues):
            ring, n_ind = self._dev.make_queue(i, indirect_max)
            queues.append(RawQueue(self._dev, i, ring, n_ind))
        self.queues = queues
        if self._dev.moves_used_rings:
            await self._dev.move_used_rings()
        return list(queues)

    def alloc(self, size: int, align: int = 64) -> int:
        """``size`` bytes of card RAM for buffers; returns the card-physical address.
        Everything still allocated is freed when the claim ends (after the reset).

        Raises:
            ResourceError: card RAM is exhausted.
            ClosedResourceError, BrokenResourceError: see the class.
        """
        self._check()
        addr = self._dev.bus.platform.card_ram_alloc(size, align)
        self._buffers.append(addr)
        return addr

    def free(self, addr: int) -> None:
        """Free a buffer from :meth:`alloc` (the host must no longer use it).

        Raises:
            LocalProtocolError: ``addr`` is not a buffer of this claim.
        """
        if addr not in self._buffers:
            raise LocalProtocolError(f"{self.name}: {addr:#x} is not a buffer of this claim")
        self._buffers.remove(addr)
        self._dev.bus.platform.card_ram_free(addr)

    async def reset(self) -> None:
        """Reset the device in place (vdev reset): queues fail and are dropped, the
        features are cleared; buffers from :meth:`alloc` stay yours. Start again
        with :meth:`negotiate`.

        Raises:
            MicTimeoutError: the host did not acknowledge the reset.
            ClosedResourceError, BrokenResourceError: see the class.
        """
        self._check()
        for q in self.queues:
            q._fail(BrokenResourceError(f"{self.name} was reset by its holder"))
        self.queues = []
        await self._dev.vdev_reset()
        self._dev.release()  # the queues' card RAM (used rings, indirect tables)
        self.features = 0

    # -- end -----------------------------------------------------------------------------
    async def _release(self, bus: VirtioBus) -> None:
        """Give the device back (reset, default driver) and free the buffers."""
        try:
            await bus.give_back(self._dev)
        finally:
            for addr in self._buffers:
                self._dev.bus.platform.card_ram_free(addr)
            self._buffers.clear()


@contextlib.asynccontextmanager
async def claim_device(bus: VirtioBus, name: str, holder: str) -> AsyncIterator[ClaimedDevice]:
    """Claim ``name`` on ``bus`` for ``holder`` (an app's name); see the module docstring.

    Raises (on entry):
        LocalProtocolError: no such device.
        DeviceBusyError: another app holds it (the message names the holder).
        MicTimeoutError: the host did not acknowledge the reset.
    """
    dev = await bus.take(name, holder)
    handle = ClaimedDevice(dev)
    dev.raw = handle
    try:
        yield handle
    finally:
        handle._closed = True
        handle.detach(BrokenResourceError(f"the claim of {name} by {holder} has ended"))
        # Runs to its end even if the holder is cancelled again while it waits.
        task = asyncio.get_running_loop().create_task(handle._release(bus), name=f"release {name}")
        _RELEASING.add(task)
        task.add_done_callback(_RELEASING.discard)
        await asyncio.shield(task)
