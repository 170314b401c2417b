"""A vhost-user back-end serving one MIC-VOP backend to a front-end (QEMU) on a socket.

Owns :class:`VhostUserServer`: it listens on a Unix socket, serves one
front-end connection at a time, and runs the backend (e.g.
:class:`mic_host.backends.block.BlockBackend`, unchanged) over the same
:class:`mic_host.endpoint.QueueEndpoint` objects VOP gives it. What differs
from VOP is only where the rings live and how notifications travel:

- the memory table (SET_MEM_TABLE) is mapped as a
  :class:`transport.vhost_user.GuestMemory`, the ring core's ``Memory``:
  every descriptor access is checked against the regions;
- a ring starts on SET_VRING_KICK once its size, base and addresses are known
  (as libvhost-user does), as a :class:`virtio.split.DeviceQueue` restored at
  the front-end's base index, or with VIRTIO_F_RING_PACKED acked a
  :class:`virtio.packed.DeviceQueue` (addresses and the two-position base:
  :mod:`mic_host.vhost_user.packed`); it stops on GET_VRING_BASE after the requests in
  flight have completed, so the base returned loses nothing;
- the kick eventfd wakes the endpoint; the call eventfd is its interrupt; a
  ring the guest driver breaks is latched broken and reported on the error
  eventfd (SET_VRING_ERR), as QEMU's vhost reports it.

Bad input from the front-end (garbage, truncated messages, missing or extra
fds, bad memory tables, ring addresses outside the regions, a ring smaller
than the queue size the config space was derived from) is logged as one clear
error and drops that connection only: the backend, the image and the
listening socket stay, and the next front-end is served.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Self

from mic_host.backends import Backend
from mic_host.endpoint import EndpointState, QueueEndpoint
from mic_host.vhost_user.context import BackendContext
from mic_host.vhost_user.inflight import InflightRegion
from mic_host.vhost_user.packed import encode_base, packed_layout, start_packed
from mic_host.vhost_user.vring import Vring, VringOwner, listen_unix
from transport.errors import LinkLost
from transport.vhost_user import GuestMemory, Message, ProtocolFeature, Request, VhostUserChannel
from transport.vhost_user import close_fds as _close_fds
from transport.vhost_user.protocol import (
    CONFIG_HDR,
    MAX_MEM_REGIONS,
    PROTOCOL_FEATURES_BIT,
    U64,
    VRING_IDX_MASK,
    VRING_NOFD,
    VRING_STATE,
    VringAddr,
    check_fds,
    decode_config,
    decode_inflight,
    decode_mem_table,
    decode_u64,
    decode_vring_addr,
    decode_vring_state,
)
from virtio import packed
from virtio.constants import Feature
from virtio.errors import LocalProtocolError, MicError, RemoteProtocolError
from virtio.ratelimit import LogBudget
from virtio.split import DeviceQueue, QueueState, SplitLayout

__all__ = ["OFFERED_PROTOCOL_FEATURES", "RING_FEATURES", "VhostUserServer"]

log = logging.getLogger(__name__)

#: Transport features offered on top of the backend's own.
RING_FEATURES = int(
    Feature.VERSION_1 | Feature.EVENT_IDX | Feature.INDIRECT_DESC | Feature.RING_PACKED
)
#: Protocol features offered: QEMU's vhost-user-blk needs CONFIG; MQ lets it ask
#: for the queue count; REPLY_ACK lets it learn that a request failed;
#: INFLIGHT_SHMFD lets a restarted back-end finish what it had taken (:mod:`.inflight`).
OFFERED_PROTOCOL_FEATURES = int(
    ProtocolFeature.MQ
    | ProtocolFeature.REPLY_ACK
    | ProtocolFeature.CONFIG
    | ProtocolFeature.INFLIGHT_SHMFD
)
#: Largest ring a front-end may set up (QEMU's VIRTQUEUE_MAX_SIZE).
VRING_MAX = 1024
#: How long GET_VRING_BASE / a disconnect waits for requests in flight.
DRAIN_TIMEOUT = 30.0
#: Requests that answer with their own reply (REPLY_ACK adds none to these).
_REPLYING = frozenset(
    {
        Request.GET_FEATURES,
        Request.GET_PROTOCOL_FEATURES,
        Request.GET_QUEUE_NUM,
        Request.GET_VRING_BASE,
        Request.GET_CONFIG,
        Request.GET_MAX_MEM_SLOTS,
        Request.GET_INFLIGHT_FD,
    }
)


def _error(msg: str) -> RemoteProtocolError:
    return RemoteProtocolError(msg, reason="vhost-user")


class VhostUserServer:
    """Serve ``backend`` on the Unix socket ``path`` to one front-end at a time.

    ``queue_size`` is the ring size the backend's config space was derived
    from (``seg_max``); a front-end that sets up a smaller ring is refused
    (a request with ``seg_max`` segments could never be added to it).

    An async context manager: entering binds and listens (the socket is
    ready when it returns) and starts the backend; leaving drops the
    connection, stops the backend, closes it and removes the socket.
    """

    #: why the front-end's rings may not be smaller than ``queue_size`` (for errors;
    #: ``{queue_size}`` is filled in)
    ring_size_note = (
        "its seg_max was derived from {queue_size}: set the front-end's queue-size to at least that"
    )

    #: the protocol features offered (a net device must not offer CONFIG: QEMU 7.2's
    #: virtio-net crashes on it)
    protocol_features = OFFERED_PROTOCOL_FEATURES

    def __init__(self, backend: Backend, path: str | os.PathLike[str], *, queue_size: int) -> None:
        self.backend = backend
        self.path = Path(path)
        self.queue_size = queue_size
        # what a front-end or its guest can make us log is bounded
        self.log_budget = LogBudget("vhost-user", log, time.monotonic)
        self._log = self.log_budget.logger(log)
        self.endpoints: list[QueueEndpoint] = []
        self.vrings: list[Vring] = []
        for i in range(len(backend.queue_sizes())):
            owner = VringOwner(self._log)
            vr = Vring(i, QueueEndpoint(owner, i, queue_size))
            owner.vring = vr
            self.vrings.append(vr)
            self.endpoints.append(vr.endpoint)
        self.ctx = BackendContext(backend.name, self.endpoints)
        self._listener: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._backend_task: asyncio.Task[None] | None = None
        self._active: VhostUserChannel | None = None
        self._memory: GuestMemory | None = None
        self._protocol = 0
        self._inflight: InflightRegion | None = None
        self._reply_fds: list[int] = []  # sent with the next reply, then closed
        #: the front-end acked VHOST_USER_F_PROTOCOL_FEATURES (rings then start disabled)
        self.protocol_features_acked = False
        self.connections = 0
        self.dropped = 0

    # -- lifecycle ----------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        self._listener = listen_unix(self.path)
        loop = asyncio.get_running_loop()
        self._backend_task = loop.create_task(self._run_backend(), name="vhost-user-backend")
        self._accept_task = loop.create_task(self._accept(), name="vhost-user-accept")
        return self

    async def __aexit__(
        self,
        et: type[BaseException] | None,
        e: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._accept_task.cancel()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(self._accept_task, *self._tasks, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(OSError):
                self.path.unlink()
        for ep in self.endpoints:
            ep.detach(EndpointState.CLOSED, "server stopped")
        if self._backend_task is not None:
            self._backend_task.cancel()
            await asyncio.gather(self._backend_task, return_exceptions=True)
        await self.backend.aclose()
        self.log_budget.flush(final=True)

    async def _run_backend(self) -> None:
        try:
            await self.backend.run(self.ctx)
        except Exception:  # a backend bug: keep the front-end's view clear
            log.exception("backend %s stopped", self.backend.name)

    async def _accept(self) -> None:
        assert self._listener is not None
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(self._listener)
            if self._active is not None:
                self._log.warning(
                    "vhost-user: a second front-end connected; refused (one at a time)"
                )
                sock.close()
                continue
            task = loop.create_task(self.serve_connection(sock), name="vhost-user-conn")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # -- one connection -----------------------------------------------------------------
    async def serve_connection(self, sock: socket.socket) -> None:
        """Serve one connected front-end (accepted here, or one end of a socketpair)
        until it disconnects or is dropped for bad input; never raises for it.

        Raises:
            LocalProtocolError: another front-end is being served (``sock`` is closed).
        """
        if self._active is not None:
            sock.close()
            raise LocalProtocolError("a vhost-user front-end is already connected")
        ch = VhostUserChannel(sock)
        self._active = ch
        self.connections += 1
        self._log.info("vhost-user front-end connected on %s", self.path)
        try:
            while True:
                msg = await ch.receive()
                if msg is None:
                    self._log.info("vhost-user front-end disconnected")
                    return
                try:
                    await self._dispatch(ch, msg)
                finally:
                    _close_fds(msg.fds)  # handlers take (and clear) the fds they keep
        except RemoteProtocolError as e:
            self.dropped += 1
            self._log.error("vhost-user connection dropped: %s (socket %s)", e, self.path)
        except LinkLost as e:
            self._log.info("vhost-user front-end gone: %s", e)
        except Exception:  # a bug of ours: this connection goes, the server stays
            self.dropped += 1
            self._log.exception("vhost-user connection dropped after an internal error")
        finally:
            await self._disconnect()
            ch.close()
            self._active = None

    async def _disconnect(self) -> None:
        for vr in self.vrings:
            await self._stop(vr)
            vr.close_fds()
            vr.num = vr.base = 0
            vr.addr = None
            vr.enabled = False
        self.ctx.acked = 0
        self._protocol = 0
        self.protocol_features_acked = False
        if self._memory is not None:
            self._memory.close()
            self._memory = None
        if self._inflight is not None:
            self._inflight.close()
            self._inflight = None

    async def _dispatch(self, ch: VhostUserChannel, msg: Message) -> None:
        try:
            check_fds(msg)
            handler = _HANDLERS.get(msg.request)
            if handler is None:
                raise _error(f"{msg.name} is not supported by this back-end")
            out = await handler(self, msg)
        except RemoteProtocolError:
            if msg.need_reply and self._protocol & ProtocolFeature.REPLY_ACK:
                with contextlib.suppress(MicError):
                    await ch.send(msg.request, U64.pack(1))
            raise
        if msg.request in _REPLYING:
            assert out is not None
            fds, self._reply_fds = self._reply_fds, []
            try:
                await ch.send(msg.request, out, fds)
            finally:
                _close_fds(fds)
        elif msg.need_reply and self._protocol & ProtocolFeature.REPLY_ACK:
            await ch.send(msg.request, U64.pack(0))

    def _vring(self, index: int, msg: Message) -> Vring:
        if not 0 <= index < len(self.vrings):
            raise _error(f"{msg.name}: queue {index} does not exist ({len(self.vrings)} queues)")
        return self.vrings[index]

    # -- handlers -----------------------------------------------------------------------
    def offered_features(self) -> int:
        return self.backend.features() | RING_FEATURES | PROTOCOL_FEATURES_BIT

    async def _get_features(self, msg: Message) -> bytes:
        return U64.pack(self.offered_features())

    async def _set_features(self, msg: Message) -> None:
        f = decode_u64(msg)
        extra = f & ~self.offered_features()
        if extra:
            raise _error(f"SET_FEATURES acks features {extra:#x} that were not offered")
        if not f & Feature.VERSION_1:
            raise _error("SET_FEATURES without VERSION_1: legacy devices are not supported")
        self.ctx.acked = f & ~PROTOCOL_FEATURES_BIT
        self.protocol_features_acked = bool(f & PROTOCOL_FEATURES_BIT)

    async def _nothing(self, msg: Message) -> None:
        pass

    async def _reset_owner(self, msg: Message) -> None:
        for vr in self.vrings:
            await self._stop(vr)
        self.ctx.acked = 0

    async def _get_protocol_features(self, msg: Message) -> bytes:
        return U64.pack(self.protocol_features)

    async def _set_protocol_features(self, msg: Message) -> None:
        f = decode_u64(msg)
        extra = f & ~self.protocol_features
        if extra:
            raise _error(f"SET_PROTOCOL_FEATURES acks {extra:#x}, which were not offered")
        self._protocol = f

    async def _get_queue_num(self, msg: Message) -> bytes:
        return U64.pack(self.max_queues())

    def max_queues(self) -> int:
        """The GET_QUEUE_NUM answer (a subclass may count queue pairs)."""
        return len(self.vrings)

    async def _get_max_mem_slots(self, msg: Message) -> bytes:
        return U64.pack(MAX_MEM_REGIONS)

    async def _set_mem_table(self, msg: Message) -> None:
        regions = decode_mem_table(msg)
        mem = GuestMemory.map(regions, msg.fds)
        # rings running on the old table are stopped (nothing in flight) and
        # restarted at the same index on the new one
        running = [vr for vr in self.vrings if vr.started]
        for vr in running:
            await self._stop(vr)
        old, self._memory = self._memory, mem
        if old is not None:
            old.close()
        for vr in running:
            self._start(vr)

    async def _set_vring_num(self, msg: Message) -> None:
        index, num = decode_vring_state(msg)
        vr = self._vring(index, msg)
        if num & (num - 1) or not self.queue_size <= num <= VRING_MAX:
            why = self.ring_size_note.format(queue_size=self.queue_size)
            raise _error(
                f"SET_VRING_NUM: queue {index} of {num} entries; this back-end needs a power "
                f"of two in {self.queue_size}..{VRING_MAX} ({why})"
            )
        vr.num = num

    async def _set_vring_base(self, msg: Message) -> None:
        index, base = decode_vring_state(msg)
        vr = self._vring(index, msg)
        if base > 0xFFFF and not self._packed:  # a packed base holds two (packed.decode_base)
            raise _error(f"SET_VRING_BASE: queue {index} base {base} is not a 16-bit index")
        vr.base = base

    async def _set_vring_addr(self, msg: Message) -> None:
        addr = decode_vring_addr(msg)
        vr = self._vring(addr.index, msg)
        if self._memory is None:
            raise _error(f"SET_VRING_ADDR for queue {addr.index} before SET_MEM_TABLE")
        if vr.num:  # refuse addresses outside the regions now
            if self._packed:
                packed_layout(self._memory, vr.num, addr)
            else:
                self._layout(vr.num, addr)
        vr.addr = addr

    async def _get_vring_base(self, msg: Message) -> bytes:
        index, _ = decode_vring_state(msg)
        vr = self._vring(index, msg)
        await self._stop(vr)
        vr.replace_fd("kick_fd", None)
        vr.replace_fd("call_fd", None)
        return VRING_STATE.pack(index, vr.base)

    def _vring_fd(self, msg: Message) -> tuple[Vring, int | None]:
        value = decode_u64(msg)
        if value & ~(VRING_IDX_MASK | VRING_NOFD):
            raise _error(f"{msg.name}: reserved bits set in {value:#x}")
        vr = self._vring(value & VRING_IDX_MASK, msg)
        if value & VRING_NOFD:
            return vr, None
        fd = msg.fds.pop()  # ours now (check_fds made sure there is exactly one)
        return vr, fd

    async def _set_vring_kick(self, msg: Message) -> None:
        vr, fd = self._vring_fd(msg)
        if fd is None:
            raise _error(
                f"SET_VRING_KICK: queue {vr.index} without an eventfd (polling is not supported)"
            )
        if vr.started:
            await self._stop(vr)
        vr.replace_fd("kick_fd", fd)
        self._start(vr)

    async def _set_vring_call(self, msg: Message) -> None:
        vr, fd = self._vring_fd(msg)
        vr.replace_fd("call_fd", fd)

    async def _set_vring_err(self, msg: Message) -> None:
        vr, fd = self._vring_fd(msg)
        vr.replace_fd("err_fd", fd)

    async def _set_vring_enable(self, msg: Message) -> None:
        index, enable = decode_vring_state(msg)
        vr = self._vring(index, msg)
        vr.enabled = bool(enable)
        await self._enable_changed(vr)

    async def _enable_changed(self, vr: Vring) -> None:
        """SET_VRING_ENABLE changed ``vr.enabled`` (a subclass may start or stop the ring)."""

    async def _get_config(self, msg: Message) -> bytes:
        offset, size, flags, _ = decode_config(msg, with_payload=False)
        space = self.backend.config_bytes()
        data = space[offset : offset + size].ljust(size, b"\0")
        return CONFIG_HDR.pack(offset, size, flags) + data

    async def _set_config(self, msg: Message) -> None:
        decode_config(msg, with_payload=True)
        raise _error("SET_CONFIG: this device's config space is read-only")

    async def _get_inflight_fd(self, msg: Message) -> bytes:
        _, _, num_queues, queue_size = decode_inflight(msg)
        out, fd = InflightRegion.allocate(num_queues, queue_size, len(self.vrings))
        self._reply_fds.append(fd)
        return out

    async def _set_inflight_fd(self, msg: Message) -> None:
        size, offset, num_queues, queue_size = decode_inflight(msg)
        region = InflightRegion.map(
            msg.fds[0], size, offset, num_queues, queue_size, len(self.vrings)
        )
        old, self._inflight = self._inflight, region
        if old is not None:
            old.close()

    # -- rings --------------------------------------------------------------------------
    @property
    def _packed(self) -> bool:
        """VIRTIO_F_RING_PACKED was acked: rings are packed (:mod:`.packed`)."""
        return bool(self.ctx.acked & Feature.RING_PACKED)

    def _layout(self, num: int, addr: VringAddr) -> SplitLayout:
        mem = self._memory
        assert mem is not None
        q = addr.index
        return SplitLayout(
            num,
            mem.uva_to_gpa(addr.desc, 16 * num, f"queue {q} descriptor table"),
            mem.uva_to_gpa(addr.avail, 6 + 2 * num, f"queue {q} avail ring"),
            mem.uva_to_gpa(addr.used, 6 + 8 * num, f"queue {q} used ring"),
        )

    def _start(self, vr: Vring) -> None:
        """Start a ring whose size, addresses, memory and kick fd are all known."""
        if vr.kick_fd is None:
            return
        missing = [
            what
            for what, ok in (
                ("SET_MEM_TABLE", self._memory is not None),
                ("SET_VRING_NUM", vr.num),
                ("SET_VRING_ADDR", vr.addr is not None),
            )
            if not ok
        ]
        if missing:
            raise _error(f"SET_VRING_KICK: queue {vr.index} started before {', '.join(missing)}")
        assert self._memory is not None
        assert vr.addr is not None
        f = self.ctx.acked
        if f & Feature.RING_PACKED:
            q: DeviceQueue | packed.DeviceQueue
            q = start_packed(self._memory, vr.num, vr.addr, vr.base, f)
            vr.queue = q
            vr.endpoint.attach(q)
            vr.watch_kicks()
            return
        state = QueueState(
            layout=self._layout(vr.num, vr.addr),
            next_avail=vr.base,
            next_used=vr.base,
            event_idx=bool(f & Feature.EVENT_IDX),
            indirect=bool(f & Feature.INDIRECT_DESC),
            ready=True,
            inflight=(),
        )
        # RingError (bad size, misaligned part) is a RemoteProtocolError: the connection goes
        if self._inflight is None:
            q = DeviceQueue.restore(self._memory, state)
        else:  # resume what a previous back-end process had taken (.inflight)
            q = self._inflight.start_queue(vr.index, self._memory, state)
            if q.resubmitting or q.repaired:
                n, done = q.resubmitting, q.repaired
                self._log.info(
                    "queue %d: resubmitting %d requests (%d were done)", vr.index, n, done
                )
        vr.queue = q
        vr.endpoint.attach(q)
        vr.watch_kicks()
        vr.endpoint.notify()  # serve what is already there (libvhost-user kicks itself)

    async def _stop(self, vr: Vring) -> None:
        """Stop a ring once the requests in flight completed; its base is where it stopped."""
        vr.stop_kicks()
        q = vr.queue
        if q is None:
            return
        ep = vr.endpoint
        if ep.state is EndpointState.LIVE:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + DRAIN_TIMEOUT
            # control path only (GET_VRING_BASE, a new memory table, a disconnect);
            # the endpoint has no "nothing in flight" event, and a stale put
            # would drop the completion, so poll until the backend put them all
            while ep.in_flight and loop.time() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.001)
            if ep.in_flight:
                log.error(
                    "queue %d: %d requests still running after %.0f s; dropped",
                    vr.index,
                    ep.in_flight,
                    DRAIN_TIMEOUT,
                )
            ep.flush()
            ep.detach(EndpointState.IDLE, "ring stopped by the front-end")
        vr.base = encode_base(q) if isinstance(q, packed.DeviceQueue) else q.next_avail
        vr.queue = None

    @property
    def connected(self) -> bool:
        """A front-end is being served now."""
        return self._active is not None

    def stats(self) -> dict[str, object]:
        return {
            "connections": self.connections,
            "dropped": self.dropped,
            "queues": [ep.stats() for ep in self.endpoints],
        }


_HANDLERS: dict[int, Callable[[VhostUserServer, Message], Awaitable[bytes | None]]] = {
    Request.GET_FEATURES: VhostUserServer._get_features,
    Request.SET_FEATURES: VhostUserServer._set_features,
    Request.SET_OWNER: VhostUserServer._nothing,
    Request.RESET_OWNER: VhostUserServer._reset_owner,
    Request.GET_PROTOCOL_FEATURES: VhostUserServer._get_protocol_features,
    Request.SET_PROTOCOL_FEATURES: VhostUserServer._set_protocol_features,
    Request.GET_QUEUE_NUM: VhostUserServer._get_queue_num,
    Request.GET_MAX_MEM_SLOTS: VhostUserServer._get_max_mem_slots,
    Request.SET_MEM_TABLE: VhostUserServer._set_mem_table,
    Request.SET_VRING_NUM: VhostUserServer._set_vring_num,
    Request.SET_VRING_BASE: VhostUserServer._set_vring_base,
    Request.SET_VRING_ADDR: VhostUserServer._set_vring_addr,
    Request.GET_VRING_BASE: VhostUserServer._get_vring_base,
    Request.SET_VRING_KICK: VhostUserServer._set_vring_kick,
    Request.SET_VRING_CALL: VhostUserServer._set_vring_call,
    Request.SET_VRING_ERR: VhostUserServer._set_vring_err,
    Request.SET_VRING_ENABLE: VhostUserServer._set_vring_enable,
    Request.GET_CONFIG: VhostUserServer._get_config,
    Request.SET_CONFIG: VhostUserServer._set_config,
    Request.GET_INFLIGHT_FD: VhostUserServer._get_inflight_fd,
    Request.SET_INFLIGHT_FD: VhostUserServer._set_inflight_fd,
}
