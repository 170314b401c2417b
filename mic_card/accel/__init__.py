"""Accelerators on the card: uacce-style devices and queues, engines in worker processes.

Owns the framework (:class:`AccelFramework`: devices, attributes, queues with
states INIT/STARTED/ZOMBIE, PASID-like isolation, fault accounting and
isolation, management interface), the engines (compression and security,
chaining) run by worker processes, the UADK-shaped user API (sessions,
sync/async requests, polling and blocking receive, batching), the provider
layer and the shell's ``accel list`` / ``accel bench``. Requests and answers
travel through the split ring of ``virtio.split``; regions and doorbells come
from ``transport``. Must not import ``mic_host``. See docs/accel.md.
"""

from mic_card.accel.errors import (
    AccelError,
    DeviceIsolated,
    NoProvider,
    QueueBusy,
    QueueDisabled,
    QueueStateError,
    RequestError,
)
from mic_card.accel.framework import (
    AccelDevice,
    AccelFramework,
    DevFlag,
    DeviceSpec,
    FaultEvent,
    Management,
    default_devices,
)
from mic_card.accel.providers import ENTRY_POINT_GROUP, Provider, ProviderRegistry
from mic_card.accel.queue import AccelQueue, Completion, QState, Request, SharedBuffer, Ticket
from mic_card.accel.session import Session, SessionLike, SessionSpec
from mic_card.accel.tools import accel_bench, accel_list_text, bench_args, format_bench
from mic_card.accel.wire import API, Alg, Op, ReqFlag, Status

__all__ = [
    # framework
    "AccelFramework",
    "AccelDevice",
    "DeviceSpec",
    "DevFlag",
    "FaultEvent",
    "Management",
    "default_devices",
    # queues
    "AccelQueue",
    "QState",
    "Request",
    "Completion",
    "SharedBuffer",
    "Ticket",
    # user API
    "Session",
    "SessionLike",
    "SessionSpec",
    "Provider",
    "ProviderRegistry",
    "ENTRY_POINT_GROUP",
    # wire
    "API",
    "Alg",
    "Op",
    "ReqFlag",
    "Status",
    # shell
    "accel_list_text",
    "accel_bench",
    "bench_args",
    "format_bench",
    # errors
    "AccelError",
    "DeviceIsolated",
    "NoProvider",
    "QueueBusy",
    "QueueDisabled",
    "QueueStateError",
    "RequestError",
]
