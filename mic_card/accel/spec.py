"""What an accelerator device is made of: :class:`DeviceSpec`, :class:`DevFlag`, the defaults.

Values only (checked at construction, ``ConfigError`` when wrong). Imports
the engine's algorithm tables and :mod:`mic_card.accel.wire`; never the
framework, a queue or the card OS.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntFlag
from typing import Any

from mic_card.accel.engine import COMP_ALGS
from mic_card.accel.wire import ALG_NAMES, Alg, alg_by_name
from virtio.errors import ConfigError

__all__ = ["DevFlag", "DeviceSpec", "default_devices"]


class DevFlag(IntFlag):
    """uacce device flags."""

    SVA = 1  #: UACCE_DEV_SVA: requests may point into memory the app shared with the queue


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """A device to register: name, algorithms and resources.

    ``isolate_strategy`` is the number of faults per hour at which the device
    isolates itself (0 = never), ``workers`` the engine processes kept ready
    (each started queue has one), ``heap_size`` each queue's shared memory
    (half bounce pool, half shared buffers on SVA devices).
    """

    name: str
    algorithms: tuple[str, ...]
    max_queues: int = 16
    workers: int = 2
    sva: bool = True
    node: int = 0
    isolate_strategy: int = 0
    heap_size: int = 8 << 20
    chaining: bool = True
    allow_inject: bool = False

    def __post_init__(self) -> None:
        for a in self.algorithms:
            try:
                alg_by_name(a)
            except KeyError as e:
                raise ConfigError(f"device {self.name!r}: {e.args[0]}") from None
        if not 1 <= self.max_queues <= 1024 or not 1 <= self.workers <= 64:
            raise ConfigError(f"device {self.name!r}: max_queues/workers out of range")
        if self.heap_size <= 0 or self.heap_size % 8192:
            raise ConfigError(f"device {self.name!r}: heap_size must be a multiple of 8 KiB")
        if not 0 <= self.isolate_strategy <= 65535:
            raise ConfigError(f"device {self.name!r}: isolate_strategy outside 0..65535")


def default_devices(**overrides: Any) -> tuple[DeviceSpec, ...]:
    """The card's two accelerators: ``mic-zip`` (compression) and ``mic-sec`` (security)."""
    comp = tuple(ALG_NAMES[a] for a in sorted(COMP_ALGS))
    sec = tuple(ALG_NAMES[a] for a in sorted(Alg) if a >= Alg.AES_CBC)
    return (
        DeviceSpec("mic-zip", comp, **overrides),
        DeviceSpec("mic-sec", sec, **overrides),
    )
