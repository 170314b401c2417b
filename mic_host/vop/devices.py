"""The set of VOP devices of one card: add/remove, doorbell dispatch, card reset.

Owns :class:`Vop`: the device page and host RAM allocator of one card
(:mod:`mic_host.vop.page`), its :class:`~mic_host.vop.device.VopDevice` s by
name, the tasks they run (backends, handshakes), the card->host doorbell
dispatch, and the :class:`HostPlatform` protocol it needs from the PCIe
emulation. It is the :class:`~mic_host.vop.device.DeviceOwner` of its devices.

Threading: everything here runs on the host's event loop thread.
:meth:`Vop.on_doorbell` is synchronous and cheap; a daemon that learns about
doorbells on another thread must use ``loop.call_soon_threadsafe``.

Must not import ``transport`` (the platform is the :class:`HostPlatform`
protocol) or ``mic_card``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from mic_host.backends import Backend
from mic_host.backends.datapath import DmaLease, DmaPlatform, SharedDma, lease_dma
from mic_host.endpoint import EndpointState
from mic_host.vop.device import HOST_TRANSPORT_FEATURES, VopDevice, Vring
from mic_host.vop.page import PAGE, DevicePage, HostRamAllocator, vring_alloc_size
from virtio.constants import MIC_DP_SIZE, MIC_MAGIC
from virtio.devpage import (
    C2H_DOORBELLS,
    H2C_DOORBELLS,
    MAX_QUEUE_SIZE,
    RING_PACKED,
    vring_info_offset,
)
from virtio.errors import (
    BrokenResourceError,
    LocalProtocolError,
    MicError,
    MicTimeoutError,
    ResourceError,
)
from virtio.layouts import (
    MAX_FEATURE_LEN,
    MAX_NUM_VQ,
    DeviceEntry,
    MicVringInfo,
    VqConfig,
    field_offset,
)
from virtio.memory import Memory
from virtio.ratelimit import LimitedLogger, LogBudget
from virtio.split import SplitLayout

__all__ = ["HostPlatform", "Vop"]

_log = logging.getLogger("mic_host.vop")

#: offset of ``magic`` in ``struct _mic_vring_info`` (after ``avail_idx`` and padding)
_INFO_MAGIC = field_offset(MicVringInfo, "magic")


class HostPlatform(Protocol):
    """What VOP needs from the PCIe emulation (``transport``), host side."""

    @property
    def host_ram(self) -> memoryview:
        """The host RAM region, writable; the device page lives at offset 0."""

    @property
    def host_ram_bus(self) -> int:
        """Card-physical address at which ``host_ram`` appears (SMPT base)."""

    @property
    def card_view(self) -> Memory:
        """Card-physical addresses as the host reaches them (aperture + host RAM)."""

    def ring_card(self, db: int) -> None:
        """Ring host->card doorbell ``db`` (0..15)."""


class Vop:
    """The VOP layer of one card: device page, devices, backends, doorbells.

    Use as ``async with Vop(platform) as vop:``; it owns every backend task
    and the handshake tasks and cancels them in :meth:`aclose`.
    """

    def __init__(
        self,
        platform: HostPlatform,
        *,
        c2h_doorbells: Sequence[int] = range(C2H_DOORBELLS),
        config_timeout: float = 10.0,
        remove_timeout: float = 15.0,
        drain_timeout: float = 5.0,
        log_budget: LogBudget | None = None,
    ) -> None:
        """``c2h_doorbells``: card->host doorbells VOP may assign to devices.
        ``log_budget``: the card's budget of log lines, which every line the
        card can provoke here goes through (default: one of this VOP's own).

        Raises:
            LocalProtocolError: host RAM too small, or bad doorbell numbers.
        """
        if not c2h_doorbells or any(not 0 <= d < C2H_DOORBELLS for d in c2h_doorbells):
            raise LocalProtocolError(f"c2h doorbells {list(c2h_doorbells)} outside 0..3")
        self.platform = platform
        self._host_ram = platform.host_ram
        if len(self._host_ram) < 2 * PAGE:
            raise LocalProtocolError("host RAM must hold the device page and at least one ring")
        self.page = DevicePage(self._host_ram[:MIC_DP_SIZE])
        self.alloc = HostRamAllocator(PAGE, len(self._host_ram) // PAGE * PAGE)
        self.config_timeout = config_timeout
        self.remove_timeout = remove_timeout
        self.drain_timeout = drain_timeout
        self._c2h = list(c2h_doorbells)
        self._devices: dict[str, VopDevice] = {}
        self._zombies: list[VopDevice] = []
        self._removing: dict[str, VopDevice] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.unknown_doorbells = 0
        self.ring_failures = 0
        self.log_budget = log_budget or LogBudget("vop", _log, time.monotonic)
        self._log = self.log_budget.logger(_log)
        #: the card's DMA engine, running while a device moves data with it
        self.dma = SharedDma(platform.dma) if isinstance(platform, DmaPlatform) else None

    async def __aenter__(self) -> Vop:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- DeviceOwner ---------------------------------------------------------
    @property
    def host_ram(self) -> memoryview:
        return self._host_ram

    @property
    def card_view(self) -> Memory:
        return self.platform.card_view

    @property
    def config_db(self) -> int:
        return self.page.h2c_config_db

    def device_log(self, name: str) -> LimitedLogger:
        return self.log_budget.logger(logging.getLogger(f"mic_host.vop.{name}"))

    def in_host_ram(self, addr: int, length: int) -> bool:
        base = self.platform.host_ram_bus
        return addr < base + len(self._host_ram) and addr + length > base

    def open_dma(self, bounce_size: int) -> AbstractAsyncContextManager[DmaLease]:
        """The card's DMA engine and a bounce buffer in host RAM (``data_path``)."""
        bus = self.platform.host_ram_bus
        return lease_dma(self.dma, self.alloc, self._host_ram, bus, bounce_size)

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        if self._closed:
            coro.close()
            return
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._log.error("VOP task %s failed: %r", task.get_name(), exc, exc_info=exc)

    def ring(self, db: int) -> None:
        try:
            self.platform.ring_card(db)
        except (BrokenResourceError, MicError, OSError) as e:
            self.ring_failures += 1
            self._log.warning("ringing card doorbell %d failed: %s", db, e)

    def on_doorbell(self, db: int) -> None:
        """The card rang card->host doorbell ``db``: serve every device on it.

        Synchronous; call it on the event loop thread (from another thread:
        ``loop.call_soon_threadsafe(vop.on_doorbell, db)``). Never raises for
        anything the card did.
        """
        hit = False
        for dev in list(self._devices.values()):
            if dev.c2h_db == db:
                hit = True
                dev.on_doorbell()
        for dev in (*self._removing.values(), *self._zombies):
            if dev.c2h_db == db:
                dev.on_doorbell()  # answers only the removal's guest_ack
        if not hit:
            self.unknown_doorbells += 1

    # -- devices -----------------------------------------------------------------
    @property
    def devices(self) -> dict[str, VopDevice]:
        return dict(self._devices)

    def device(self, name: str) -> VopDevice:
        """Raises: LocalProtocolError: no such device."""
        try:
            return self._devices[name]
        except KeyError:
            raise LocalProtocolError(f"no device {name!r}") from None

    def _pick_c2h(self) -> int:
        load = dict.fromkeys(self._c2h, 0)
        for dev in (*self._devices.values(), *self._zombies):
            if dev.c2h_db in load:
                load[dev.c2h_db] += 1
        return min(self._c2h, key=lambda d: (load[d], d))

    def add_device(self, backend: Backend, *, packed: bool = False) -> VopDevice:
        """Put ``backend``'s device on the page, start its backend, tell the card.

        ``packed`` also offers VIRTIO_F_RING_PACKED (the device's ``ring =
        "packed"`` option): the card then runs packed rings in the same vring
        blocks (:func:`virtio.devpage.packed_vring`).

        Allocates and zeroes the vrings in host RAM (legacy contiguous layout,
        4096-aligned used ring, ``_mic_vring_info`` after it), writes the entry
        with ``type`` last, and rings the card's config doorbell if it listens
        (hot add). Must be called with a running loop.

        Raises:
            LocalProtocolError: duplicate name, bad queue sizes or config size.
            ResourceError: no room on the device page or in host RAM.
        """
        if self._closed:
            raise LocalProtocolError("VOP is closed")
        name = backend.name
        if name in self._devices:
            raise LocalProtocolError(f"device {name!r} already exists")
        sizes = [int(n) for n in backend.queue_sizes()]
        if not 1 <= len(sizes) <= MAX_NUM_VQ:
            raise LocalProtocolError(f"{name}: {len(sizes)} queues, VOP allows 1..{MAX_NUM_VQ}")
        for n in sizes:
            if n <= 0 or n & (n - 1) or n > MAX_QUEUE_SIZE:
                raise LocalProtocolError(
                    f"{name}: queue size {n} not a power of two <= {MAX_QUEUE_SIZE}"
                )
        config = bytes(backend.config_bytes())
        dtype = int(backend.device_type)
        if not 0 < dtype < 128:
            raise LocalProtocolError(f"{name}: device type {dtype} outside 1..127")
        features = int(backend.features()) | HOST_TRANSPORT_FEATURES
        if packed:
            features |= RING_PACKED
        vrings: list[Vring] = []
        try:
            for i, n in enumerate(sizes):
                size = vring_alloc_size(n)
                off = self.alloc.alloc(size)
                self.host_ram[off : off + size] = bytes(size)
                info = off + vring_info_offset(n)
                magic = info + _INFO_MAGIC
                self.host_ram[magic : magic + 4] = ((MIC_MAGIC + dtype + i) & 0xFFFFFFFF).to_bytes(
                    4, "little"
                )
                bus = self.platform.host_ram_bus + off
                vrings.append(Vring(off, n, bus, SplitLayout.contiguous(bus, n).used, info))
            c2h = self._pick_c2h()
            entry = DeviceEntry(
                type=dtype,
                num_vq=len(sizes),
                feature_len=MAX_FEATURE_LEN,
                config_len=len(config),
                vqconfigs=tuple(VqConfig(v.bus, v.default_used, v.num) for v in vrings),
                config=config,
                host_features=features,
                c2h_vdev_db=c2h,
                h2c_vdev_db=-1,
            )
            view = self.page.add(entry)
        except (LocalProtocolError, ResourceError):
            for v in vrings:
                self.alloc.free(v.offset)
            raise
        dev = VopDevice(self, backend, view, vrings, c2h, packed=packed)
        self._devices[name] = dev
        dev.task = asyncio.get_running_loop().create_task(self._run_backend(dev), name=name)
        self._tasks.add(dev.task)
        dev.task.add_done_callback(self._task_done)
        self._log.info("added %s (type %d) at slot %#x, c2h db %d", name, dtype, view.offset, c2h)
        db = self.page.h2c_config_db
        if 0 <= db < H2C_DOORBELLS:
            self.ring(db)  # hot add: the card rescans the page
        return dev

    async def _run_backend(self, dev: VopDevice) -> None:
        try:
            await dev.backend.run(dev)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a plug-in's bug must not take the daemon down
            dev.errors += 1
            dev.last_error = f"backend crashed: {e!r}"
            dev.card_log.exception("backend %s crashed", dev.name)

    async def remove_device(self, name: str, *, ack_timeout: float | None = None) -> None:
        """Hot-remove ``name``: stop its backend, fail in-flight requests, run the
        DEV_REMOVE handshake (``config_change = 1``, wait ``guest_ack``), free
        the rings and mark the slot ``type = -1``.

        Raises:
            LocalProtocolError: no such device.
            MicTimeoutError: the card did not acknowledge; the device is gone
                from the host's list, but its slot and rings stay reserved
                (the card may still use them) until :meth:`reset_all`.
        """
        dev = self.device(name)
        del self._devices[name]
        self._removing[name] = dev
        try:
            await dev.remove(self.remove_timeout if ack_timeout is None else ack_timeout)
        except MicTimeoutError:
            self._zombies.append(dev)
            self._log.error("card did not acknowledge removal of %s; slot kept until reset", name)
            raise
        finally:
            del self._removing[name]
        self._release(dev)
        self._log.info("removed %s", name)

    def _release(self, dev: VopDevice) -> None:
        self.page.remove(dev.view)
        for v in dev.vrings:
            self.alloc.free(v.offset)

    async def reset_all(self) -> None:
        """The card crashed or was reset: reset every device, fail in-flight I/O,
        free what unacknowledged removals held, and rewrite the device page so
        the booting card finds every device fresh (status 0, no doorbells).
        """
        for z in self._zombies:
            self._release(z)
        self._zombies.clear()
        devs = list(self._devices.values())
        await asyncio.gather(*(d.hard_reset() for d in devs))
        configs = [d.view.config for d in devs]
        self.page.reset()
        for d, config in zip(devs, configs, strict=True):
            entry = DeviceEntry(
                type=d.device_type,
                num_vq=len(d.vrings),
                feature_len=MAX_FEATURE_LEN,
                config_len=len(config),
                vqconfigs=tuple(VqConfig(v.bus, v.default_used, v.num) for v in d.vrings),
                config=config,
                host_features=d.offered,
                c2h_vdev_db=d.c2h_db,
                h2c_vdev_db=-1,
            )
            d.view = self.page.add(entry)
        self._log.info("device page rewritten after card reset (%d devices)", len(devs))

    def stats(self) -> dict[str, Any]:
        """Per device, per queue counters as plain dicts (JSON-ready)."""
        return {
            "h2c_config_db": self.page.h2c_config_db,
            "device_page_free": self.page.free_bytes,
            "host_ram_free": self.alloc.free_bytes,
            "unknown_doorbells": self.unknown_doorbells,
            "ring_failures": self.ring_failures,
            "devices": {name: d.stats() for name, d in self._devices.items()},
            "zombies": [d.name for d in self._zombies],
            "dma_engine": self.dma.stats() if self.dma is not None else None,
        }

    async def aclose(self) -> None:
        """Stop every backend and handshake task and close the backends."""
        if self._closed:
            return
        self._closed = True
        for dev in self._devices.values():
            dev.stop_queues(EndpointState.CLOSED, "VOP closed")
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for dev in (*self._devices.values(), *self._zombies):
            await dev.close_backend()
