"""The bounds a configuration must respect, and the arithmetic that decides whether a card fits.

Owns the limits the config checks at load (and at attach) so that a value
that cannot boot is refused with the key that holds it, not found out at
boot: the block options' ranges, the RAM sizes and the card-physical map
(card RAM must end below the host-RAM window at ``transport.space.SMPT_BASE``),
the largest image, and what each device takes on the card's 4 KiB device page
and in its host RAM window (:class:`Geometry`). The page and ring arithmetic
is VOP's own, imported from :mod:`virtio` (``entry_size``, ``vring_alloc_size``,
the VOP limits), never restated.

Imports ``virtio`` (layouts, device page, console) and ``transport.space`` /
``transport.mmio`` for the address map. That costs ~70 ms of imports
(``construct``), which ``micctl`` does not need to start: the rest of
:mod:`mic_host.config` imports this module only inside the functions that
check a device or a card. Imports no other ``mic_host`` module but :mod:`mic_host.config.sizes`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mic_host.config.sizes import format_size
from transport.mmio import SMPT_ENTRIES
from transport.space import SMPT_BASE
from virtio.console import num_queues as console_num_queues
from virtio.constants import MIC_DP_SIZE, MIC_MAX_DESC_BLK_SIZE, SECTOR_SIZE
from virtio.devpage import MAX_QUEUE_SIZE, vring_alloc_size
from virtio.layouts import (
    FIRST_ENTRY_OFFSET,
    MAX_FEATURE_LEN,
    MAX_NUM_VQ,
    BlkConfig,
    ConsoleConfig,
    NetConfig,
    entry_size,
    mic_aligned_desc_size,
)

__all__ = [
    "BLOCK_DATA_PATHS",
    "BLK_SIZE_MAX",
    "BLK_SIZE_MIN",
    "BLOCK_MAX_QUEUES",
    "BLOCK_QUEUE_SIZE",
    "BLOCK_QUEUE_SIZE_MIN",
    "CARD_RAM_MAX",
    "CARD_RAM_MIN",
    "CONSOLE_QUEUE_SIZE",
    "card_problem",
    "DEVICE_GEOMETRY",
    "DEVICE_PAGE_ROOM",
    "HOST_RAM_MAX",
    "IMAGE_SIZE_MAX",
    "MAX_QUEUE_SIZE",
    "MAX_NUM_VQ",
    "NET_QUEUE_SIZE",
    "PAGE",
    "SMPT_BASE",
    "Geometry",
    "geometry",
    "is_power_of_two",
    "min_host_ram",
]

#: Host page size: RAM sizes are multiples of it, rings are page-aligned blocks.
PAGE = 4096
#: Room for entries on the device page (after ``struct mic_bootparam``).
DEVICE_PAGE_ROOM = MIC_DP_SIZE - FIRST_ENTRY_OFFSET

# -- block ---------------------------------------------------------------------------
#: Default entries per block queue (the backend's default too).
BLOCK_QUEUE_SIZE = 128
#: Smallest block queue: a request is header + data + status, three descriptors
#: without indirect ones, and ``seg_max`` is offered as ``queue_size - 2``.
BLOCK_QUEUE_SIZE_MIN = 4
#: Most request queues of one block device (Linux VOP allowed 4 vqs per device;
#: VOP here allows :data:`MAX_NUM_VQ`, the block backend and card driver 4).
BLOCK_MAX_QUEUES = 4
#: A block device's ``data_path`` choices (mic_host.backends.datapath).
BLOCK_DATA_PATHS = ("cpu", "dma", "auto")
#: Logical block sizes the backend and the card's driver accept (powers of two).
BLK_SIZE_MIN = SECTOR_SIZE
BLK_SIZE_MAX = 64 << 10
#: Largest image: an ``off_t``. The file system may allow less (ext4: 16 TiB);
#: creating the image then fails at boot or attach with the file system's error.
IMAGE_SIZE_MAX = (1 << 63) - 1

# -- RAM -----------------------------------------------------------------------------
#: Card RAM sits at card-physical 0 and must end at or below the host RAM window
#: at SMPT_BASE (0x80_0000_0000 = 512 GiB): a card RAM that reaches it hides the
#: device page from the card, whose boot then reads card RAM as the boot parameters.
CARD_RAM_MAX = SMPT_BASE
#: A floor for the card OS's heap (its drivers' buffers, moved used rings).
CARD_RAM_MIN = 1 << 20
#: What the X100's SMPT can map: 32 entries of 16 GiB (mic_x100.h).
HOST_RAM_MAX = SMPT_ENTRIES * (16 << 30)

# -- built-in device shapes the config cannot ask the backends for (config sits
#    below them); tests/host/test_config.py checks them against the real backends.
CONSOLE_QUEUE_SIZE = 64
NET_QUEUE_SIZE = 256


def is_power_of_two(n: int) -> bool:
    return n > 0 and not n & (n - 1)


@dataclass(frozen=True, slots=True)
class Geometry:
    """What one device takes: its queues' sizes and its config space's length.

    ``exact`` is False for a type whose shape is unknown (a plug-in that
    registered none): it then counts as the smallest device, a lower bound.
    """

    queue_sizes: tuple[int, ...]
    config_len: int
    exact: bool = True

    @property
    def entry_bytes(self) -> int:
        """Bytes of its device-page entry (VOP offers ``MAX_FEATURE_LEN`` feature bytes)."""
        return int(entry_size(len(self.queue_sizes), MAX_FEATURE_LEN, self.config_len))

    @property
    def desc_block_bytes(self) -> int:
        """Its descriptor block, which Linux bounds by ``MIC_MAX_DESC_BLK_SIZE``."""
        return int(mic_aligned_desc_size(len(self.queue_sizes), MAX_FEATURE_LEN, self.config_len))

    @property
    def ring_bytes(self) -> int:
        """Host RAM its vrings take."""
        return sum(vring_alloc_size(n) for n in self.queue_sizes)

    def problem(self) -> str | None:
        """Why VOP would refuse this device on its own, or None."""
        if not 1 <= len(self.queue_sizes) <= MAX_NUM_VQ:
            return f"{len(self.queue_sizes)} queues, VOP allows 1..{MAX_NUM_VQ}"
        if self.desc_block_bytes > MIC_MAX_DESC_BLK_SIZE:
            return (
                f"its device-page descriptor of {self.desc_block_bytes} B exceeds "
                f"{MIC_MAX_DESC_BLK_SIZE} B"
            )
        return None


def _block(options: Mapping[str, Any]) -> Geometry:
    nq = int(options.get("num_queues", 1))
    return Geometry((int(options.get("queue_size", BLOCK_QUEUE_SIZE)),) * nq, BlkConfig.sizeof())


def _console(options: Mapping[str, Any]) -> Geometry:
    # The backend's default: port 0 and the agent's port, MULTIPORT on.
    queues = console_num_queues(2, True)
    return Geometry((CONSOLE_QUEUE_SIZE,) * queues, ConsoleConfig.sizeof())


def _net(options: Mapping[str, Any]) -> Geometry:
    return Geometry((NET_QUEUE_SIZE, NET_QUEUE_SIZE), NetConfig.sizeof())


#: The shape of a device of each type, from its checked options. A plug-in type
#: may add its own (``DEVICE_GEOMETRY["mytype"] = fn``); types without an entry
#: count as the smallest device (one 1-entry queue, no config space).
DEVICE_GEOMETRY: dict[str, Callable[[Mapping[str, Any]], Geometry]] = {
    "block": _block,
    "console": _console,
    "net": _net,
}


def geometry(dtype: str, options: Mapping[str, Any]) -> Geometry:
    """The :class:`Geometry` of a device of type ``dtype`` with (checked) ``options``."""
    fn = DEVICE_GEOMETRY.get(dtype)
    if fn is None:
        return Geometry((1,), 0, exact=False)
    return fn(options)


def min_host_ram(devices: Sequence[Geometry]) -> int:
    """The smallest host RAM window that holds the device page and every ring of
    ``devices`` (VOP also wants room for one ring when there is no device)."""
    return PAGE + max(PAGE, sum(g.ring_bytes for g in devices))


def _fmt(n: int) -> str:
    return format_size(n)


def card_problem(
    card_ram: int, host_ram: int, devices: Sequence[tuple[str, Mapping[str, Any]]]
) -> tuple[str, str] | None:
    """The first bound a card breaks: ``(key relative to the card, problem)``, or None.

    ``devices`` are ``(type, checked options)`` in device-page order. Checks
    the RAM sizes against the card-physical map and the SMPT, each device
    against VOP's own limits, the devices' entries against the device page
    (laid out as VOP lays them on a fresh page) and their rings against
    ``host_ram``.
    """
    if card_ram < CARD_RAM_MIN:
        return "card_ram", f"{_fmt(card_ram)} is below the card OS's {_fmt(CARD_RAM_MIN)} floor"
    if card_ram > CARD_RAM_MAX:
        return "card_ram", (
            f"{_fmt(card_ram)} would reach the host RAM window at card-physical "
            f"{SMPT_BASE:#x}: card RAM is at most {_fmt(CARD_RAM_MAX)}"
        )
    if host_ram > HOST_RAM_MAX:
        return "host_ram", (
            f"{_fmt(host_ram)} is more than the SMPT maps "
            f"({SMPT_ENTRIES} entries of 16G): at most {_fmt(HOST_RAM_MAX)}"
        )
    shapes = [geometry(t, o) for t, o in devices]
    used = 0
    for j, ((dtype, _), g) in enumerate(zip(devices, shapes, strict=True)):
        problem = g.problem()
        if problem is not None:
            return f"devices[{j}]", f"VOP cannot offer this {dtype} device: {problem}"
        used += g.entry_bytes
        if used > DEVICE_PAGE_ROOM:
            return f"devices[{j}]", (
                f"the device page is full: devices[0..{j - 1}] take "
                f"{used - g.entry_bytes} of its {DEVICE_PAGE_ROOM} B, and this {dtype} "
                f"device needs {g.entry_bytes} B more"
            )
    need = min_host_ram(shapes)
    if host_ram < need:
        return "host_ram", (
            f"{_fmt(host_ram)} cannot hold the device page and the rings of "
            f"{len(shapes)} device(s): at least {_fmt(need)}"
        )
    return None
