"""The vhost-user wire protocol (QEMU docs/interop/vhost-user.rst), sans-IO.

Owns the message layouts, declared once with ``construct`` (the source of
truth, tested byte for byte against the precompiled ``struct`` twins used on
the hot path), the request and feature numbers, and the codec both sides use:

- :func:`encode` turns a request (or a reply) and its payload into bytes;
- :func:`parse_header` checks the 12-byte header a peer sent (version, flags,
  payload size);
- :func:`check_fds` checks that a message came with exactly the file
  descriptors its request carries (missing and extra fds are refused);
- the ``decode_*`` functions turn a payload into values, refusing any size
  other than the layout's.

The header and payloads are in the host's byte order (the protocol is
native-endian: both ends share one machine). Every refusal is a
:class:`~virtio.errors.RemoteProtocolError` whose message names the request.
No I/O here: the socket, fd passing and memory mapping live in
:mod:`transport.vhost_user.channel` and :mod:`transport.vhost_user.memory`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag

from construct import Array, Bytes, Int8un, Int16un, Int32un, Int64un, Padding, Struct, this

from virtio.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "CONFIG_HDR",
    "CONFIG_PAYLOAD_MAX",
    "FLAG_NEED_REPLY",
    "FLAG_REPLY",
    "HEADER",
    "INFLIGHT",
    "INFLIGHT_DESC",
    "INFLIGHT_HDR",
    "MAX_FDS",
    "MAX_MEM_REGIONS",
    "MAX_PAYLOAD",
    "MEM_REGION",
    "PROTOCOL_FEATURES_BIT",
    "U64",
    "VERSION",
    "VRING_ADDR",
    "VRING_NOFD",
    "VRING_STATE",
    "ConfigLayout",
    "HeaderLayout",
    "InflightDescLayout",
    "InflightHeaderLayout",
    "InflightLayout",
    "MemRegion",
    "MemoryTableLayout",
    "Message",
    "ProtocolFeature",
    "Request",
    "VringAddr",
    "VringAddrLayout",
    "VringStateLayout",
    "check_fds",
    "decode_config",
    "decode_inflight",
    "decode_mem_table",
    "decode_u64",
    "decode_vring_addr",
    "decode_vring_state",
    "encode",
    "encode_mem_table",
    "parse_header",
    "reason",
]

#: Protocol version in the low two bits of the header flags.
VERSION = 1
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
#: Bits 0-7 of a KICK/CALL/ERR u64 are the queue index; bit 8 means "no fd".
VRING_IDX_MASK = 0xFF
VRING_NOFD = 0x100
#: Virtio feature bit 30: the back-end speaks the protocol-feature extension.
PROTOCOL_FEATURES_BIT = 1 << 30
#: SET_MEM_TABLE carries at most this many regions (VHOST_MEMORY_BASELINE_NREGIONS).
MAX_MEM_REGIONS = 8
#: fds one message may carry (the memory table's regions).
MAX_FDS = MAX_MEM_REGIONS
#: The largest config space a GET_CONFIG/SET_CONFIG carries (VHOST_USER_MAX_CONFIG_SIZE).
CONFIG_PAYLOAD_MAX = 256
#: No request's payload is larger than a full memory table; anything bigger is garbage.
MAX_PAYLOAD = 4096


class Request(IntEnum):
    """Front-end requests (``VhostUserRequest``)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class ProtocolFeature(IntFlag):
    """``VHOST_USER_PROTOCOL_F_*`` bits (negotiated after PROTOCOL_FEATURES)."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    NET_MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16


# -- layouts: construct declarations (the truth) and their struct twins ---------------

HeaderLayout = Struct("request" / Int32un, "flags" / Int32un, "size" / Int32un)
HEADER = struct.Struct("=III")

U64Layout = Struct("value" / Int64un)
U64 = struct.Struct("=Q")

VringStateLayout = Struct("index" / Int32un, "num" / Int32un)
VRING_STATE = struct.Struct("=II")

VringAddrLayout = Struct(
    "index" / Int32un,
    "flags" / Int32un,
    "desc_user_addr" / Int64un,
    "used_user_addr" / Int64un,
    "avail_user_addr" / Int64un,
    "log_guest_addr" / Int64un,
)
VRING_ADDR = struct.Struct("=IIQQQQ")

MemRegionLayout = Struct(
    "guest_phys_addr" / Int64un,
    "memory_size" / Int64un,
    "userspace_addr" / Int64un,
    "mmap_offset" / Int64un,
)
MEM_REGION = struct.Struct("=QQQQ")

MemoryTableLayout = Struct(
    "nregions" / Int32un,
    Padding(4),
    "regions" / Array(this.nregions, MemRegionLayout),
)
MEM_TABLE_HDR = struct.Struct("=I4x")

ConfigLayout = Struct(
    "offset" / Int32un,
    "size" / Int32un,
    "flags" / Int32un,
    "payload" / Bytes(this.size),
)
CONFIG_HDR = struct.Struct("=III")

#: GET_INFLIGHT_FD / SET_INFLIGHT_FD (``VhostUserInflight``; padded to 8 as in C)
InflightLayout = Struct(
    "mmap_size" / Int64un,
    "mmap_offset" / Int64un,
    "num_queues" / Int16un,
    "queue_size" / Int16un,
    Padding(4),
)
INFLIGHT = struct.Struct("=QQHH4x")

#: The shared inflight region, per split queue ("Inflight I/O tracking"): a header
#: (``VuVirtqInflight``) then ``desc_num`` entries (``VuDescStateSplit``).
InflightHeaderLayout = Struct(
    "features" / Int64un,
    "version" / Int16un,
    "desc_num" / Int16un,
    "last_batch_head" / Int16un,
    "used_idx" / Int16un,
)
INFLIGHT_HDR = struct.Struct("=QHHHH")
InflightDescLayout = Struct(
    "inflight" / Int8un,
    Padding(5),
    "next" / Int16un,
    "counter" / Int64un,
)
INFLIGHT_DESC = struct.Struct("=B5xHQ")


def reason(request: int) -> str:
    """A request's name for messages (``SET_VRING_ADDR``, or ``request 99``)."""
    try:
        return Request(request).name
    except ValueError:
        return f"request {request}"


@dataclass(frozen=True, slots=True)
class Message:
    """One received message: its header fields, payload and the fds it carried."""

    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return reason(self.request)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)


@dataclass(frozen=True, slots=True)
class MemRegion:
    """One region of the front-end's memory table."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int


@dataclass(frozen=True, slots=True)
class VringAddr:
    """SET_VRING_ADDR: the ring parts as front-end (user) virtual addresses."""

    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int


# -- encoding --------------------------------------------------------------------------


def encode(
    request: int, payload: bytes = b"", *, reply: bool = False, need_reply: bool = False
) -> bytes:
    """Header and payload of one message, ready to send (fds go alongside).

    Raises:
        LocalProtocolError: the payload is larger than any request carries.
    """
    if len(payload) > MAX_PAYLOAD:
        raise LocalProtocolError(f"{reason(request)} payload of {len(payload)} B is too large")
    flags = VERSION | (FLAG_REPLY if reply else 0) | (FLAG_NEED_REPLY if need_reply else 0)
    return HEADER.pack(int(request), flags, len(payload)) + payload


def encode_mem_table(regions: list[MemRegion]) -> bytes:
    """The SET_MEM_TABLE payload (``nregions``, padding, the regions)."""
    if not 1 <= len(regions) <= MAX_MEM_REGIONS:
        raise LocalProtocolError(f"a memory table holds 1..{MAX_MEM_REGIONS} regions")
    return MEM_TABLE_HDR.pack(len(regions)) + b"".join(
        MEM_REGION.pack(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
        for r in regions
    )


# -- decoding (everything a peer sends is untrusted) ------------------------------------


def parse_header(
    raw: bytes | bytearray | memoryview, *, expect_reply: bool = False
) -> tuple[int, int, int]:
    """``(request, flags, size)`` of a 12-byte header.

    Raises:
        RemoteProtocolError: wrong length, wrong version, a reply where a
            request was due (or the reverse), or a payload size over
            :data:`MAX_PAYLOAD` (``reason="vhost-user"``).
    """
    if len(raw) != HEADER.size:
        raise RemoteProtocolError(
            f"truncated vhost-user header: {len(raw)} of {HEADER.size} B", reason="vhost-user"
        )
    request, flags, size = HEADER.unpack(raw)
    name = reason(request)
    if flags & FLAG_VERSION_MASK != VERSION:
        raise RemoteProtocolError(
            f"{name}: protocol version {flags & FLAG_VERSION_MASK}, expected {VERSION}",
            reason="vhost-user",
        )
    if bool(flags & FLAG_REPLY) != expect_reply:
        what = "a reply" if flags & FLAG_REPLY else "a request"
        raise RemoteProtocolError(f"{name}: got {what} out of turn", reason="vhost-user")
    if size > MAX_PAYLOAD:
        raise RemoteProtocolError(
            f"{name}: payload of {size} B exceeds {MAX_PAYLOAD} B", reason="vhost-user"
        )
    return request, flags, size


def _fds_wanted(msg: Message) -> int | None:
    """How many fds ``msg`` must carry (None: any, the request does not say)."""
    r = msg.request
    if r == Request.SET_MEM_TABLE:
        if len(msg.payload) >= MEM_TABLE_HDR.size:
            return int(MEM_TABLE_HDR.unpack_from(msg.payload)[0])
        return None
    if r in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
        if len(msg.payload) == U64.size:
            return 0 if U64.unpack(msg.payload)[0] & VRING_NOFD else 1
        return None
    if r in (
        Request.SET_LOG_BASE,
        Request.SET_LOG_FD,
        Request.SET_BACKEND_REQ_FD,
        Request.SET_INFLIGHT_FD,
        Request.ADD_MEM_REG,
    ):
        return 1
    if r == Request.REM_MEM_REG:
        return None  # QEMU sends the region's fd along; the spec says not to rely on it
    return 0


def check_fds(msg: Message) -> None:
    """Refuse a message with missing or extra fds (the caller still owns and closes them).

    Raises:
        RemoteProtocolError: the number of fds does not match the request.
    """
    want = _fds_wanted(msg)
    if want is not None and len(msg.fds) != want:
        raise RemoteProtocolError(
            f"{msg.name}: came with {len(msg.fds)} file descriptors, expected {want}",
            reason="vhost-user",
        )


def _size(msg: Message, want: int) -> None:
    if len(msg.payload) != want:
        raise RemoteProtocolError(
            f"{msg.name}: payload of {len(msg.payload)} B, expected {want} B", reason="vhost-user"
        )


def decode_u64(msg: Message) -> int:
    _size(msg, U64.size)
    return int(U64.unpack(msg.payload)[0])


def decode_vring_state(msg: Message) -> tuple[int, int]:
    """``(index, num)`` of SET_VRING_NUM/BASE/ENABLE, GET_VRING_BASE."""
    _size(msg, VRING_STATE.size)
    index, num = VRING_STATE.unpack(msg.payload)
    return int(index), int(num)


def decode_vring_addr(msg: Message) -> VringAddr:
    _size(msg, VRING_ADDR.size)
    return VringAddr(*VRING_ADDR.unpack(msg.payload))


def decode_mem_table(msg: Message) -> list[MemRegion]:
    """The regions of SET_MEM_TABLE, sizes checked (not yet against each other).

    Raises:
        RemoteProtocolError: a count outside 1..8, a payload that does not hold
            exactly that many regions, a zero-sized region, or one whose
            addresses overflow 64 bits.
    """
    if len(msg.payload) < MEM_TABLE_HDR.size:
        _size(msg, MEM_TABLE_HDR.size)
    (n,) = MEM_TABLE_HDR.unpack_from(msg.payload)
    if not 1 <= n <= MAX_MEM_REGIONS:
        raise RemoteProtocolError(
            f"{msg.name}: {n} regions, expected 1..{MAX_MEM_REGIONS}", reason="vhost-user"
        )
    _size(msg, MEM_TABLE_HDR.size + n * MEM_REGION.size)
    regions = [
        MemRegion(*MEM_REGION.unpack_from(msg.payload, MEM_TABLE_HDR.size + i * MEM_REGION.size))
        for i in range(n)
    ]
    for i, r in enumerate(regions):
        if r.memory_size == 0:
            raise RemoteProtocolError(f"{msg.name}: region {i} is zero-sized", reason="vhost-user")
        top = 1 << 64
        if (
            r.guest_phys_addr + r.memory_size > top
            or r.userspace_addr + r.memory_size > top
            or r.mmap_offset + r.memory_size > top
        ):
            raise RemoteProtocolError(
                f"{msg.name}: region {i} overflows the 64-bit address space", reason="vhost-user"
            )
    return regions


def decode_config(msg: Message, *, with_payload: bool) -> tuple[int, int, int, bytes]:
    """``(offset, size, flags, payload)`` of GET_CONFIG/SET_CONFIG.

    Raises:
        RemoteProtocolError: a size over :data:`CONFIG_PAYLOAD_MAX` or a payload
            that does not hold exactly ``size`` bytes after the header.
    """
    if len(msg.payload) < CONFIG_HDR.size:
        _size(msg, CONFIG_HDR.size)
    offset, size, flags = CONFIG_HDR.unpack_from(msg.payload)
    if size > CONFIG_PAYLOAD_MAX:
        raise RemoteProtocolError(
            f"{msg.name}: config size {size} exceeds {CONFIG_PAYLOAD_MAX}", reason="vhost-user"
        )
    # GET_CONFIG carries a buffer of ``size`` bytes the back-end fills in
    _size(msg, CONFIG_HDR.size + size)
    body = msg.payload[CONFIG_HDR.size :] if with_payload else b""
    return int(offset), int(size), int(flags), bytes(body)


def decode_inflight(msg: Message) -> tuple[int, int, int, int]:
    """``(mmap_size, mmap_offset, num_queues, queue_size)`` of GET/SET_INFLIGHT_FD."""
    _size(msg, INFLIGHT.size)
    size, offset, nq, qs = INFLIGHT.unpack(msg.payload)
    return int(size), int(offset), int(nq), int(qs)
