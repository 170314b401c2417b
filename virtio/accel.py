"""Wire format of accelerator queues: request header, response, status page, queue region.

Owns every byte layout an accelerator queue puts in shared memory (api
``mic-accel-v2``), on the card (app and engine worker) and between a host
script and the card (``mic_host.client.accel``): both sides import it from here
(``mic_host`` and ``mic_card`` never import each other). Each layout is
declared once with ``construct`` (the source of truth) and has a precompiled
``struct.Struct`` twin for the hot path; the two are tested against each other
(``tests/accel/test_wire.py``), as STYLE.md §4 asks. Must not import asyncio,
the OS, ``transport``, ``mic_host`` or ``mic_card``.

A request is one descriptor of the split ring (``virtio.split``): a
device-writable request slot of :data:`SLOT_SIZE` bytes, as an NVMe or
HiSilicon QM slot holds a submission entry and its completion::

    slot +0        header (REQ_SIZE B, written by the app, read by the engine)
    slot +RESP_OFF response (RESP_SIZE B, written by the engine)

One descriptor instead of a ``[header | response]`` pair halves the ring
work per request and keeps every request on the ring core's one-buffer fast
paths (``DriverQueue.add``, ``DeviceQueue.pop_many``, ``get_used_many``).
The used length is :data:`SLOT_SIZE` when the engine answered, anything
shorter means it could not (the app reports ``INVALID_REQUEST``).

Data buffers are *not* descriptors: the header carries their bus addresses
(``src``, ``dst``, ``aad``) as a real SVA accelerator's SQE does, and the engine
resolves them through the queue's own address space on every request. An
address outside it is answered with ``Status.ACCESS_FAULT`` for that request
only (the ring stays usable); a descriptor outside the ring area is a ring
error, which latches the queue broken until it is reset.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag

from construct import Bytes, Const, Int8ul, Int32ul, Int64ul, Padding, Struct

from virtio.errors import MicError
from virtio.split import SplitLayout

__all__ = [
    "API",
    "KEY_MAX",
    "IV_MAX",
    "REQ_SIZE",
    "RESP_OFF",
    "RESP_SIZE",
    "SLOT_SIZE",
    "REQ_STRUCT",
    "RESP_STRUCT",
    "ReqHeader",
    "RespHeader",
    "Op",
    "Alg",
    "ALG_NAMES",
    "ReqFlag",
    "Status",
    "QueueGeometry",
    "StatusWord",
    "QUEUE_RING_SIZE",
    "STATUS_MAGIC",
    "WIRE_VERSION",
    "alg_by_name",
    "output_bound",
    "RSA_ALGS",
    "RSA_MAX_BYTES",
    "GCM_TAG_LEN",
    "ALIGN",
    "STATUS_BY_VALUE",
    "AccelRequestError",
    "align",
    "tag_len",
    "key_fields",
    "pack_request",
    "read_response",
    "OFFLOAD_PROTOCOL",
    "OFFLOAD_DEFAULT_HEAP",
    "OFFLOAD_MIN_HEAP",
    "OFFLOAD_MAX_HEAP",
]

#: uacce ``api`` attribute of every device of this framework (queue format + version).
#: v2: one descriptor (a request slot) per request; v1 used a two-descriptor chain.
API = "mic-accel-v2"
WIRE_VERSION = 1
KEY_MAX = 64
IV_MAX = 16


class Op(IntEnum):
    """What a request asks for."""

    NOP = 0  #: do nothing (framework-overhead measurements)
    COMPRESS = 1
    DECOMPRESS = 2
    ENCRYPT = 3
    DECRYPT = 4
    DIGEST = 5
    COMPRESS_ENCRYPT = 6  #: chain: compress with ``alg``, then encrypt with ``alg2``
    DECRYPT_DECOMPRESS = 7  #: chain: decrypt with ``alg2``, then decompress with ``alg``
    INJECT = 8  #: fault injection (``alg`` = 1 crash, 2 hang); only if the device allows it
    SIGN = 9  #: RSA: sign ``src`` with the private key in the key buffer
    VERIFY = 10  #: RSA: ``src`` = signature (modulus size) then message; AUTH_FAILED if bad


class Alg(IntEnum):
    """Algorithms (the number is the wire value; ``ALG_NAMES`` the uacce names)."""

    NONE = 0
    DEFLATE = 1
    ZLIB = 2
    GZIP = 3
    AES_CBC = 16
    AES_CTR = 17
    AES_XTS = 18
    AES_GCM = 19
    SHA256 = 32
    SHA512 = 33
    HMAC_SHA256 = 34
    HMAC_SHA512 = 35
    RSA_OAEP = 48  #: encrypt/decrypt, OAEP with SHA-256 (MGF1 SHA-256)
    RSA_PSS = 49  #: sign/verify, PSS with SHA-256 (salt = digest length)
    RSA_PKCS1 = 50  #: sign/verify, PKCS#1 v1.5 with SHA-256 (deterministic)


ALG_NAMES: dict[Alg, str] = {
    Alg.DEFLATE: "deflate",
    Alg.ZLIB: "zlib",
    Alg.GZIP: "gzip",
    Alg.AES_CBC: "aes-cbc",
    Alg.AES_CTR: "aes-ctr",
    Alg.AES_XTS: "aes-xts",
    Alg.AES_GCM: "aes-gcm",
    Alg.SHA256: "sha256",
    Alg.SHA512: "sha512",
    Alg.HMAC_SHA256: "hmac-sha256",
    Alg.HMAC_SHA512: "hmac-sha512",
    Alg.RSA_OAEP: "rsa-oaep",
    Alg.RSA_PSS: "rsa-pss",
    Alg.RSA_PKCS1: "rsa-pkcs1v15",
}
#: RSA requests carry their key (DER: PKCS#8 private or SubjectPublicKeyInfo
#: public) in the ``aad`` buffer, as HiSilicon HPRE's BD points at a key buffer:
#: it does not fit the header's 64 inline bytes.
RSA_ALGS = frozenset({Alg.RSA_OAEP, Alg.RSA_PSS, Alg.RSA_PKCS1})
#: output bound of RSA requests (moduli up to 4096 bits)
RSA_MAX_BYTES = 512
#: tag length of AES-GCM requests (alone or in a chain)
GCM_TAG_LEN = 16
_BY_NAME = {v: k for k, v in ALG_NAMES.items()}


def alg_by_name(name: str) -> Alg:
    """The :class:`Alg` called ``name`` (raises KeyError with the known names)."""
    try:
        return _BY_NAME[name.lower()]
    except KeyError:
        raise KeyError(f"unknown algorithm {name!r}; known: {', '.join(_BY_NAME)}") from None


def tag_len(alg: Alg, alg2: Alg = Alg.NONE) -> int:
    """The header's ``tag_len`` for a request on ``alg`` (chained with ``alg2``)."""
    return GCM_TAG_LEN if Alg.AES_GCM in (alg, alg2) else 0


def key_fields(alg: Alg, key: bytes) -> tuple[bytes, bytes | None]:
    """Where a session's ``key`` goes: ``(inline key, key buffer)``.

    RSA keys (DER) do not fit the header's inline bytes: they travel in the
    key buffer (the request's ``aad``) and the inline key is empty. Every
    other key is inline and the key buffer is None (``aad`` is the caller's).
    """
    if alg in RSA_ALGS:
        return b"", key
    return key, None


class ReqFlag(IntFlag):
    """Request flags."""

    STREAM = 1  #: stateful: the engine keeps state under ``stream_id``
    SYNC_FLUSH = 2  #: stream compression: emit everything so far (Z_SYNC_FLUSH)
    FINISH = 4  #: stream: last piece; the state is dropped once drained


class Status(IntEnum):
    """Per-request status written by the engine (or by the framework for faults).

    Modelled on DPDK ``rte_comp_op_status`` and UADK ``req.status``: nothing in
    here faults the queue.
    """

    OK = 0
    OUT_OF_SPACE_RECOVERABLE = 1  #: output full; ``consumed`` says how much input was used
    OUT_OF_SPACE_TERMINATED = 2  #: output too small; nothing was produced (stateless)
    INVALID_REQUEST = 3  #: malformed header, bad lengths, unknown op/alg pairing
    UNSUPPORTED = 4  #: the device does not offer this algorithm/op
    BAD_KEY = 5  #: key (or IV) of the wrong size or refused by the cipher
    CORRUPT_INPUT = 6  #: compressed input that does not decode, or is truncated
    AUTH_FAILED = 7  #: AEAD tag mismatch
    ACCESS_FAULT = 8  #: a buffer outside the queue's address space (PASID check)
    ENGINE_FAULT = 9  #: the engine crashed or hung; set by the framework
    QUEUE_RESET = 10  #: discarded by a queue reset or release


#: :class:`Status` by wire value (a value not in it reads as ``INVALID_REQUEST``)
STATUS_BY_VALUE: dict[int, Status] = {int(s): s for s in Status}


class AccelRequestError(MicError):
    """A request came back with a non-OK status (``status``, ``consumed``, ``produced``).

    Raised by the synchronous ``do`` of both sides (the card's
    ``mic_card.accel.RequestError`` and the host's ``mic_host.client.accel`` sessions);
    for ``OUT_OF_SPACE_RECOVERABLE`` ``consumed`` says where to resume.
    """

    def __init__(
        self, status: Status, message: str, *, consumed: int = 0, produced: int = 0
    ) -> None:
        super().__init__(f"{status.name}: {message}")
        self.status = status
        self.consumed = consumed
        self.produced = produced


# --- request header -----------------------------------------------------------

#: The request header (136 bytes). ``key``/``iv`` are inline, as in a HiSilicon
#: SEC BD; ``src``/``dst``/``aad`` are bus addresses in the queue's space.
ReqHeader = Struct(
    "version" / Const(WIRE_VERSION, Int8ul),
    "op" / Int8ul,
    "alg" / Int8ul,
    "alg2" / Int8ul,
    "level" / Int8ul,
    "flags" / Int8ul,
    "key_len" / Int8ul,
    "iv_len" / Int8ul,
    "tag_len" / Int8ul,
    Padding(3),
    "stream_id" / Int32ul,
    "src_addr" / Int64ul,
    "src_len" / Int32ul,
    "dst_len" / Int32ul,
    "dst_addr" / Int64ul,
    "aad_addr" / Int64ul,
    "aad_len" / Int32ul,
    Padding(4),
    "key" / Bytes(KEY_MAX),
    "iv" / Bytes(IV_MAX),
)
#: Hot-path twin of :data:`ReqHeader` (field order identical; tested).
REQ_STRUCT = struct.Struct("<BBBBBBBBB3xIQIIQQI4x64s16s")
REQ_SIZE = REQ_STRUCT.size

#: The response the engine writes into the writable descriptor (32 bytes).
RespHeader = Struct(
    "status" / Int8ul,
    Padding(3),
    "consumed" / Int32ul,
    "produced" / Int32ul,
    "engine_us" / Int32ul,
    "detail" / Int64ul,
    Padding(8),
)
RESP_STRUCT = struct.Struct("<B3xIIIQ8x")
RESP_SIZE = RESP_STRUCT.size
#: one request slot: header at +0, response at +RESP_OFF (its last RESP_SIZE bytes)
SLOT_SIZE = 256
RESP_OFF = SLOT_SIZE - RESP_SIZE
#: heap blocks (source, key buffer/aad, output) start on this boundary (a cache line)
ALIGN = 64


def align(n: int, a: int = ALIGN) -> int:
    """``n`` rounded up to a multiple of ``a`` (a power of two)."""
    return (n + a - 1) & -a


def pack_request(
    buf: memoryview | bytearray, off: int, op: int, alg: int, alg2: int, level: int,
    flags: int, stream_id: int, key: bytes, iv: bytes, tag_len: int,
    src: int, src_len: int, dst: int, dst_len: int, aad: int, aad_len: int,
) -> None:  # fmt: skip
    """Write a request header (:data:`ReqHeader`) at ``buf[off:]``; addresses are bus addresses."""
    REQ_STRUCT.pack_into(
        buf, off, WIRE_VERSION, op, alg, alg2, level, flags, len(key), len(iv), tag_len,
        stream_id, src, src_len, dst_len, dst, aad, aad_len, key, iv,
    )  # fmt: skip


def read_response(buf: memoryview | bytearray, off: int) -> tuple[Status, int, int, int]:
    """``(status, consumed, produced, detail)`` of the response (:data:`RespHeader`) at ``off``.

    A status value the engine should not write reads as ``INVALID_REQUEST``;
    ``produced`` is as written (the caller bounds it by its output buffer).
    """
    st, consumed, produced, _us, detail = RESP_STRUCT.unpack_from(buf, off)
    return STATUS_BY_VALUE.get(st, Status.INVALID_REQUEST), consumed, produced, detail


# --- status page (one page at offset 0 of every queue region) -----------------


class StatusWord(IntEnum):
    """u64 word indices of the status page; each word has exactly one writer."""

    MAGIC = 0  #: framework
    BUSY_SINCE = 1  #: worker: CLOCK_MONOTONIC ns when the current request began, 0 idle
    DISABLED = 2  #: framework: 1 after a fault/reset/put (checked before each doorbell)
    REQUESTS = 3  #: worker: requests completed
    ERRORS = 4  #: worker: requests completed with a non-OK status
    BYTES_IN = 5  #: worker
    BYTES_OUT = 6  #: worker
    ACCESS_FAULTS = 7  #: worker: PASID refusals
    ENGINE_NS = 8  #: worker: time spent in engines
    HEARTBEAT = 9  #: worker: bumped once per doorbell batch


STATUS_MAGIC = int.from_bytes(b"MICACCQ1", "little")
#: ring entries of every queue (each request uses one descriptor: one slot per entry)
QUEUE_RING_SIZE = 256
_PAGE = 4096


@dataclass(frozen=True, slots=True)
class QueueGeometry:
    """Where things are inside one queue's region (offsets) and on its bus (addresses).

    Region: ``status page | split ring | request slots | shared heap``. The
    queue's bus base is ``pasid << 32``: two queues never share an address, so
    a request carrying another queue's address is refused by this queue's
    memory.
    """

    pasid: int
    heap_size: int
    ring_size: int = QUEUE_RING_SIZE

    @property
    def base(self) -> int:
        return self.pasid << 32

    @property
    def ring_off(self) -> int:
        return _PAGE

    @property
    def layout(self) -> SplitLayout:
        return SplitLayout.contiguous(self.base + self.ring_off, self.ring_size)

    @property
    def slots(self) -> int:
        return self.ring_size

    @property
    def slot_off(self) -> int:
        end = self.ring_off + SplitLayout.contiguous_bytes(self.ring_size)
        return (end + _PAGE - 1) // _PAGE * _PAGE

    def slot_addr(self, slot: int) -> int:
        """Bus address of request slot ``slot`` (the one descriptor of its requests)."""
        return self.base + self.slot_off + slot * SLOT_SIZE

    @property
    def heap_off(self) -> int:
        return self.slot_off + self.slots * SLOT_SIZE

    @property
    def heap_addr(self) -> int:
        return self.base + self.heap_off

    @property
    def region_size(self) -> int:
        return self.heap_off + self.heap_size


def output_bound(op: Op, n: int, out_size: int | None, alg: Alg = Alg.NONE) -> int:
    """The output buffer a request of ``n`` input bytes needs (decompression: a guess)."""
    if alg in RSA_ALGS:
        return RSA_MAX_BYTES
    if op in (Op.COMPRESS, Op.COMPRESS_ENCRYPT):
        # zlib compressBound + gzip header/trailer + GCM tag
        return n + (n >> 12) + (n >> 14) + (n >> 25) + 13 + 18 + 16
    if op in (Op.DECOMPRESS, Op.DECRYPT_DECOMPRESS):
        return out_size or max(4 * n, 64 << 10)
    if op is Op.DIGEST:
        return 64
    return n + 16


# --- offload channels (a host script's queue in card RAM) ------------------------

#: the offload endpoint's protocol name (``open`` requests carry it)
OFFLOAD_PROTOCOL = "mic-accel-offload-1"
#: heap of an offload channel: default and bounds (card RAM is the limit)
OFFLOAD_DEFAULT_HEAP = 4 << 20
OFFLOAD_MIN_HEAP = 64 << 10
OFFLOAD_MAX_HEAP = 32 << 20
