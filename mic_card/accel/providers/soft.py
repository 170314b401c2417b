"""The software provider: the same engines, run in-process (priority 0, the fallback).

Extensions when imported directly: :func:`compute` runs one operation
synchronously (no event loop needed).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from typing import Any

from mic_card.accel.engine import EngineConfig, StreamTable, run_op
from mic_card.accel.errors import QueueStateError, RequestError
from mic_card.accel.queue import Completion, Data, SharedBuffer
from mic_card.accel.session import SessionSpec
from mic_card.accel.wire import Alg, Op, ReqFlag, Status, key_fields, tag_len
from virtio.errors import WouldBlock

__all__ = ["SoftProvider", "SoftSession", "compute"]

_ALL = EngineConfig(frozenset(Alg) - {Alg.NONE}, chaining=True)


def _bytes(d: Data | SharedBuffer) -> memoryview:
    return memoryview(d.view if isinstance(d, SharedBuffer) else d).cast("B")


def compute(spec: SessionSpec, data: Data, *, iv: bytes | None = None, aad: Data = b"") -> bytes:
    """Run ``spec`` on ``data`` in this thread (stateless).

    Raises:
        RequestError: the engine's status was not OK.
    """
    s = SoftSession(spec)
    c = s._run(data, iv=iv, aad=aad, flags=0, tag=None)
    if c.status is not Status.OK:
        raise RequestError(c.status, f"{spec.alg} (software)", consumed=c.consumed)
    return bytes(c.output)


class SoftSession:
    """A session computed in-process; the async API completes at submit time."""

    provider = "soft"

    def __init__(self, spec: SessionSpec) -> None:
        self.spec = spec
        self.op, self.alg, self.alg2 = spec.resolved()
        self._key, self._keybuf = key_fields(self.alg, spec.key)
        self._tag_len = tag_len(self.alg, self.alg2)
        self._streams = StreamTable()
        self._ready: collections.deque[Completion] = collections.deque()

    def _run(
        self, data: Data | SharedBuffer, *, iv: bytes | None, aad: Data | SharedBuffer, flags: int,
        tag: Any,
    ) -> Completion:  # fmt: skip
        s = self.spec
        if s.stream:
            flags |= ReqFlag.STREAM
        if self._keybuf is not None:  # as on the wire: the RSA key is the key buffer (aad)
            aad = self._keybuf
        r = run_op(
            _ALL, self._streams, self.op, self.alg, self.alg2, s.level, flags, 1,
            self._key, s.iv if iv is None else iv, self._tag_len,
            _bytes(data), _bytes(aad), 1 << 31,
        )  # fmt: skip
        return Completion(r.status, r.consumed, len(r.output), bytes(r.output), tag, r.detail)

    async def do(
        self,
        data: Data | SharedBuffer,
        *,
        iv: bytes | None = None,
        aad: Data | SharedBuffer = b"",
        finish: bool = False,
        flush: bool = False,
        **_: Any,
    ) -> bytes:
        flags = (ReqFlag.FINISH if finish else 0) | (ReqFlag.SYNC_FLUSH if flush else 0)
        c = self._run(data, iv=iv, aad=aad, flags=flags, tag=None)
        if (
            c.status is Status.OK
            and self.spec.stream
            and self.op is Op.DECOMPRESS
            and c.consumed < len(_bytes(data))
        ):
            raise RequestError(Status.CORRUPT_INPUT, "data after the end of the stream")
        if c.status is not Status.OK:
            raise RequestError(c.status, f"{self.spec.alg} (software)", consumed=c.consumed)
        return bytes(c.output)

    def submit(self, data: Data | SharedBuffer, *, tag: Any = None, **kw: Any) -> None:
        self._ready.append(
            self._run(data, iv=kw.get("iv"), aad=kw.get("aad", b""), flags=0, tag=tag)
        )

    def submit_many(self, items: Iterable[Data | SharedBuffer], **kw: Any) -> list[None]:
        n = 0
        for i, d in enumerate(items):
            self.submit(d, tag=i, **kw)
            n += 1
        return [None] * n

    def poll(self, limit: int | None = None) -> list[Completion]:
        r = self._ready
        n = len(r) if limit is None else min(limit, len(r))
        return [r.popleft() for _ in range(n)]

    def recv_nowait(self) -> Completion:
        if not self._ready:
            raise WouldBlock("no completion ready")
        return self._ready.popleft()

    async def recv(self) -> Completion:
        if not self._ready:
            raise QueueStateError("recv() with no request in flight")
        return self._ready.popleft()

    async def aclose(self) -> None:
        self._streams.clear()


class SoftProvider:
    """Every algorithm, in the caller's process (``calc_type`` soft)."""

    name = "soft"
    priority = 0

    def supports(self, alg: str) -> bool:
        try:
            SessionSpec(alg).resolved()
        except Exception:
            return False
        return True

    async def open_session(self, spec: SessionSpec) -> SoftSession:
        return SoftSession(spec)

    async def aclose(self) -> None:
        return None


def factory(_framework: object) -> SoftProvider:
    """Entry-point factory."""
    return SoftProvider()
