"""A card's virtio-blk device served by an external vhost-user back-end (qemu-storage-daemon).

Owns :class:`VhostUserBlockBackend`, the ``block`` device with
``backend = "vhost-user"``. The daemon is the vhost-user *front-end* (QEMU's
role): before the device goes on the device page it connects to the
back-end's socket and takes the features and config space from it
(GET_FEATURES, GET_CONFIG); on DRIVER_OK it hands the back-end the card's
memory (SET_MEM_TABLE with the memfds of card RAM and of the SMPT windows,
at their card-physical addresses) and the card's rings, so the back-end
reads and writes the card's buffers itself: no data passes through the
daemon, and no ``DeviceQueue`` is built for the device
(:class:`mic_host.backends.ExternalRings`).

Notifications: the card's c2h doorbell also carries the device-page
handshakes and is shared with other devices (as on the X100), so the
daemon keeps receiving it and relays it to the kick eventfd (one
``eventfd_write`` per doorbell, from the doorbell callback); the back-end's
call eventfd is read by the daemon and raised as the card's interrupt (its
h2c doorbell). Neither path touches the rings.

Failures: a back-end that refuses a request, answers out of turn, signals
its error eventfd or goes away makes the device NEEDS_RESET with a message
naming the socket; the card sees a broken device, other devices and cards
carry on. When the card resets the device, the next DRIVER_OK connects again
(a restarted qemu-storage-daemon serves the card again, if it offers the
same disk). On reset, NEEDS_RESET and removal the rings are taken back with
GET_VRING_BASE and the reset is acknowledged only once every request the
back-end had taken is in the used ring, so it never writes into memory the
card already reused.

Must not import ``mic_host.vop`` (the device is the
:class:`~mic_host.backends.RingHost`), ``mic_host.vhost_user`` or ``mic_card``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from mic_host.backends import BackendContext, RingHost, RingSpec
from mic_host.backends.vhost_user_frontend import VhostUserFrontend, VringSetup, eventfd
from transport.vhost_user.protocol import PROTOCOL_FEATURES_BIT
from virtio.blk import DRIVER_FEATURES, parse_config
from virtio.constants import BlkFeature, DeviceType, Feature
from virtio.devpage import MAX_QUEUE_SIZE, TRANSPORT_FEATURES
from virtio.errors import ConfigError, MicError, RemoteProtocolError
from virtio.layouts import MAX_NUM_VQ
from virtio.memory import Memory

__all__ = ["CONFIG_SIZE", "DEVICE_FEATURES", "QUEUE_SIZE", "SharedMemory", "VhostUserBlockBackend"]

log = logging.getLogger("mic_host.backends.vhost_user")

#: The config space the card reads: ``struct virtio_blk_config`` up to
#: ``write_zeroes_may_unmap`` (what the card's driver parses, and what every
#: qemu-storage-daemon since 5.2 can give).
CONFIG_SIZE = 60
#: Device features passed on to the card (those the card's block driver knows);
#: VOP adds VERSION_1, EVENT_IDX and INDIRECT_DESC, which the back-end must offer.
DEVICE_FEATURES = DRIVER_FEATURES
#: Default ring size: QEMU's ``queue-size`` default, which qemu-storage-daemon's
#: ``seg_max`` (126 = 128 - 2) is derived from.
QUEUE_SIZE = 128
#: How long a stopped ring may take to complete what the back-end had taken.
_DRAIN_LIMIT = 10.0
_DRAIN_POLL = 0.001


class _Range(Protocol):
    @property
    def bus(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def fd(self) -> int: ...
    @property
    def offset(self) -> int: ...


@runtime_checkable
class SharedMemory(Protocol):
    """Card memory another process can map (``transport.space.HostAddressSpace``)."""

    def shared_ranges(self) -> Sequence[_Range]: ...


@dataclass(frozen=True, slots=True)
class _Start:
    host: RingHost
    memory: Memory
    rings: tuple[RingSpec, ...]
    features: int


@dataclass(frozen=True, slots=True)
class _Stop:
    reason: str


@dataclass(slots=True)
class _Vring:
    spec: RingSpec
    kick: int
    call: int
    err: int

    def close(self) -> None:
        for fd in (self.kick, self.call, self.err):
            with contextlib.suppress(OSError):
                os.close(fd)


def _names(bits: int) -> str:
    return ", ".join(f.name or hex(f) for f in Feature if bits & f) or hex(bits)


class VhostUserBlockBackend:
    """A block device whose rings a vhost-user back-end serves (see the module doc).

    ``socket``: the back-end's Unix socket. ``queue_size``: the ring size VOP
    allocates (a power of two <= 256; qemu-storage-daemon's ``seg_max`` of 126
    needs 128). ``label``: how messages name the device (default: the socket).
    ``timeout``: how long the back-end may take to answer one request.
    """

    device_type: int = int(DeviceType.BLOCK)

    def __init__(
        self,
        name: str,
        socket: str,
        *,
        queue_size: int = QUEUE_SIZE,
        label: str = "",
        card: str = "",
        timeout: float = 5.0,
    ) -> None:
        if queue_size <= 0 or queue_size & (queue_size - 1) or queue_size > MAX_QUEUE_SIZE:
            raise ConfigError(f"queue_size {queue_size}: a power of two <= {MAX_QUEUE_SIZE}")
        self.name = name
        self.socket = str(socket)
        self.queue_size = queue_size
        self.card = card
        self.timeout = timeout
        self.who = label or f"vhost-user disk {self.socket}"
        # what the connection's errors say: the disk, and always the socket
        self._fe_label = self.who if not label else f"{label} (back-end {self.socket})"
        self._fe: VhostUserFrontend | None = None
        self._offered = 0
        self._config = b""
        self._nq = 1
        self._cmds: asyncio.Queue[_Start | _Stop] = asyncio.Queue()
        self._host: RingHost | None = None
        self._memory: Memory | None = None
        self._vrings: list[_Vring] = []
        self._kicks: tuple[int, ...] = ()
        self._log = log
        # counters (stats)
        self.kicks = 0
        self.interrupts = 0
        self.starts = 0
        self.reconnects = 0
        self.errors = 0
        self.last_error = ""

    # -- opening: what the back-end offers --------------------------------------------
    async def _connect(self) -> VhostUserFrontend:
        try:
            fe = await VhostUserFrontend.connect(
                self.socket, label=self._fe_label, timeout=self.timeout
            )
        except MicError as e:
            raise ConfigError(str(e)) from e
        fe.add_lost_callback(self._lost)
        return fe

    async def aopen(self) -> None:
        """Connect, check what the back-end offers, read its config space.

        Raises:
            ConfigError: nobody listens on the socket, or the back-end lacks
                what VOP offers the card (VERSION_1, EVENT_IDX, INDIRECT_DESC,
                a config space, a ``seg_max`` that fits ``queue_size``).
        """
        fe = await self._connect()
        try:
            missing = TRANSPORT_FEATURES & ~fe.features
            if missing:
                raise ConfigError(
                    f"{self._fe_label}: the back-end does not offer {_names(missing)}, "
                    "which VOP offers every card"
                )
            try:
                config = await fe.get_config(CONFIG_SIZE)
                cfg = parse_config(config)
            except MicError as e:
                raise ConfigError(f"{self._fe_label}: config space: {e}") from e
            nq = 1
            if fe.features & BlkFeature.MQ and int(cfg.num_queues) > 1:
                nq = int(cfg.num_queues)
            if nq > min(MAX_NUM_VQ, fe.queue_num):
                raise ConfigError(
                    f"{self._fe_label}: {nq} queues; VOP gives a device at most "
                    f"{min(MAX_NUM_VQ, fe.queue_num)}"
                )
            seg_max = int(cfg.seg_max)
            if fe.features & BlkFeature.SEG_MAX and seg_max + 2 > self.queue_size:
                raise ConfigError(
                    f"{self._fe_label}: the back-end's seg_max {seg_max} needs rings of at least "
                    f"{seg_max + 2} entries; queue_size is {self.queue_size}"
                )
        except BaseException:
            await fe.aclose()
            raise
        self._fe, self._offered, self._config, self._nq = fe, fe.features, config, nq

    async def _reconnect(self) -> VhostUserFrontend:
        """A new connection for a device whose back-end went away; same disk or refused."""
        fe = await self._connect()
        try:
            same = fe.features == self._offered and await fe.get_config(CONFIG_SIZE) == self._config
        except BaseException:
            await fe.aclose()
            raise
        if not same:
            await fe.aclose()
            raise RemoteProtocolError(
                f"{self.who}: the back-end came back with another disk (features or config "
                "differ); detach the device and attach it again",
                reason="vhost-user",
            )
        self.reconnects += 1
        self._log.info("%s: reconnected to the vhost-user back-end", self.who)
        return fe

    def _lost(self, reason: str) -> None:
        live = bool(self._vrings)
        self._log.error("%s: vhost-user back-end lost: %s", self.who, reason)
        if live and self._host is not None:
            self._fault(self._host, f"vhost-user back-end lost: {reason}")

    def _fault(self, host: RingHost, reason: str) -> None:
        self.errors += 1
        self.last_error = reason
        host.ring_fault(f"{self.who}: {reason}")

    # -- Backend ------------------------------------------------------------------------
    def features(self) -> int:
        return self._offered & DEVICE_FEATURES

    def config_bytes(self) -> bytes:
        return self._config

    def queue_sizes(self) -> Sequence[int]:
        return [self.queue_size] * self._nq

    async def run(self, ctx: BackendContext) -> None:
        """Carry out ring hand-overs and take-backs, in order, until cancelled."""
        self._log = ctx.log
        while True:
            cmd = await self._cmds.get()
            try:
                match cmd:
                    case _Start():
                        await self._start(cmd)
                    case _Stop():
                        await self._stop()
            finally:
                self._cmds.task_done()

    async def aclose(self) -> None:
        for v in self._vrings:
            self._unwatch(v)
            v.close()
        self._vrings, self._kicks = [], ()
        if self._fe is not None:
            await self._fe.aclose()

    def stats(self) -> dict[str, Any]:
        fe = self._fe
        return {
            "socket": self.socket,
            "connected": fe is not None and fe.lost is None,
            "offered": self._offered,
            "rings": len(self._vrings),
            "kicks": self.kicks,
            "interrupts": self.interrupts,
            "starts": self.starts,
            "reconnects": self.reconnects,
            "errors": self.errors,
            "last_error": self.last_error,
        }

    # -- ExternalRings ----------------------------------------------------------------
    def start_rings(
        self, host: RingHost, memory: Memory, rings: Sequence[RingSpec], features: int
    ) -> None:
        self._host = host
        self._cmds.put_nowait(_Start(host, memory, tuple(rings), features))

    def stop_rings(self, reason: str) -> None:
        self._cmds.put_nowait(_Stop(reason))

    async def drain_rings(self) -> None:
        await self._cmds.join()

    def kick(self) -> None:
        self.kicks += 1
        for fd in self._kicks:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_write(fd, 1)

    # -- the work ---------------------------------------------------------------------
    def _check_rings(self, memory: Memory, rings: Sequence[RingSpec]) -> Sequence[_Range]:
        if not isinstance(memory, SharedMemory):
            raise ConfigError(f"{self.who}: the card's memory cannot be shared")
        ranges = memory.shared_ranges()
        for r in rings:
            parts = (
                ("descriptor table", r.desc, 16 * r.num),
                ("avail ring", r.avail, 6 + 2 * r.num),
                ("used ring", r.used, 6 + 8 * r.num),
            )
            for what, addr, n in parts:
                if not any(g.bus <= addr and addr + n <= g.bus + g.size for g in ranges):
                    raise RemoteProtocolError(
                        f"queue {r.index}: {what} at {addr:#x} is outside the memory the "
                        "back-end can map (card RAM and read-write SMPT windows)",
                        reason="vhost-user",
                    )
        return ranges

    async def _start(self, cmd: _Start) -> None:
        host = cmd.host
        if self._vrings:  # VOP always stops first; never leave rings behind anyway
            await self._stop()
        try:
            if not cmd.features & Feature.VERSION_1:
                raise RemoteProtocolError(
                    "the card's driver did not accept VERSION_1; vhost-user back-ends "
                    "require it (qemu-storage-daemon drops the connection without it)",
                    reason="vhost-user",
                )
            ranges = self._check_rings(cmd.memory, cmd.rings)
            self._memory = cmd.memory
            fe = self._fe
            if fe is None or fe.lost is not None:
                if fe is not None:
                    await fe.aclose()
                self._fe = None
                fe = self._fe = await self._reconnect()
            await fe.set_features((cmd.features & self._offered) | PROTOCOL_FEATURES_BIT)
            await fe.set_mem_table([(g.bus, g.size, g.fd, g.offset) for g in ranges])
            for spec in cmd.rings:
                v = _Vring(spec, eventfd(), eventfd(), eventfd())
                self._vrings.append(v)
                self._watch(host, v)
                await fe.start_vring(
                    VringSetup(
                        spec.index,
                        spec.num,
                        spec.desc,
                        spec.avail,
                        spec.used,
                        v.kick,
                        v.call,
                        v.err,
                    )
                )
            self._kicks = tuple(v.kick for v in self._vrings)
            self.starts += 1
            # a doorbell the card rang before the kick fds were in place is not lost
            self.kick()
        except (MicError, OSError) as e:
            self._fault(host, str(e))

    def _watch(self, host: RingHost, v: _Vring) -> None:
        loop = asyncio.get_running_loop()
        index = v.spec.index

        def on_call() -> None:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(v.call)
            self.interrupts += 1
            host.ring_interrupt()

        def on_err() -> None:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(v.err)
            self._fault(host, f"the vhost-user back-end reported an error on queue {index}")

        loop.add_reader(v.call, on_call)
        loop.add_reader(v.err, on_err)

    @staticmethod
    def _unwatch(v: _Vring) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(v.call)
        loop.remove_reader(v.err)

    async def _stop(self) -> None:
        vrings, self._vrings, self._kicks = self._vrings, [], ()
        if not vrings:
            return
        fe = self._fe
        try:
            for v in vrings:
                self._unwatch(v)
                if fe is None or fe.lost is not None:
                    continue
                try:
                    base = await fe.stop_vring(v.spec.index)
                except MicError as e:
                    self._log.warning("%s: taking back queue %d: %s", self.who, v.spec.index, e)
                    continue
                await self._wait_used(v, base)
        finally:
            for v in vrings:
                v.close()

    async def _wait_used(self, v: _Vring, base: int) -> None:
        """Until the used index reaches ``base`` (every request the back-end took is
        back), polled: the call eventfd is no longer the back-end's."""
        memory = self._memory
        if memory is None:
            return
        deadline = time.monotonic() + _DRAIN_LIMIT
        want = base & 0xFFFF
        while True:
            try:
                idx = int.from_bytes(memory.view(v.spec.used + 2, 2), "little")
            except (MicError, ValueError):  # unreachable, or the card's memory is gone
                return
            if idx == want:
                return
            if time.monotonic() > deadline:
                self._log.warning(
                    "%s: queue %d: the back-end still holds %d requests after %s s",
                    self.who,
                    v.spec.index,
                    (want - idx) & 0xFFFF,
                    _DRAIN_LIMIT,
                )
                return
            await asyncio.sleep(_DRAIN_POLL)
