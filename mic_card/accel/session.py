"""UADK-shaped sessions: an algorithm with its level or key and direction, over queues.

Owns the mapping from "what the app wants" (:class:`SessionSpec`) to wire
requests, the synchronous ``await sess.do(data)`` (with the recoverable
out-of-space loop of streams and the output-growing retry of stateless
decompression), the asynchronous ``submit`` / ``submit_many`` (one doorbell
per batch) and the receives: ``poll()`` and ``recv_nowait()`` read shared
memory only, ``await recv()`` sleeps on the queue's interrupt.

A session may spread stateless requests over several queues (round robin,
UADK's ``SCHED_POLICY_RR``): with one queue per engine worker that is how two
workers compress in parallel. Streams stay on their first queue.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from mic_card.accel.engine import CIPHER_ALGS, COMP_ALGS, DIGEST_ALGS
from mic_card.accel.errors import QueueStateError, RequestError
from mic_card.accel.queue import AccelQueue, Completion, Data, Request, SharedBuffer, Ticket
from mic_card.accel.wire import (
    RSA_ALGS,
    Alg,
    Op,
    ReqFlag,
    Status,
    alg_by_name,
    key_fields,
    output_bound,
    tag_len,
)
from virtio.errors import LocalProtocolError, WouldBlock

__all__ = ["OPS", "Session", "SessionLike", "SessionSpec"]

OPS = {
    "compress": Op.COMPRESS,
    "decompress": Op.DECOMPRESS,
    "encrypt": Op.ENCRYPT,
    "decrypt": Op.DECRYPT,
    "digest": Op.DIGEST,
    "compress_encrypt": Op.COMPRESS_ENCRYPT,
    "decrypt_decompress": Op.DECRYPT_DECOMPRESS,
    "sign": Op.SIGN,
    "verify": Op.VERIFY,
}
_stream_ids = itertools.count(1)


@dataclass(frozen=True, slots=True)
class SessionSpec:
    """What a session does.

    ``alg`` is one name (``"zlib"``, ``"aes-gcm"``, ``"sha256"``) or a chain
    ``"<comp>+<cipher>"`` (``"zlib+aes-gcm"``); ``op`` defaults from it
    (compress, encrypt, digest, compress_encrypt). ``iv`` is the default IV
    (``do(..., iv=...)`` overrides it per request). ``out_size`` is the
    output buffer for decompression (grown on demand by ``do``).
    """

    alg: str
    op: str | None = None
    level: int = 6
    key: bytes = b""
    iv: bytes = b""
    stream: bool = False
    out_size: int | None = None

    def resolved(self) -> tuple[Op, Alg, Alg]:
        """``(op, alg, alg2)`` on the wire.

        Raises:
            LocalProtocolError: unknown algorithm or op, or op not valid for it.
        """
        try:
            if "+" in self.alg:
                first, second = (alg_by_name(p) for p in self.alg.split("+", 1))
                comp, ciph = (first, second) if first in COMP_ALGS else (second, first)
                if comp not in COMP_ALGS or ciph not in CIPHER_ALGS:
                    raise LocalProtocolError(f"{self.alg!r}: a chain is <comp>+<cipher>")
                op = OPS[self.op or "compress_encrypt"]
                if op not in (Op.COMPRESS_ENCRYPT, Op.DECRYPT_DECOMPRESS):
                    raise LocalProtocolError(f"{self.alg!r}: op {self.op!r} is not a chain op")
                return op, comp, ciph
            a = alg_by_name(self.alg)
            default = (
                "compress" if a in COMP_ALGS
                else "encrypt" if a in CIPHER_ALGS or a is Alg.RSA_OAEP
                else "sign" if a in RSA_ALGS
                else "digest"
            )  # fmt: skip
            op = OPS[self.op or default]
        except KeyError as e:
            raise LocalProtocolError(str(e.args[0])) from None
        ok = (
            (a in COMP_ALGS and op in (Op.COMPRESS, Op.DECOMPRESS))
            or ((a in CIPHER_ALGS or a is Alg.RSA_OAEP) and op in (Op.ENCRYPT, Op.DECRYPT))
            or (a in DIGEST_ALGS and op is Op.DIGEST)
            or (a in RSA_ALGS and a is not Alg.RSA_OAEP and op in (Op.SIGN, Op.VERIFY))
        )
        if not ok:
            raise LocalProtocolError(f"{self.alg!r} cannot {self.op}")
        return op, a, Alg.NONE


@runtime_checkable
class SessionLike(Protocol):
    """What every provider's sessions offer (the multiplexing layer's API)."""

    spec: SessionSpec
    provider: str

    async def do(
        self,
        data: Data | SharedBuffer,
        *,
        iv: bytes | None = None,
        aad: Data | SharedBuffer = b"",
        finish: bool = False,
        flush: bool = False,
    ) -> bytes | memoryview: ...

    def submit(self, data: Data | SharedBuffer, *, tag: Any = None, **kw: Any) -> Any: ...
    def submit_many(self, items: Iterable[Data | SharedBuffer], **kw: Any) -> list[Any]: ...
    def poll(self, limit: int | None = None) -> list[Completion]: ...
    def recv_nowait(self) -> Completion: ...
    async def recv(self) -> Completion: ...
    async def aclose(self) -> None: ...


class Session:
    """A session on hardware queues (the ``mic`` provider)."""

    provider = "mic"

    def __init__(self, queues: Sequence[AccelQueue], spec: SessionSpec) -> None:
        if not queues:
            raise LocalProtocolError("a session needs at least one queue")
        self.spec = spec
        self.op, self.alg, self.alg2 = spec.resolved()
        # per-session constants of every request: inline key, key buffer, tag length
        self._key, self._keybuf = key_fields(self.alg, spec.key)
        self._tag_len = tag_len(self.alg, self.alg2)
        self.queues = list(queues)
        self._rr = 0
        self._ready: collections.deque[Completion] = collections.deque()
        self.stream_id = next(_stream_ids) & 0xFFFFFFFF if spec.stream else 0
        if spec.stream and self.op not in (Op.COMPRESS, Op.DECOMPRESS, Op.DIGEST):
            raise LocalProtocolError(f"{spec.alg} {self.op.name.lower()} has no stream mode")

    # -- building requests ------------------------------------------------------------
    def request(
        self,
        data: Data | SharedBuffer,
        *,
        iv: bytes | None = None,
        aad: Data | SharedBuffer = b"",
        dst: SharedBuffer | None = None,
        out_size: int | None = None,
        flags: int = 0,
    ) -> Request:
        """The wire request for ``data`` (public so benchmarks can pre-build batches)."""
        s = self.spec
        if self.stream_id:
            flags |= ReqFlag.STREAM
        if self._keybuf is not None:  # RSA: the key (DER) is the key buffer (aad)
            aad = self._keybuf
        return Request(
            self.op,
            self.alg,
            self.alg2,
            s.level,
            flags,
            self.stream_id,
            self._key,
            s.iv if iv is None else iv,
            self._tag_len,
            data,
            aad,
            dst,
            0
            if dst is not None
            else output_bound(self.op, len(data), out_size or s.out_size, self.alg),
        )

    def _queue(self) -> AccelQueue:
        if self.stream_id or len(self.queues) == 1:
            return self.queues[0]
        self._rr = (self._rr + 1) % len(self.queues)
        return self.queues[self._rr]

    # -- synchronous --------------------------------------------------------------------
    async def _one(self, q: AccelQueue, req: Request) -> Completion:
        while True:
            try:
                t = q.submit(req, owner=self)
                break
            except WouldBlock:
                if not q.outstanding:
                    raise
                await q.wait_for(lambda n=q.outstanding: q.outstanding < n)
        t.future = asyncio.get_running_loop().create_future()
        return await q.wait_ticket(t)

    async def do(
        self,
        data: Data | SharedBuffer,
        *,
        iv: bytes | None = None,
        aad: Data | SharedBuffer = b"",
        dst: SharedBuffer | None = None,
        finish: bool = False,
        flush: bool = False,
    ) -> bytes | memoryview:
        """Process ``data`` and return the output (synchronous use).

        For streams, ``flush`` emits what is buffered and ``finish`` ends the
        stream. Raises :class:`RequestError` with the engine's status.
        """
        q = self._queue()
        flags = (ReqFlag.FINISH if finish else 0) | (ReqFlag.SYNC_FLUSH if flush else 0)
        out_size = self.spec.out_size
        if self.stream_id:
            return await self._do_stream(q, data, iv, flags)
        while True:
            c = await self._one(
                q, self.request(data, iv=iv, aad=aad, dst=dst, out_size=out_size, flags=flags)
            )
            if (
                c.status is Status.OUT_OF_SPACE_TERMINATED
                and self.op in (Op.DECOMPRESS, Op.DECRYPT_DECOMPRESS)
                and dst is None
            ):
                cur = output_bound(self.op, len(data), out_size)
                if cur * 2 <= q.bounce_size // 2:
                    out_size = cur * 2
                    continue
            if c.status is not Status.OK:
                raise RequestError(
                    c.status, f"{self.spec.alg} {self.op.name.lower()}",
                    consumed=c.consumed, produced=c.produced,
                )  # fmt: skip
            return c.output

    async def _do_stream(
        self, q: AccelQueue, data: Data | SharedBuffer, iv: bytes | None, flags: int
    ) -> bytes:
        if isinstance(data, SharedBuffer):
            data = data.view
        mv = memoryview(data).cast("B")
        out: list[bytes] = []
        while True:
            c = await self._one(q, self.request(mv, iv=iv, flags=flags))
            out.append(bytes(c.output))
            if c.status is Status.OK:
                if self.op is Op.DECOMPRESS and c.consumed < len(mv):
                    raise RequestError(
                        Status.CORRUPT_INPUT,
                        "data after the end of the stream",
                        consumed=c.consumed,
                    )
                return b"".join(out)
            elif c.status is not Status.OUT_OF_SPACE_RECOVERABLE:
                raise RequestError(c.status, f"{self.spec.alg} stream", consumed=c.consumed)
            mv = mv[c.consumed :]

    # -- asynchronous ---------------------------------------------------------------------
    def submit(self, data: Data | SharedBuffer, *, tag: Any = None, **kw: Any) -> Ticket:
        """Submit one request (one doorbell); its Completion comes from poll/recv.

        Raises:
            WouldBlock: the queue is full (poll, then retry).
        """
        return self._queue().submit(self.request(data, **kw), tag=tag, owner=self)

    def submit_many(self, items: Iterable[Data | SharedBuffer], **kw: Any) -> list[Ticket]:
        """Submit a batch: one doorbell per queue (tags are the item indices).

        Raises:
            WouldBlock: a queue filled up part-way (the earlier requests went out).
        """
        per: dict[int, list[tuple[Request, Any]]] = {}
        qs: dict[int, AccelQueue] = {}
        for i, d in enumerate(items):
            q = self._queue()
            per.setdefault(id(q), []).append((self.request(d, **kw), i))
            qs[id(q)] = q
        out: list[Ticket] = []
        for k, reqs in per.items():
            out += qs[k].submit_many(reqs, owner=self)
        return out

    def poll(self, limit: int | None = None) -> list[Completion]:
        """Completions of this session's requests; reads shared memory only (no system call)."""
        for q in self.queues:
            q._reap()
        r = self._ready
        n = len(r) if limit is None else min(limit, len(r))
        return [r.popleft() for _ in range(n)]

    def recv_nowait(self) -> Completion:
        """One completion or WouldBlock (no system call)."""
        if not self._ready:
            self.poll(0)
        if not self._ready:
            raise WouldBlock("no completion ready")
        return self._ready.popleft()

    async def recv(self) -> Completion:
        """Wait for one completion, sleeping on the interrupt of a queue with work in flight.

        Raises:
            QueueStateError: nothing in flight on any of the session's queues.
        """
        r = self._ready
        while not r:
            self.poll(0)
            if r:
                break
            busy = [q for q in self.queues if q.outstanding]
            if not busy:
                raise QueueStateError("recv() with no request in flight")
            await busy[0].wait_for(lambda q=busy[0]: bool(r) or not q.outstanding)
        return r.popleft()

    async def aclose(self) -> None:
        """End the session; its queues stay open (they belong to whoever opened them)."""

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
