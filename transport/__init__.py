"""The emulated PCIe link between a host process and a card process.

The only package that touches mmap, memfd, eventfd, sockets and fd passing.
It imports from the project only ``virtio.errors`` and ``virtio.memory``.

Start at :class:`PcieHost` / :class:`PcieCard` (``transport.pcie``); see
docs/transport.md for the API reference.
"""

from transport.dma import (
    DMA_ALIGN,
    DmaChannel,
    DmaCompletion,
    DmaEngine,
    DmaPath,
    DmaPolicy,
    DmaRequest,
    DmaStats,
    UnalignedPolicy,
)
from transport.errors import (
    DmaAlignmentError,
    DmaError,
    DmaFault,
    DmaOverlapError,
    HandshakeError,
    LinkLost,
    RegionError,
    WindowFault,
)
from transport.link import DEFAULT_MAX_MESSAGE, FramedSocket, MessageLink
from transport.mmio import (
    NUM_SPADS,
    SMPT_ENTRIES,
    SPAD_DPHI,
    SPAD_DPLO,
    Mmio,
    MmioLayout,
    Scratchpads,
    Side,
)
from transport.notify import Doorbell, NotifyMode, NotifyPolicy, Vector, full_fence
from transport.pcie import PROTOCOL, PROTOCOL_VERSION, CardIdentity, PcieCard, PcieConfig, PcieHost
from transport.region import PAGE_SIZE, Region
from transport.space import (
    SMPT_BASE,
    CardAddressSpace,
    FaultLog,
    HostAddressSpace,
    Perm,
    SmptTable,
    Window,
)

__all__ = [
    # composition
    "PcieHost",
    "PcieCard",
    "PcieConfig",
    "CardIdentity",
    "PROTOCOL",
    "PROTOCOL_VERSION",
    # memory
    "PAGE_SIZE",
    "Region",
    "SMPT_BASE",
    "Perm",
    "Window",
    "SmptTable",
    "HostAddressSpace",
    "CardAddressSpace",
    "FaultLog",
    # registers and notification
    "Mmio",
    "MmioLayout",
    "Scratchpads",
    "Side",
    "NUM_SPADS",
    "SPAD_DPLO",
    "SPAD_DPHI",
    "SMPT_ENTRIES",
    "Doorbell",
    "Vector",
    "NotifyMode",
    "NotifyPolicy",
    "full_fence",
    # DMA
    "DMA_ALIGN",
    "DmaEngine",
    "DmaChannel",
    "DmaRequest",
    "DmaCompletion",
    "DmaPath",
    "DmaPolicy",
    "DmaStats",
    "UnalignedPolicy",
    # link
    "MessageLink",
    "FramedSocket",
    "DEFAULT_MAX_MESSAGE",
    # errors
    "WindowFault",
    "RegionError",
    "HandshakeError",
    "LinkLost",
    "DmaError",
    "DmaFault",
    "DmaAlignmentError",
    "DmaOverlapError",
]
