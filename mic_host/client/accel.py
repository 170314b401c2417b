"""Host reach: a host script's accelerator channel to a card (the MIC offload use case).

Owns the host side of an offload channel: connecting to the card's offload
endpoint (``STATE_DIR/<card>-accel.sock``, named in the card's boot
parameters by the daemon), the driver side of the channel's split ring
(``virtio.split.DriverQueue``), and the UADK-shaped session on top::

    async with card.accel_session("zlib", level=1) as s:     # CardClient
        out = await s.do(data)
        outs = await s.do_many([a, b, c])                    # one doorbell per batch

Where the bytes go. The card places the channel (status page, ring, request
slots, heap: the accelerator queue format of :mod:`virtio.accel`) in **card
RAM** and sends this process the card-RAM fd, as the host would reach card
memory through the PCIe aperture; one of the card's engine workers serves the
ring in place. A request's header goes into its slot, its payload into the
channel's heap, and the result comes back in the heap: nothing but
notifications crosses a socket. Doorbells and interrupts use a
one-doorbell-each-way ``transport.Mmio`` this process creates and hands to the
card with the open request. Everything the card writes (used ring, response,
lengths) is checked: a bad card gets a ``RemoteProtocolError``, never a crash.

Part of the client library: imports ``transport``, ``virtio`` and
``mic_host.paths`` only (never ``mic_card``, never the daemon side). The card's
error answers are :class:`virtio.errors.WireError` objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from mic_host.paths import accel_socket_path
from transport import FramedSocket, LinkLost, Mmio, MmioLayout, NotifyMode, NotifyPolicy, Region
from virtio.accel import (
    IV_MAX,
    KEY_MAX,
    OFFLOAD_DEFAULT_HEAP,
    OFFLOAD_PROTOCOL,
    RESP_OFF,
    SLOT_SIZE,
    STATUS_MAGIC,
    AccelRequestError,
    Alg,
    Op,
    QueueGeometry,
    Status,
    StatusWord,
    align,
    key_fields,
    output_bound,
    pack_request,
    read_response,
    tag_len,
)
from virtio.errors import (
    BrokenResourceError,
    ClosedResourceError,
    LocalProtocolError,
    MicError,
    MicTimeoutError,
    RemoteProtocolError,
    WireError,
)
from virtio.memory import FlatMemory
from virtio.split import DriverQueue, RingError

__all__ = [
    "OFFLOAD_PROTOCOL",
    "AccelRequestError",
    "OffloadPool",
    "OffloadSession",
    "open_pool",
    "open_session",
]

#: the channel's doorbells: one each way (the card's engine worker adopts it)
CHANNEL_MMIO = MmioLayout.single()
#: how long opening may take (the card starts its accelerators on first use)
OPEN_TIMEOUT = 60.0
#: a sleeping waiter re-checks the channel this often (the card's fault notice
#: also wakes it; this bounds the wait if the notice is lost with the card)
_RECHECK = 0.1
#: how long closing waits for the card to free the channel
_CLOSE_TIMEOUT = 5.0
Data = bytes | bytearray | memoryview
#: one request laid out for the heap: data, aad (the key buffer for RSA), iv,
#: output cap, then offsets from the request's heap start of the aad and the
#: output, and the heap bytes it takes (:meth:`OffloadSession._item`)
_Item = tuple[Data, Data, bytes | None, int, int, int, int]


def _error_from(reply: dict[str, Any]) -> MicError:
    """The card's ``error`` answer (a :class:`~virtio.errors.WireError`) as the
    ``virtio.errors`` class it names; a malformed one is a ``RemoteProtocolError``."""
    err = reply.get("error")
    try:
        wire = WireError.from_wire(err)
    except RemoteProtocolError as e:
        return RemoteProtocolError(
            f"malformed error answer from the card ({e}): {reply!r:.200}", reason="bad-error"
        )
    return WireError(wire.type, wire.base, f"card: {wire.type:.100}: {wire.message}").exception(
        reason="card"
    )


def _int(reply: dict[str, Any], name: str, lo: int, hi: int) -> int:
    v = reply.get(name)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise RemoteProtocolError(f"card answered {name}={v!r:.40}", reason="bad-opened")
    return v


class OffloadSession:
    """One accelerator channel to a card. Get it with :func:`open_session`.

    ``do`` / ``do_many`` run one request / a batch (one doorbell); calls on one
    session are serialised. ``stats`` counts requests, doorbells and sleeps.
    """

    def __init__(
        self,
        fs: FramedSocket,
        mmio: Mmio,
        ram: Region,
        reply: dict[str, Any],
        *,
        level: int,
        key: bytes,
        iv: bytes,
        out_size: int | None,
    ) -> None:
        self.device = str(reply.get("device"))
        self.qid = _int(reply, "qid", 0, 1 << 20)
        self.op = Op(_int(reply, "op", 0, 255))
        self.alg = Alg(_int(reply, "alg", 0, 255))
        self.alg2 = Alg(_int(reply, "alg2", 0, 255))
        pasid = _int(reply, "pasid", 1, (1 << 31) - 1)
        heap = _int(reply, "heap_size", 8192, 1 << 30)
        self.geometry = geo = QueueGeometry(pasid, heap)
        off = _int(reply, "region_off", 0, ram.size)
        if off % 4096 or off + geo.region_size > ram.size:
            raise RemoteProtocolError("the channel does not fit in card RAM", reason="bad-opened")
        if _int(reply, "region_size", 0, ram.size) != geo.region_size:
            raise RemoteProtocolError(
                "channel size disagrees with its geometry", reason="bad-opened"
            )
        self.level = level
        self.key = key
        self.iv = iv
        self.out_size = out_size
        # per-session constants of every request: inline key, key buffer, tag length
        self._key, self._keybuf = key_fields(self.alg, key)
        self._tag_len = tag_len(self.alg, self.alg2)
        self.stats = {"requests": 0, "doorbells": 0, "sleeps": 0}
        self._fs = fs
        self._mmio = mmio
        self._ram = ram
        self._view = ram.view()[off : off + geo.region_size]
        if self._view[:8].cast("Q")[0] != STATUS_MAGIC:
            raise RemoteProtocolError("no channel status page in card RAM", reason="bad-opened")
        self._words = self._view[:4096].cast("Q")
        # per slot, precomputed: header offset, response offset, its one descriptor
        self._hdr_off = [geo.slot_addr(s) - geo.base for s in range(geo.slots)]
        self._resp_off = [off + RESP_OFF for off in self._hdr_off]
        self._descs = [((geo.slot_addr(s), SLOT_SIZE),) for s in range(geo.slots)]
        self._dq: DriverQueue[int] = DriverQueue(
            FlatMemory(self._view, base=geo.base), geo.layout, 0
        )
        self._dq.disable_interrupts()
        self._lock = asyncio.Lock()
        self._done: dict[int, int] = {}
        self._inflight = 0
        self._fault: MicError | None = None
        self._closed = False
        self._reader: asyncio.Task[None] | None = None

    # -- life ------------------------------------------------------------------------
    def _start(self) -> None:
        self._reader = asyncio.get_running_loop().create_task(
            self._read_card(), name=f"offload-{self.device}-q{self.qid}"
        )

    async def _read_card(self) -> None:
        """The card's notices: ``fault`` disables the channel; EOF means the card is gone."""
        why: MicError
        try:
            while True:
                msg, fds = await self._fs.recv_frame()
                for fd in fds:
                    os.close(fd)
                if msg.get("type") == "fault":
                    why = BrokenResourceError(
                        f"accelerator channel {self.device}/q{self.qid} disabled by the card: "
                        f"{str(msg.get('reason'))[:200]}"
                    )
                    break
        except (LinkLost, MicError, OSError) as e:
            why = BrokenResourceError(f"card closed the accelerator channel: {e}")
        if self._fault is None:
            self._fault = why
        self._mmio.vector(0).fail(why)  # wake a waiter

    async def aclose(self) -> None:
        """Close the channel and wait (up to 5 s) until the card freed it; idempotent."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(LinkLost, MicError, OSError):
            await self._fs.send_frame({"type": "close"})
        if self._reader is not None:
            # the card closes the connection once the channel is freed: wait
            # for that, so the queue is available again when we return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_CLOSE_TIMEOUT):
                    await asyncio.shield(self._reader)
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self._fs.close()
        self._words.release()
        del self._dq
        self._view.release()
        self._ram.close()
        self._mmio.close()

    async def __aenter__(self) -> OffloadSession:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # -- requests --------------------------------------------------------------------
    async def do(
        self,
        data: bytes | bytearray | memoryview,
        *,
        iv: bytes | None = None,
        aad: bytes | bytearray | memoryview = b"",
        out_size: int | None = None,
    ) -> bytes:
        """Process ``data`` on the card and return the output.

        Raises:
            AccelRequestError: the engine's status was not OK.
            LocalProtocolError: the request does not fit in the channel's heap.
            BrokenResourceError: the channel was disabled (engine fault) or the card went away.
            RemoteProtocolError: the card broke the ring.
        """
        cap = out_size or self.out_size
        while True:
            [(st, consumed, out)] = await self._batch([self._item(data, aad, iv, cap)])
            if st is Status.OUT_OF_SPACE_TERMINATED and self.op in (
                Op.DECOMPRESS,
                Op.DECRYPT_DECOMPRESS,
            ):
                cur = output_bound(self.op, len(data), cap)
                if 2 * cur + len(data) + len(aad) <= self.geometry.heap_size:
                    cap = 2 * cur
                    continue
            if st is not Status.OK:
                raise AccelRequestError(st, f"{self.device} q{self.qid}", consumed=consumed)
            return out

    async def do_many(
        self, items: Sequence[bytes | bytearray | memoryview], *, iv: bytes | None = None
    ) -> list[bytes]:
        """Process a batch (split to fit the channel), one doorbell per piece.

        Raises:
            AccelRequestError: for the first item whose status was not OK.
            (and as :meth:`do`)
        """
        out: list[bytes] = []
        piece: list[_Item] = []
        used = 0
        slots, heap = self.geometry.slots, self.geometry.heap_size
        for d in items:
            it = self._item(d, b"", iv, self.out_size)
            need = it[6]
            if piece and (len(piece) == slots or used + need > heap):
                out += self._check_all(await self._batch(piece))
                piece, used = [], 0
            piece.append(it)
            used += need
        if piece:
            out += self._check_all(await self._batch(piece))
        return out

    def _check_all(self, res: list[tuple[Status, int, bytes]]) -> list[bytes]:
        for st, consumed, _ in res:
            if st is not Status.OK:
                raise AccelRequestError(st, f"{self.device} q{self.qid}", consumed=consumed)
        return [r[2] for r in res]

    def _item(self, data: Data, aad: Data, iv: bytes | None, cap: int | None) -> _Item:
        """One request's heap plan: source, then aad (RSA: the key buffer), then output."""
        if self._keybuf is not None:
            aad = self._keybuf
        dcap = output_bound(self.op, len(data), cap, self.alg)
        a_rel = align(max(len(data), 1))
        d_rel = a_rel + align(max(len(aad), 1))
        return data, aad, iv, dcap, a_rel, d_rel, d_rel + align(dcap)

    def _check_live(self) -> None:
        if self._closed:
            raise ClosedResourceError(f"accelerator channel {self.device}/q{self.qid} is closed")
        if self._fault is not None:
            raise self._fault
        if self._words[StatusWord.DISABLED]:
            raise BrokenResourceError(f"accelerator channel {self.device}/q{self.qid} is disabled")

    async def _batch(self, items: Sequence[_Item]) -> list[tuple[Status, int, bytes]]:
        """Lay ``items`` out in the heap, submit them with one doorbell, wait for all.

        Everything is checked before the ring is touched; a batch whose wait
        was cancelled is drained (its slots may still be written by the card)
        before the next one reuses the slots.
        """
        async with self._lock:
            self._check_live()
            await self._wait_all()  # leftovers of a cancelled batch
            self._done.clear()
            geo, view, base = self.geometry, self._view, self.geometry.base
            if len(items) > geo.slots:
                raise LocalProtocolError(f"a batch of {len(items)} exceeds {geo.slots} slots")
            # the plan: each item's heap offset (its aad and output follow it)
            plan: list[int] = []
            pos, end = geo.heap_off, geo.heap_off + geo.heap_size
            for it in items:
                if pos + it[6] > end:
                    raise LocalProtocolError(
                        f"requests of {len(it[0])} B do not fit in the channel's "
                        f"{geo.heap_size} B heap (open it with a bigger heap_size)"
                    )
                plan.append(pos)
                pos += it[6]
            key, tl, hdr_off, descs, add = (
                self._key,
                self._tag_len,
                self._hdr_off,
                self._descs,
                self._dq.add,
            )
            for slot, ((data, aad, iv, dcap, a_rel, d_rel, _need), src) in enumerate(
                zip(items, plan, strict=True)
            ):
                n, na = len(data), len(aad)
                a_off = src + a_rel
                view[src : src + n] = data
                view[a_off : a_off + na] = aad
                pack_request(
                    view, hdr_off[slot], self.op, self.alg, self.alg2, self.level, 0, 0, key,
                    self.iv if iv is None else iv, tl, base + src, n, base + src + d_rel, dcap,
                    base + a_off if na else 0, na,
                )  # fmt: skip
                add((), descs[slot], slot)
            self._inflight = len(items)
            if self._dq.publish():
                self._mmio.doorbell(0).ring()
                self.stats["doorbells"] += 1
            await self._wait_all()
            self.stats["requests"] += len(items)
            out: list[tuple[Status, int, bytes]] = []
            done, resp_off = self._done, self._resp_off
            for slot, (it, src) in enumerate(zip(items, plan, strict=True)):
                if done.get(slot, 0) < SLOT_SIZE:
                    out.append((Status.INVALID_REQUEST, 0, b""))
                    continue
                status, consumed, produced, _detail = read_response(view, resp_off[slot])
                dst = src + it[5]
                out.append((status, consumed, bytes(view[dst : dst + min(produced, it[3])])))
            return out

    async def _wait_all(self) -> None:
        """Wait until every published request is answered, sleeping on the interrupt."""
        vec = self._mmio.vector(0)
        dq = self._dq
        try:
            while True:
                for slot, length in dq.get_used_many():
                    self._done[slot] = length
                    self._inflight -= 1
                if self._inflight <= 0:
                    return
                self._check_live()
                if dq.enable_interrupts():
                    dq.disable_interrupts()
                    continue
                self.stats["sleeps"] += 1
                try:
                    async with asyncio.timeout(_RECHECK):
                        await vec.wait()
                except TimeoutError:
                    pass
                finally:
                    dq.disable_interrupts()
        except RingError as e:
            self._fault = RemoteProtocolError(f"the card broke the channel's ring: {e}")
            raise self._fault from e
        except BrokenResourceError:
            if self._fault is not None:
                raise self._fault from None
            raise


async def open_session(
    state_dir: str | os.PathLike[str],
    card: str,
    alg: str,
    *,
    op: str | None = None,
    level: int = 6,
    key: bytes = b"",
    iv: bytes = b"",
    out_size: int | None = None,
    heap_size: int = OFFLOAD_DEFAULT_HEAP,
    policy: NotifyPolicy | None = None,
) -> OffloadSession:
    """Open an accelerator channel to ``card`` (see :meth:`CardClient.accel_session`).

    ``alg``/``op``/``level`` as the card's ``SessionSpec`` (``"zlib"``,
    ``"aes-gcm"``, ``"sha256"``, chains ``"zlib+aes-gcm"``); ``key``/``iv``
    travel in each request's header.

    Raises:
        BrokenResourceError: the card has no offload endpoint (not online?).
        LocalProtocolError: a bad key/iv size, or the card refused the spec.
        ResourceError: every queue of the card's accelerator is in use (or isolated).
        RemoteProtocolError: the card's answer is malformed.
    """
    rsa = alg.lower().startswith("rsa-")  # RSA keys (DER) travel in the key buffer
    if (len(key) > KEY_MAX and not rsa) or len(iv) > IV_MAX:
        raise LocalProtocolError(f"key is at most {KEY_MAX} B and iv {IV_MAX} B")
    path = accel_socket_path(state_dir, card)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, str(path))
    except OSError as e:
        sock.close()
        raise BrokenResourceError(
            f"card {card}: no accelerator endpoint at {path} (is the card online?): {e}"
        ) from e
    fs = FramedSocket(sock)
    mmio: Mmio | None = None
    fds: list[int] = []
    try:
        mmio = Mmio.create(CHANNEL_MMIO, policy or NotifyPolicy(NotifyMode.HYBRID, spin_ns=20_000))
        msg = {
            "type": "open",
            "protocol": OFFLOAD_PROTOCOL,
            "alg": alg,
            "op": op,
            "level": level,
            "heap_size": heap_size,
        }
        await fs.send_frame(msg, [mmio.region.fd, *mmio.eventfds])
        try:
            async with asyncio.timeout(OPEN_TIMEOUT):
                reply, fds = await fs.recv_frame()
        except TimeoutError as e:
            raise MicTimeoutError(f"card {card} did not open a channel") from e
        if reply.get("type") == "error":
            raise _error_from(reply)
        if reply.get("type") != "opened" or len(fds) != 1:
            raise RemoteProtocolError(f"unexpected answer {reply!r:.200}", reason="bad-opened")
        size = _int(reply, "card_ram_size", 4096, 1 << 40)
        ram = Region.adopt(f"{card}-card-ram", fds.pop(), size)
        try:
            s = OffloadSession(fs, mmio, ram, reply, level=level, key=key, iv=iv, out_size=out_size)
        except BaseException:
            ram.close()
            raise
    except BaseException:
        for fd in fds:
            os.close(fd)
        if mmio is not None:
            mmio.close()
        fs.close()
        raise
    s._start()
    return s


class OffloadPool:
    """Several channels of one spec, one engine each: the card's engines in parallel.

    ``do`` goes to the next channel (round robin); ``do_many`` splits the
    items over the channels in contiguous shares and runs the shares
    concurrently, keeping the items' order. Get it with :func:`open_pool`.
    """

    def __init__(self, sessions: Sequence[OffloadSession]) -> None:
        if not sessions:
            raise LocalProtocolError("a pool needs at least one channel")
        self.sessions = list(sessions)
        self._next = 0

    @property
    def stats(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.sessions:
            for k, v in s.stats.items():
                out[k] = out.get(k, 0) + v
        return out

    async def do(
        self,
        data: bytes | bytearray | memoryview,
        *,
        iv: bytes | None = None,
        aad: bytes | bytearray | memoryview = b"",
        out_size: int | None = None,
    ) -> bytes:
        """As :meth:`OffloadSession.do`, on the next channel."""
        s = self.sessions[self._next]
        self._next = (self._next + 1) % len(self.sessions)
        return await s.do(data, iv=iv, aad=aad, out_size=out_size)

    async def do_many(
        self, items: Sequence[bytes | bytearray | memoryview], *, iv: bytes | None = None
    ) -> list[bytes]:
        """As :meth:`OffloadSession.do_many`, the shares on all channels at once."""
        n = len(self.sessions)
        step = -(-len(items) // n) if items else 0
        shares = [items[i * step : (i + 1) * step] for i in range(n)]
        async with asyncio.TaskGroup() as tg:
            tasks = [
                tg.create_task(s.do_many(sh, iv=iv))
                for s, sh in zip(self.sessions, shares, strict=True)
                if sh
            ]
        return [out for t in tasks for out in t.result()]

    async def aclose(self) -> None:
        """Close every channel."""
        for s in self.sessions:
            await s.aclose()

    async def __aenter__(self) -> OffloadPool:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


async def open_pool(
    state_dir: str | os.PathLike[str], card: str, alg: str, *, channels: int = 2, **spec: Any
) -> OffloadPool:
    """Open ``channels`` channels of one spec (see :func:`open_session` for ``spec``).

    Raises:
        LocalProtocolError: ``channels`` < 1; and as :func:`open_session` (the
            channels opened before a failure are closed).
    """
    if channels < 1:
        raise LocalProtocolError(f"channels must be >= 1, not {channels}")
    opened: list[OffloadSession] = []
    try:
        for _ in range(channels):
            # one at a time, so a failure still knows what to close
            opened.append(await open_session(state_dir, card, alg, **spec))  # noqa: PERF401
    except BaseException:
        for s in opened:
            await s.aclose()
        raise
    return OffloadPool(opened)
