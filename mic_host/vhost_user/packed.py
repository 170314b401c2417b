"""The packed ring (VIRTIO_F_RING_PACKED) on the vhost-user back-end: addresses and bases.

Owns what differs for a packed virtqueue in QEMU's ``docs/interop/vhost-user.rst``:

- SET_VRING_ADDR's three addresses are the descriptor ring (16 B per entry),
  the driver event suppression area and the device event suppression area
  (4 B each), in the fields that name the split ring's descriptor table,
  avail ring and used ring (Linux vhost reads them the same way);
- SET_VRING_BASE and GET_VRING_BASE carry both positions, which a packed
  ring does not keep in guest memory: bits 0-14 the next available slot and
  bit 15 its wrap counter, bits 16-30 the next used slot and bit 31 its wrap
  counter (QEMU ``virtio_queue_packed_get_last_avail_idx`` /
  ``virtio_queue_packed_set_last_avail_idx``, Linux ``VHOST_SET_VRING_BASE``).

The rings themselves are :class:`virtio.packed.DeviceQueue`, restored at
those positions. Imports ``transport.vhost_user`` (the guest memory and the
address message) and ``virtio``; no asyncio.
"""

from __future__ import annotations

from transport.vhost_user import GuestMemory, VringAddr
from virtio import packed
from virtio.constants import Feature
from virtio.errors import LocalProtocolError, RemoteProtocolError

__all__ = ["decode_base", "encode_base", "packed_layout", "start_packed"]

_WRAP = 0x8000
_POS = 0x7FFF
#: a packed ring's event suppression area: one 32-bit word
_EVENT_BYTES = 4


def _error(msg: str) -> RemoteProtocolError:
    return RemoteProtocolError(msg, reason="vhost-user")


def decode_base(base: int, num: int, index: int) -> tuple[int, int, int, int]:
    """``(next_avail, avail_wrap, next_used, used_wrap)`` from a SET_VRING_BASE value.

    Raises:
        RemoteProtocolError: a position outside the ring of ``num`` entries.
    """
    avail, used = base & 0xFFFF, base >> 16 & 0xFFFF
    positions = (avail & _POS, avail >> 15, used & _POS, used >> 15)
    if positions[0] >= num or positions[2] >= num:
        raise _error(
            f"SET_VRING_BASE: packed queue {index} base {base:#x} names slot "
            f"{positions[0]} (avail) / {positions[2]} (used) of a {num}-entry ring"
        )
    return positions


def encode_base(q: packed.DeviceQueue) -> int:
    """The GET_VRING_BASE value of a stopped packed ring (both positions, both laps)."""
    s = q.save()
    avail = s.next_avail | (_WRAP if s.avail_wrap else 0)
    used = s.next_used | (_WRAP if s.used_wrap else 0)
    return avail | used << 16


def packed_layout(mem: GuestMemory, num: int, addr: VringAddr) -> packed.PackedLayout:
    """The guest-physical layout of a packed ring from SET_VRING_ADDR.

    Raises:
        RemoteProtocolError: a part outside the mapped regions.
    """
    q = addr.index
    return packed.PackedLayout(
        num,
        mem.uva_to_gpa(addr.desc, 16 * num, f"packed queue {q} descriptor ring"),
        mem.uva_to_gpa(addr.avail, _EVENT_BYTES, f"packed queue {q} driver event area"),
        mem.uva_to_gpa(addr.used, _EVENT_BYTES, f"packed queue {q} device event area"),
    )


def start_packed(
    mem: GuestMemory, num: int, addr: VringAddr, base: int, features: int
) -> packed.DeviceQueue:
    """A live packed device queue at the front-end's positions.

    Both positions must be equal (nothing in flight): this back-end keeps no
    in-flight record a front-end could hand back, so a ring resumed with
    buffers the device still holds would lose them.

    Raises:
        RemoteProtocolError: a bad base, a part outside the regions, or a bad
            layout (a :class:`~virtio.packed.RingError`).
    """
    layout = packed_layout(mem, num, addr)
    next_avail, avail_wrap, next_used, used_wrap = decode_base(base, num, addr.index)
    if (next_avail, avail_wrap) != (next_used, used_wrap):
        raise _error(
            f"SET_VRING_BASE: packed queue {addr.index} resumes at avail slot {next_avail} "
            f"(wrap {avail_wrap}) but used slot {next_used} (wrap {used_wrap}): requests "
            f"in flight are not resubmitted by this back-end"
        )
    state = packed.PackedQueueState(
        layout=layout,
        next_avail=next_avail,
        avail_wrap=avail_wrap,
        next_used=next_used,
        used_wrap=used_wrap,
        event_idx=bool(features & Feature.EVENT_IDX),
        indirect=bool(features & Feature.INDIRECT_DESC),
        ready=True,
        inflight=(),
    )
    try:
        return packed.DeviceQueue.restore(mem, state)
    except LocalProtocolError as e:  # pragma: no cover - the state is consistent by now
        raise _error(f"packed queue {addr.index}: {e}") from e
