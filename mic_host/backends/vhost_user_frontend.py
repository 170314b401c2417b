"""One connection to an external vhost-user back-end, as its front-end (QEMU's role).

Owns :class:`VhostUserFrontend`: the requests a front-end sends
(QEMU ``hw/virtio/vhost-user.c``: features, protocol features, the memory
table, per vring NUM/BASE/ADDR/KICK/CALL/ERR/ENABLE, GET_VRING_BASE to stop),
one at a time, each answered within ``timeout``; a reader task that is the
only consumer of the socket, so a back-end that dies (EOF, reset) or talks
out of turn is noticed at once, even while nothing is asked
(:attr:`VhostUserFrontend.lost`, :meth:`VhostUserFrontend.add_lost_callback`).

The wire codec, fd passing and the message layouts are
:mod:`transport.vhost_user`; this module is the daemon-side adapter. What
the front-end sends it never trusts: replies are checked for the request,
size and (with REPLY_ACK) a zero status; anything else drops the connection
with an error that names the back-end's socket.

Must not import ``mic_host.vop``, ``mic_host.vhost_user`` (the back-end
side) or ``mic_card``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from transport.vhost_user import MemRegion, Message, ProtocolFeature, Request, VhostUserChannel
from transport.vhost_user.channel import close_fds
from transport.vhost_user.protocol import (
    CONFIG_HDR,
    CONFIG_PAYLOAD_MAX,
    MAX_MEM_REGIONS,
    PROTOCOL_FEATURES_BIT,
    U64,
    VRING_ADDR,
    VRING_STATE,
    encode_mem_table,
)
from virtio.errors import (
    BrokenResourceError,
    LocalProtocolError,
    MicError,
    MicTimeoutError,
    RemoteProtocolError,
)

__all__ = ["WANTED_PROTOCOL_FEATURES", "VhostUserFrontend", "VringSetup", "eventfd"]

#: Protocol features this front-end uses when the back-end offers them.
#: CONFIG is required (the config space comes from GET_CONFIG, as QEMU's
#: vhost-user-blk requires it too).
WANTED_PROTOCOL_FEATURES = int(
    ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIG
)
_REPLIED = frozenset(
    {
        Request.GET_FEATURES,
        Request.GET_PROTOCOL_FEATURES,
        Request.GET_QUEUE_NUM,
        Request.GET_VRING_BASE,
        Request.GET_CONFIG,
    }
)


@dataclass(frozen=True, slots=True)
class VringSetup:
    """One vring as the back-end gets it: bus addresses (the memory table maps
    bus addresses 1:1 to the front-end's "user" addresses) and the eventfds."""

    index: int
    num: int
    desc: int
    avail: int
    used: int
    kick: int
    call: int
    err: int


class VhostUserFrontend:
    """A connected front-end. Build it with :meth:`connect`; :meth:`aclose` ends it.

    Every request method raises :class:`~virtio.errors.BrokenResourceError`
    once the connection is lost (:attr:`lost` says why),
    :class:`~virtio.errors.MicTimeoutError` if the back-end does not answer
    in time (the connection is then dropped) and
    :class:`~virtio.errors.RemoteProtocolError` for a reply that does not
    fit (also dropped).
    """

    def __init__(self, sock: socket.socket, *, label: str, timeout: float) -> None:
        self.label = label
        self.timeout = timeout
        self._ch = VhostUserChannel(sock)
        self._lock = asyncio.Lock()
        self._reply: asyncio.Future[Message] | None = None
        self._callbacks: list[Callable[[str], None]] = []
        self.lost: str | None = None
        #: what the back-end offered (GET_FEATURES / GET_PROTOCOL_FEATURES)
        self.features = 0
        self.protocol_features = 0
        self.queue_num = 1
        self._reader = asyncio.get_running_loop().create_task(
            self._read(), name=f"vhost-user {label}"
        )

    @classmethod
    async def connect(cls, path: str, *, label: str, timeout: float = 5.0) -> VhostUserFrontend:
        """Connect to the back-end listening on ``path`` and run the handshake
        (SET_OWNER, features, protocol features, queue count).

        Raises:
            BrokenResourceError: nobody listens there (``label`` should name ``path``).
            RemoteProtocolError: the back-end lacks what a block device needs.
            MicTimeoutError: it did not answer in time.
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(timeout):
                await asyncio.get_running_loop().sock_connect(sock, path)
        except (OSError, TimeoutError) as e:
            sock.close()
            if isinstance(e, TimeoutError):
                why = f"no answer within {timeout} s"
            else:
                why = e.strerror or str(e)  # "AF_UNIX path too long" has no strerror
            raise BrokenResourceError(f"{label}: cannot connect: {why}") from e
        fe = cls(sock, label=label, timeout=timeout)
        try:
            await fe._handshake()
        except BaseException:
            await fe.aclose()
            raise
        return fe

    # -- the connection ---------------------------------------------------------------
    def add_lost_callback(self, cb: Callable[[str], None]) -> None:
        """Call ``cb(reason)`` once the connection is lost (not after :meth:`aclose`)."""
        self._callbacks.append(cb)

    def _lose(self, reason: str) -> None:
        if self.lost is not None:
            return
        self.lost = reason
        fut = self._reply
        if fut is not None and not fut.done():
            fut.set_exception(BrokenResourceError(f"{self.label}: {reason}"))
        self._ch.close()
        for cb in self._callbacks:
            cb(reason)

    async def _read(self) -> None:
        """The only reader of the socket: replies go to the one pending request."""
        try:
            while True:
                msg = await self._ch.receive(expect_reply=True)
                if msg is None:
                    self._lose("the back-end closed the connection")
                    return
                close_fds(msg.fds)
                fut = self._reply
                if msg.fds:
                    self._lose(f"{msg.name} reply came with file descriptors")
                elif fut is None or fut.done():
                    self._lose(f"unexpected {msg.name} reply (nothing was asked)")
                else:
                    fut.set_result(msg)
                    continue
                return
        except (MicError, OSError) as e:
            self._lose(f"connection broken: {e}")

    async def aclose(self) -> None:
        """Close the connection (idempotent); no lost callback runs."""
        self._callbacks.clear()
        if self.lost is None:
            self._lose("closed by the daemon")
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader

    async def call(self, request: Request, payload: bytes = b"", fds: Sequence[int] = ()) -> bytes:
        """Send one request and wait for its reply (or, with REPLY_ACK, its ack).

        Raises:
            BrokenResourceError, MicTimeoutError, RemoteProtocolError (see the class).
        """
        async with self._lock:
            if self.lost is not None:
                raise BrokenResourceError(f"{self.label}: {self.lost}")
            replied = request in _REPLIED
            ack = not replied and bool(self.protocol_features & ProtocolFeature.REPLY_ACK)
            fut: asyncio.Future[Message] | None = None
            if replied or ack:
                fut = asyncio.get_running_loop().create_future()
            self._reply = fut
            try:
                await self._ch.send(request, payload, fds, reply=False, need_reply=ack)
                if fut is None:
                    return b""
                try:
                    async with asyncio.timeout(self.timeout):
                        msg = await fut
                except TimeoutError as e:
                    why = f"no answer to {request.name} within {self.timeout} s"
                    self._lose(why)
                    raise MicTimeoutError(f"{self.label}: {why}") from e
            except (OSError, MicError) as e:
                if isinstance(e, MicTimeoutError | BrokenResourceError) and self.lost:
                    raise
                self._lose(f"{request.name}: {e}")
                raise BrokenResourceError(f"{self.label}: {request.name}: {e}") from e
            finally:
                self._reply = None
            if msg.request != request:
                self._fail(f"answered {request.name} with {msg.name}")
            if ack:
                if len(msg.payload) != U64.size:
                    self._fail(f"{request.name} ack of {len(msg.payload)} B")
                status = U64.unpack(msg.payload)[0]
                if status:
                    self._fail(f"refused {request.name} (status {status})")
            return msg.payload

    def _fail(self, what: str) -> None:
        self._lose(f"the back-end {what}")
        raise RemoteProtocolError(f"{self.label}: the back-end {what}", reason="vhost-user")

    def _u64(self, request: Request, payload: bytes) -> int:
        if len(payload) != U64.size:
            self._fail(f"answered {request.name} with {len(payload)} B")
        return int(U64.unpack(payload)[0])

    async def _handshake(self) -> None:
        await self.call(Request.SET_OWNER)
        self.features = self._u64(Request.GET_FEATURES, await self.call(Request.GET_FEATURES))
        if not self.features & PROTOCOL_FEATURES_BIT:
            self._fail("does not offer VHOST_USER_F_PROTOCOL_FEATURES (needed for GET_CONFIG)")
        offered = self._u64(
            Request.GET_PROTOCOL_FEATURES, await self.call(Request.GET_PROTOCOL_FEATURES)
        )
        if not offered & ProtocolFeature.CONFIG:
            self._fail("does not offer the CONFIG protocol feature (GET_CONFIG)")
        use = offered & WANTED_PROTOCOL_FEATURES
        await self.call(Request.SET_PROTOCOL_FEATURES, U64.pack(use))
        self.protocol_features = use  # REPLY_ACK applies from the next request on
        if use & ProtocolFeature.MQ:
            n = self._u64(Request.GET_QUEUE_NUM, await self.call(Request.GET_QUEUE_NUM))
            if n < 1:
                self._fail("offers 0 queues")
            self.queue_num = n

    # -- requests ------------------------------------------------------------------
    async def get_config(self, size: int) -> bytes:
        """The first ``size`` bytes of the device's config space (GET_CONFIG)."""
        if not 0 < size <= CONFIG_PAYLOAD_MAX:
            raise LocalProtocolError(f"config size {size} outside 1..{CONFIG_PAYLOAD_MAX}")
        out = await self.call(Request.GET_CONFIG, CONFIG_HDR.pack(0, size, 0) + bytes(size))
        if len(out) != CONFIG_HDR.size + size:
            # libvhost-user answers a config it cannot give with an empty payload
            self._fail(f"cannot give a config space of {size} B (answered {len(out)} B)")
        return out[CONFIG_HDR.size :]

    async def set_features(self, features: int) -> None:
        await self.call(Request.SET_FEATURES, U64.pack(features))

    async def set_mem_table(self, regions: Sequence[tuple[int, int, int, int]]) -> None:
        """``regions``: ``(bus address, size, fd, offset in fd)``; bus addresses
        double as the "user" addresses SET_VRING_ADDR carries.

        Raises:
            LocalProtocolError: more regions than one message carries.
        """
        if not 1 <= len(regions) <= MAX_MEM_REGIONS:
            raise LocalProtocolError(
                f"{self.label}: {len(regions)} memory regions, vhost-user carries 1..8"
            )
        table = [MemRegion(bus, size, bus, off) for bus, size, _fd, off in regions]
        await self.call(
            Request.SET_MEM_TABLE, encode_mem_table(table), [fd for _b, _s, fd, _o in regions]
        )

    async def start_vring(self, v: VringSetup) -> None:
        """NUM, BASE 0, ADDR, KICK, CALL, ERR, then ENABLE (QEMU's order)."""
        await self.call(Request.SET_VRING_NUM, VRING_STATE.pack(v.index, v.num))
        await self.call(Request.SET_VRING_BASE, VRING_STATE.pack(v.index, 0))
        await self.call(
            Request.SET_VRING_ADDR, VRING_ADDR.pack(v.index, 0, v.desc, v.used, v.avail, 0)
        )
        await self.call(Request.SET_VRING_KICK, U64.pack(v.index), [v.kick])
        await self.call(Request.SET_VRING_CALL, U64.pack(v.index), [v.call])
        await self.call(Request.SET_VRING_ERR, U64.pack(v.index), [v.err])
        await self.call(Request.SET_VRING_ENABLE, VRING_STATE.pack(v.index, 1))

    async def stop_vring(self, index: int) -> int:
        """GET_VRING_BASE: the back-end stops the ring; returns its next avail index."""
        out = await self.call(Request.GET_VRING_BASE, VRING_STATE.pack(index, 0))
        if len(out) != VRING_STATE.size:
            self._fail(f"answered GET_VRING_BASE with {len(out)} B")
        got, base = VRING_STATE.unpack(out)
        if got != index:
            self._fail(f"answered GET_VRING_BASE for ring {index} about ring {got}")
        return int(base)


def eventfd() -> int:
    """A non-blocking, close-on-exec eventfd (kick, call or err)."""
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
