"""The engines ("hardware agents") and the device side of a queue, sans-IO.

Owns what happens to one request: the compression engine (deflate, zlib,
gzip through :mod:`zlib`; levels; stateless and streaming), the security
engine (AES-CBC/CTR/XTS/GCM, SHA-256/512, HMAC through ``cryptography``),
chaining (compress-then-encrypt, decrypt-then-decompress: the two engines hand
the intermediate buffer to each other, never to the app), and the device side
of a queue (:class:`QueueServer`: pop chains from the ring core, parse the
header, resolve buffers in the queue's address space, answer).

Imports neither asyncio nor the OS: the worker process (``worker.py``) waits
on doorbells and calls :meth:`QueueServer.serve`; the in-process "local agent"
and the software provider call the same code. Time is a parameter (``clock``).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, hmac, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mic_card.accel.wire import (
    REQ_STRUCT,
    RESP_OFF,
    RESP_STRUCT,
    RSA_ALGS,
    SLOT_SIZE,
    WIRE_VERSION,
    Alg,
    Op,
    ReqFlag,
    Status,
    StatusWord,
)
from virtio.memory import Memory, MemoryFault
from virtio.split import DeviceQueue

__all__ = [
    "COMP_ALGS",
    "CIPHER_ALGS",
    "DIGEST_ALGS",
    "RSA_ALGS",
    "EngineConfig",
    "EngineResult",
    "InjectedCrash",
    "InjectedHang",
    "QueueServer",
    "StreamTable",
    "run_op",
]

COMP_ALGS = frozenset({Alg.DEFLATE, Alg.ZLIB, Alg.GZIP})
CIPHER_ALGS = frozenset({Alg.AES_CBC, Alg.AES_CTR, Alg.AES_XTS, Alg.AES_GCM})
DIGEST_ALGS = frozenset({Alg.SHA256, Alg.SHA512, Alg.HMAC_SHA256, Alg.HMAC_SHA512})
_WBITS = {Alg.DEFLATE: -15, Alg.ZLIB: 15, Alg.GZIP: 31}
_HASH: dict[Alg, Callable[[], hashes.HashAlgorithm]] = {
    Alg.SHA256: hashes.SHA256,
    Alg.SHA512: hashes.SHA512,
    Alg.HMAC_SHA256: hashes.SHA256,
    Alg.HMAC_SHA512: hashes.SHA512,
}
_GCM_TAG = 16
_OP = {int(o): o for o in Op}
_ALG = {int(a): a for a in Alg}
#: most streams one queue may hold open (a bound against a leaking app)
MAX_STREAMS = 1024
#: parsed RSA keys kept per queue (parsing a private key costs ~100 µs)
MAX_KEYS = 16


class InjectedCrash(Exception):
    """Raised by the engine for ``Op.INJECT`` crash; the worker turns it into a process exit."""


class InjectedHang(Exception):
    """Raised by the engine for ``Op.INJECT`` hang; the worker then stops answering."""


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """What a device's engines offer: algorithms, chains, and whether faults may be injected."""

    algorithms: frozenset[Alg]
    chaining: bool = True
    allow_inject: bool = False


@dataclass(slots=True)
class EngineResult:
    status: Status
    consumed: int = 0
    output: bytes | memoryview = b""
    detail: int = 0


class _Fail(Exception):
    def __init__(self, status: Status, detail: int = 0) -> None:
        super().__init__(status.name)
        self.status = status
        self.detail = detail


@dataclass(slots=True)
class _Stream:
    alg: Alg
    op: Op
    obj: Any
    pending: bytes = b""
    finished: bool = False


@dataclass(slots=True)
class StreamTable:
    """Per-queue stream state (zlib objects, running hashes), keyed by ``stream_id``."""

    streams: dict[int, _Stream] = field(default_factory=dict)
    #: RSA keys by their DER bytes (bounded: oldest dropped first)
    keys: dict[bytes, Any] = field(default_factory=dict)

    def clear(self) -> None:
        self.streams.clear()
        self.keys.clear()


# --- the compression engine ---------------------------------------------------


def _compress(alg: Alg, level: int, src: memoryview, cap: int) -> bytes:
    if not -1 <= level <= 9:
        raise _Fail(Status.INVALID_REQUEST)
    out = zlib.compress(src, level, _WBITS[alg])
    if len(out) > cap:
        raise _Fail(Status.OUT_OF_SPACE_TERMINATED)
    return out


def _decompress(alg: Alg, src: memoryview | bytes, cap: int) -> bytes:
    d = zlib.decompressobj(_WBITS[alg])
    try:
        out = d.decompress(src, cap) if cap else b""
    except zlib.error as e:
        raise _Fail(Status.CORRUPT_INPUT) from e
    if d.unconsumed_tail or (not d.eof and cap and len(out) == cap):
        raise _Fail(Status.OUT_OF_SPACE_TERMINATED, len(src) - len(d.unconsumed_tail))
    if not d.eof:
        raise _Fail(Status.CORRUPT_INPUT, 1)  # truncated stream
    return out


def _stream_comp(
    st: _Stream, flags: int, src: memoryview, cap: int
) -> tuple[Status, int, bytes, bool]:
    """One piece of a compression or decompression stream; returns status, consumed, out, done."""
    if st.op is Op.COMPRESS:
        c = st.obj
        data = st.pending
        if not st.finished:
            data += c.compress(src)
            if flags & ReqFlag.FINISH:
                data += c.flush(zlib.Z_FINISH)
                st.finished = True
            elif flags & ReqFlag.SYNC_FLUSH:
                data += c.flush(zlib.Z_SYNC_FLUSH)
        elif len(src):
            raise _Fail(Status.INVALID_REQUEST)  # data after FINISH
        if len(data) > cap:
            st.pending = data[cap:]
            return Status.OUT_OF_SPACE_RECOVERABLE, len(src), data[:cap], False
        st.pending = b""
        return Status.OK, len(src), data, st.finished
    d = st.obj
    try:
        out = d.decompress(src, cap) if cap else b""
    except zlib.error as e:
        raise _Fail(Status.CORRUPT_INPUT) from e
    consumed = len(src) - len(d.unconsumed_tail)
    if d.eof:
        consumed -= len(d.unused_data)
        return Status.OK, consumed, out, True
    if d.unconsumed_tail or (cap and len(out) == cap):
        return Status.OUT_OF_SPACE_RECOVERABLE, consumed, out, False
    if flags & ReqFlag.FINISH:
        raise _Fail(Status.CORRUPT_INPUT, 1)  # the app says it is over; zlib disagrees
    return Status.OK, consumed, out, False


# --- the security engine ------------------------------------------------------


def _cipher(
    alg: Alg, encrypt: bool, key: bytes, iv: bytes, tag_len: int, src: Any, aad: Any
) -> Any:
    try:
        if alg is Alg.AES_GCM:
            if tag_len not in (0, _GCM_TAG) or not 8 <= len(iv) <= 16:
                raise _Fail(Status.INVALID_REQUEST)
            g = AESGCM(key)
            if encrypt:
                return g.encrypt(iv, src, aad or None)
            try:
                return g.decrypt(iv, src, aad or None)
            except InvalidTag as e:
                raise _Fail(Status.AUTH_FAILED) from e
        if len(iv) != 16:
            raise _Fail(Status.BAD_KEY, 2)
        if alg is Alg.AES_CBC:
            if len(src) % 16:
                raise _Fail(Status.INVALID_REQUEST)
            mode: modes.Mode = modes.CBC(iv)
        elif alg is Alg.AES_CTR:
            mode = modes.CTR(iv)
        else:
            if len(key) not in (32, 64) or len(src) < 16:
                raise _Fail(Status.BAD_KEY if len(key) not in (32, 64) else Status.INVALID_REQUEST)
            mode = modes.XTS(iv)
        c: Any = Cipher(algorithms.AES(key), mode)
        ctx = c.encryptor() if encrypt else c.decryptor()
        return ctx.update(src) + ctx.finalize()
    except ValueError as e:  # key size, XTS equal halves, ...
        raise _Fail(Status.BAD_KEY, 1) from e


def _digest_obj(alg: Alg, key: bytes) -> Any:
    h = _HASH[alg]()
    if alg in (Alg.HMAC_SHA256, Alg.HMAC_SHA512):
        if not key:
            raise _Fail(Status.BAD_KEY)
        return hmac.HMAC(key, h)
    return hashes.Hash(h)


# --- the RSA engine (key in the aad buffer, DER) --------------------------------

_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def _rsa_key(streams: StreamTable, der: bytes, private: bool) -> Any:
    """The RSA key in ``der`` (private: PKCS#8/traditional DER; public: SPKI DER or a
    private key, whose public half is used). Raises ``_Fail(BAD_KEY)``."""
    cache = streams.keys
    k = cache.get(der)
    if k is None:
        try:
            try:
                k = serialization.load_der_private_key(der, password=None)
            except ValueError:
                if private:
                    raise
                k = serialization.load_der_public_key(der)
        except (ValueError, TypeError, UnsupportedAlgorithm) as e:
            raise _Fail(Status.BAD_KEY, 3) from e
        if not isinstance(k, rsa.RSAPrivateKey | rsa.RSAPublicKey):
            raise _Fail(Status.BAD_KEY, 4)
        if len(cache) >= MAX_KEYS:
            del cache[next(iter(cache))]
        cache[der] = k
    if private and not isinstance(k, rsa.RSAPrivateKey):
        raise _Fail(Status.BAD_KEY, 5)  # a public key cannot decrypt or sign
    return k


def _rsa(streams: StreamTable, o: Op, a: Alg, der: bytes, src: memoryview) -> bytes:
    if not der:
        raise _Fail(Status.BAD_KEY)
    data = bytes(src)
    if a is Alg.RSA_OAEP:
        if o is Op.ENCRYPT:
            k = _rsa_key(streams, der, False)
            pub = k.public_key() if isinstance(k, rsa.RSAPrivateKey) else k
            try:
                return bytes(pub.encrypt(data, _OAEP))
            except ValueError as e:  # message too long for the modulus
                raise _Fail(Status.INVALID_REQUEST) from e
        if o is Op.DECRYPT:
            try:
                return bytes(_rsa_key(streams, der, True).decrypt(data, _OAEP))
            except ValueError as e:  # wrong key or tampered ciphertext
                raise _Fail(Status.CORRUPT_INPUT) from e
        raise _Fail(Status.INVALID_REQUEST)
    pad: padding.AsymmetricPadding = (
        padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)
        if a is Alg.RSA_PSS
        else padding.PKCS1v15()
    )
    if o is Op.SIGN:
        return bytes(_rsa_key(streams, der, True).sign(data, pad, hashes.SHA256()))
    if o is Op.VERIFY:
        k = _rsa_key(streams, der, False)
        pub = k.public_key() if isinstance(k, rsa.RSAPrivateKey) else k
        n = pub.key_size // 8
        if len(data) < n:
            raise _Fail(Status.INVALID_REQUEST)
        try:
            pub.verify(data[:n], data[n:], pad, hashes.SHA256())
        except InvalidSignature as e:
            raise _Fail(Status.AUTH_FAILED) from e
        return b""
    raise _Fail(Status.INVALID_REQUEST)


# --- one request --------------------------------------------------------------


def run_op(
    cfg: EngineConfig,
    streams: StreamTable,
    op: int,
    alg: int,
    alg2: int,
    level: int,
    flags: int,
    stream_id: int,
    key: bytes,
    iv: bytes,
    tag_len: int,
    src: memoryview,
    aad: memoryview | bytes,
    cap: int,
) -> EngineResult:
    """Execute one request on in-memory buffers; never raises for bad input.

    Raises:
        InjectedCrash, InjectedHang: only for ``Op.INJECT`` on a device that allows it.
    """
    try:
        o = _OP.get(op)
        a = _ALG.get(alg)
        a2 = _ALG.get(alg2)
        if o is None or a is None or a2 is None:
            raise _Fail(Status.INVALID_REQUEST)
        if o is Op.NOP:
            return EngineResult(Status.OK)
        if o is Op.INJECT:
            if not cfg.allow_inject:
                raise _Fail(Status.UNSUPPORTED)
            if alg == 1:
                raise InjectedCrash("injected engine crash")
            if alg == 2:
                raise InjectedHang("injected engine hang")
            raise _Fail(Status.INVALID_REQUEST)
        if a not in cfg.algorithms:
            raise _Fail(Status.UNSUPPORTED)
        if a in RSA_ALGS:
            out = _rsa(streams, o, a, bytes(aad), src)
            if len(out) > cap:
                raise _Fail(Status.OUT_OF_SPACE_TERMINATED)
            return EngineResult(Status.OK, len(src), out)
        if o in (Op.SIGN, Op.VERIFY):
            raise _Fail(Status.INVALID_REQUEST)
        if o in (Op.COMPRESS, Op.DECOMPRESS):
            if a not in COMP_ALGS:
                raise _Fail(Status.INVALID_REQUEST)
            if flags & ReqFlag.STREAM:
                return _run_stream(streams, o, a, level, flags, stream_id, key, src, cap)
            if o is Op.COMPRESS:
                return EngineResult(Status.OK, len(src), _compress(a, level, src, cap))
            return EngineResult(Status.OK, len(src), _decompress(a, src, cap))
        if o in (Op.ENCRYPT, Op.DECRYPT):
            if a not in CIPHER_ALGS:
                raise _Fail(Status.INVALID_REQUEST)
            out = _cipher(a, o is Op.ENCRYPT, key, iv, tag_len, src, aad)
            if len(out) > cap:
                raise _Fail(Status.OUT_OF_SPACE_TERMINATED)
            return EngineResult(Status.OK, len(src), out)
        if o is Op.DIGEST:
            if a not in DIGEST_ALGS:
                raise _Fail(Status.INVALID_REQUEST)
            if flags & ReqFlag.STREAM:
                return _run_stream(streams, o, a, level, flags, stream_id, key, src, cap)
            h = _digest_obj(a, key)
            h.update(src)
            out = h.finalize()
            if len(out) > cap:
                raise _Fail(Status.OUT_OF_SPACE_TERMINATED)
            return EngineResult(Status.OK, len(src), out)
        # chains: the intermediate buffer never leaves the engines
        if not cfg.chaining or a not in COMP_ALGS or a2 not in CIPHER_ALGS:
            raise _Fail(Status.UNSUPPORTED if not cfg.chaining else Status.INVALID_REQUEST)
        if o is Op.COMPRESS_ENCRYPT:
            mid = zlib.compress(src, level, _WBITS[a])
            out = _cipher(a2, True, key, iv, tag_len, mid, aad)
            if len(out) > cap:
                raise _Fail(Status.OUT_OF_SPACE_TERMINATED)
            return EngineResult(Status.OK, len(src), out)
        mid = _cipher(a2, False, key, iv, tag_len, src, aad)
        return EngineResult(Status.OK, len(src), _decompress(a, mid, cap))
    except _Fail as f:
        return EngineResult(f.status, detail=f.detail)


def _run_stream(
    streams: StreamTable,
    o: Op,
    a: Alg,
    level: int,
    flags: int,
    sid: int,
    key: bytes,
    src: memoryview,
    cap: int,
) -> EngineResult:
    st = streams.streams.get(sid)
    if st is None:
        if len(streams.streams) >= MAX_STREAMS:
            raise _Fail(Status.INVALID_REQUEST, 2)
        if o is Op.COMPRESS:
            if not -1 <= level <= 9:
                raise _Fail(Status.INVALID_REQUEST)
            obj: Any = zlib.compressobj(level, zlib.DEFLATED, _WBITS[a])
        elif o is Op.DECOMPRESS:
            obj = zlib.decompressobj(_WBITS[a])
        else:
            obj = _digest_obj(a, key)
        st = streams.streams[sid] = _Stream(a, o, obj)
    elif st.alg is not a or st.op is not o:
        raise _Fail(Status.INVALID_REQUEST, 3)
    if o is Op.DIGEST:
        st.obj.update(src)
        if not flags & ReqFlag.FINISH:
            return EngineResult(Status.OK, len(src))
        out = st.obj.finalize()
        del streams.streams[sid]
        if len(out) > cap:
            raise _Fail(Status.OUT_OF_SPACE_TERMINATED)
        return EngineResult(Status.OK, len(src), out)
    try:
        status, consumed, out, done = _stream_comp(st, flags, src, cap)
    except _Fail:
        streams.streams.pop(sid, None)
        raise
    if done:
        del streams.streams[sid]
    return EngineResult(status, consumed, out, 1 if done else 0)


# --- the device side of one queue ---------------------------------------------


class QueueServer:
    """Serves one queue: ring core (device side) + header parsing + engines.

    ``ring_mem`` is the whole queue region (rings and request slots) as seen
    on the queue's bus; a request is one device-writable descriptor of
    ``SLOT_SIZE`` bytes (header, then the response at ``RESP_OFF``).
    ``data_mem`` is the part requests may point into (the shared heap):
    every ``src``/``dst``/``aad`` is resolved through it, on every request,
    and refused with ``ACCESS_FAULT`` if outside (PASID).
    ``words`` is the status page (u64 cast) or None.

    :meth:`serve` raises :class:`~virtio.split.RingError` (ring latched) for a
    malformed ring, and :class:`InjectedCrash`/:class:`InjectedHang` for
    injected faults; per-request problems never raise.
    """

    def __init__(
        self,
        ring_mem: Memory,
        layout: Any,
        data_mem: Memory,
        cfg: EngineConfig,
        words: memoryview | None = None,
    ) -> None:
        self.dq = DeviceQueue(ring_mem, layout, 0, require_writable=True)
        # A fresh attach (first start or after a reset) must not inherit the
        # used-ring flags a dead engine left behind (e.g. NO_NOTIFY): reset.
        self.dq.reset()
        self.dq.activate()
        self.data = data_mem
        self.cfg = cfg
        self.streams = StreamTable()
        #: publish completions early once this much engine time passed in a batch
        self.publish_ns = 200_000
        self.words = words if words is not None else memoryview(bytearray(8 * 16)).cast("Q")

    def reset(self) -> None:
        """Forget ring indices and streams (queue reset; the driver resets its side too)."""
        self.dq.reset()
        self.dq.activate()
        self.streams.clear()

    def serve(self, clock: Callable[[], int], max_batch: int = 64) -> tuple[int, bool]:
        """Pop and execute what is available; returns ``(requests done, interrupt)``.

        Completions are published every ~200 µs of engine time so an app with
        a long batch sees early results, and at the end.
        """
        dq = self.dq
        w = self.words
        irq = False
        chains = dq.pop_many(max_batch)
        if not chains:
            return 0, False
        t0 = last_pub = start = clock()
        busy = StatusWord.BUSY_SINCE
        one = self._one
        publish_ns = self.publish_ns
        used: list[tuple[int, int]] = []
        for chain in chains:
            w[busy] = t0
            bufs = chain.writable
            if len(bufs) == 1 and not chain.readable:
                used.append((chain.head, one(bufs[0])))
            else:  # not a request slot: nowhere agreed to answer in
                w[StatusWord.ERRORS] += 1
                used.append((chain.head, 0))
            t1 = clock()
            if t1 - last_pub > publish_ns:
                dq.add_used_many(used)
                used.clear()
                irq |= dq.publish_used()
                last_pub = t1
            t0 = t1
        w[busy] = 0
        done = len(chains)
        w[StatusWord.ENGINE_NS] += t0 - start
        w[StatusWord.REQUESTS] += done
        dq.add_used_many(used)
        irq |= dq.publish_used()
        return done, irq

    def _one(self, slot: memoryview) -> int:
        """Serve the request in ``slot``; return the used length (SLOT_SIZE; 0: unanswered)."""
        w = self.words
        if len(slot) < SLOT_SIZE:
            w[StatusWord.ERRORS] += 1
            return 0
        (
            ver,
            op,
            alg,
            alg2,
            level,
            flags,
            klen,
            ivlen,
            tlen,
            sid,
            sa,
            sl,
            dl,
            da,
            aa,
            al,
            key,
            iv,
        ) = REQ_STRUCT.unpack_from(slot, 0)
        if op == 0 and ver == WIRE_VERSION:  # NOP: nothing to resolve
            RESP_STRUCT.pack_into(slot, RESP_OFF, 0, 0, 0, 0, 0)
            return SLOT_SIZE
        if ver != WIRE_VERSION or klen > len(key) or ivlen > len(iv):
            res = EngineResult(Status.INVALID_REQUEST)
        else:
            try:
                data = self.data
                src = data.view(sa, sl) if sl else memoryview(b"")
                aad = data.view(aa, al) if al else b""
                dst = data.view(da, dl, True) if dl else None
            except MemoryFault as e:
                w[StatusWord.ACCESS_FAULTS] += 1
                w[StatusWord.ERRORS] += 1
                RESP_STRUCT.pack_into(
                    slot, RESP_OFF, Status.ACCESS_FAULT, 0, 0, 0, e.addr & (2**64 - 1)
                )
                return SLOT_SIZE
            res = run_op(
                self.cfg, self.streams, op, alg, alg2, level, flags, sid,
                key[:klen], iv[:ivlen], tlen, src, aad, dl,
            )  # fmt: skip
            if res.output:
                n = len(res.output)
                assert dst is not None  # cap == dl == 0 makes any output too big
                dst[:n] = res.output
        produced = len(res.output)
        if res.status:
            w[StatusWord.ERRORS] += 1
        w[StatusWord.BYTES_IN] += res.consumed
        w[StatusWord.BYTES_OUT] += produced
        RESP_STRUCT.pack_into(slot, RESP_OFF, res.status, res.consumed, produced, 0, res.detail)
        return SLOT_SIZE
