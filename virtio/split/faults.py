"""Why a ring is refused: the fault codes and the two errors of the ring core.

Owns :class:`RingFault` (one code per rule a peer can break), :class:`RingError`
(the peer broke a rule; a :class:`~virtio.errors.RemoteProtocolError` that
latches the queue broken, as QEMU's ``virtio_error``) and :class:`QueueBroken`
(use of a queue after that). Shared by the split ring and the packed ring
(:mod:`virtio.packed` raises the same errors; its own codes are at the end of
the enum). The bottom of ``virtio.split``: imports only
:mod:`virtio.errors`; must not import the other ``virtio.split`` modules,
asyncio, the OS or ``transport``.
"""

from __future__ import annotations

from enum import StrEnum

from virtio.errors import BrokenResourceError, RemoteProtocolError

__all__ = ["QueueBroken", "RingError", "RingFault"]


class RingFault(StrEnum):
    """Why a peer's ring was refused; ``RingError.reason`` carries one of these."""

    BAD_SIZE = "bad-queue-size"
    MISALIGNED = "misaligned-ring"
    RING_OUT_OF_MEMORY = "ring-outside-memory"
    AVAIL_IDX_JUMP = "avail-index-jump"
    HEAD_OUT_OF_RANGE = "head-out-of-range"
    HEAD_IN_USE = "head-already-in-use"
    NEXT_OUT_OF_RANGE = "next-out-of-range"
    CHAIN_TOO_LONG = "chain-too-long"
    NESTED_INDIRECT = "nested-indirect"
    INDIRECT_WITH_NEXT = "indirect-with-next"
    INDIRECT_BAD_LEN = "indirect-bad-length"
    INDIRECT_TOO_LONG = "indirect-too-long"
    INDIRECT_NOT_NEGOTIATED = "indirect-not-negotiated"
    READABLE_AFTER_WRITABLE = "readable-after-writable"
    ZERO_LENGTH = "zero-length-buffer"
    CHAIN_TOO_BIG = "chain-too-big"
    ADDRESS_OVERFLOW = "address-overflow"
    BUFFER_OUT_OF_MEMORY = "buffer-outside-memory"
    NO_WRITABLE = "no-writable-buffer"
    NO_READABLE = "no-readable-buffer"
    USED_IDX_JUMP = "used-index-jump"
    USED_ID_OUT_OF_RANGE = "used-id-out-of-range"
    USED_ID_NOT_HEAD = "used-id-not-outstanding"
    # packed ring (virtio 1.2 §2.8)
    BUFFER_ID_OUT_OF_RANGE = "buffer-id-out-of-range"
    BUFFER_ID_IN_USE = "buffer-id-already-in-use"
    DESC_NOT_AVAILABLE = "chain-descriptor-not-available"
    RING_OVERRUN = "ring-overrun"
    INDIRECT_IN_CHAIN = "indirect-in-chain"
    BAD_EVENT_FLAGS = "bad-event-flags"
    BAD_EVENT_OFFSET = "bad-event-offset"


class RingError(RemoteProtocolError):
    """The peer broke a ring rule; the queue is now latched broken."""

    def __init__(self, fault: RingFault, message: str) -> None:
        super().__init__(f"{fault.value}: {message}", reason=fault.value)
        self.fault = fault


class QueueBroken(BrokenResourceError):
    """The queue was latched broken by an earlier :class:`RingError`; reset it."""
