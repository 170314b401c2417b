"""What the halves of the card's virtio-net driver share: constants, slot pools, state.

:class:`mic_card.drivers.net.NetDevice` is one object assembled from a
receive half (:mod:`mic_card.drivers.net_rx`) and a transmit half
(:mod:`mic_card.drivers.net_tx`): both use the same slot pools, counters and
TAP descriptor, which the per-packet path reads as plain attributes (no
indirection per packet). :class:`NetState` declares those attributes once, so
each half type-checks on its own; :class:`SlotPool` is one card-RAM block cut
into equal slots.

Imports ``virtio`` only; the halves import this module, the driver class
imports the halves. Never imports the shell, the card OS or ``mic_host``.
"""

from __future__ import annotations

import asyncio
import collections
import functools
from typing import TYPE_CHECKING

from virtio.constants import NetHdrFlag
from virtio.errors import BrokenResourceError, ResourceError
from virtio.net import Offloads

if TYPE_CHECKING:
    from mic_card.bus import CardDevice
    from mic_card.endpoint import DriverEndpoint
    from transport.tap import Tap

__all__ = [
    "ERROR_REASONS",
    "LOGGED",
    "MAX_BIG_BUFFERS",
    "MRG_BIG_BUFFERS",
    "MRG_BUFFER",
    "RX_QUEUE_MAX",
    "TAP_BATCH",
    "TX_REAP_IDLE",
    "TX_SLOTS",
    "NetState",
    "SlotPool",
]

#: One mergeable receive buffer (one descriptor) when the card takes no GSO
#: (frames mode): a fixed 16 KiB holds any frame up to a 16 KiB MTU in one
#: buffer. Linux sizes them from an EWMA of packet sizes.
MRG_BUFFER = 16384
#: With GUEST_TSO (tap mode) each mergeable buffer holds a whole 64 KiB
#: segment (``MAX_PACKET``), as iperf3's traffic is: one descriptor, one
#: completion and one repost per packet, not five 16 KiB pieces (0.8x the CPU
#: per MB, docs/net.md "Performance"). At most this many (8 MiB of card RAM).
MRG_BIG_BUFFERS = 128
#: Transmit slots (card RAM the TAP is read into / frames are copied into).
TX_SLOTS = 64
#: Without MRG_RXBUF but with GUEST_TSO each buffer holds a whole 64 KiB
#: packet; post at most this many (Linux "big packets" also posts fewer).
MAX_BIG_BUFFERS = 64
#: Frames kept for an app that does not read (frames mode); more are dropped.
RX_QUEUE_MAX = 1024
#: Packets read from the TAP per readable event (then the loop runs again).
TAP_BATCH = 64
#: Transmit completions are reaped without interrupts; this long after a
#: transmit a timer reaps what is left, so an idle NIC gets its slots back.
TX_REAP_IDLE = 0.02
#: Malformed packets logged per device (then only counted).
LOGGED = 20
ALIGN = 64

NEEDS_CSUM = int(NetHdrFlag.NEEDS_CSUM)
#: drop reasons counted as errors (the rest as drops) by ``ifconfig``/``netstat``
ERROR_REASONS = frozenset({"runt", "bad_header", "offload", "oversize", "num_buffers"})


class SlotPool:
    """One card-RAM block cut into equal slots, with precomputed views.

    Raises (constructor):
        ResourceError: not even ``min_count`` slots fit in card RAM.
    """

    def __init__(self, dev: CardDevice, count: int, size: int, min_count: int) -> None:
        size = -(-size // ALIGN) * ALIGN
        while True:
            try:
                self.addr = dev.alloc(count * size, 4096)
                break
            except ResourceError:
                if count <= min_count:
                    raise
                count = max(min_count, count // 2)
        self.count = count
        self.size = size
        self.addrs = [self.addr + i * size for i in range(count)]
        block = dev.mem.view(self.addr, count * size, True)
        self.views = [block[i * size : (i + 1) * size] for i in range(count)]


class NetState:
    """The attributes both halves of the driver use (set by ``NetDevice.__init__``)."""

    dev: CardDevice
    name: str
    mtu: int
    mode: str
    ifname: str
    netns: str | None
    tap: Tap | None
    _closed: BrokenResourceError | None
    _logged: int
    _mrg: bool
    _rx_accepts: Offloads
    _tx_accepts: Offloads
    _rx_max: int
    # receive
    rxq: DriverEndpoint
    _rx: SlotPool
    _rx_segs: list[list[tuple[int, int]]]
    _rx_cbs: list[functools.partial[None]]
    _rx_parts: list[tuple[int, int]]
    _rx_need: int
    rx_queue_max: int
    _rxq: collections.deque[bytes]
    _rx_ready: asyncio.Event
    rx_packets: int
    rx_bytes: int
    rx_gso: int
    rx_largest: int
    rx_dropped: collections.Counter[str]
    # transmit
    txq: DriverEndpoint
    _tx: SlotPool
    _tx_free: list[int]
    _tx_iov: list[list[memoryview]]
    _tx_cbs: list[functools.partial[None]]
    _tx_room: asyncio.Event
    _tap_fd: int
    _reading: bool
    tx_packets: int
    tx_bytes: int
    tx_gso: int
    tx_largest: int
    tx_dropped: collections.Counter[str]
