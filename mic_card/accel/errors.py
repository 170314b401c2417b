"""Errors of the accelerator framework, under the project's roots (``virtio.errors``).

Whose fault (STYLE.md §3):

- :class:`QueueBusy` (a :class:`~virtio.errors.ResourceError`): every queue
  of the device is taken (uacce ``available_instances == 0``; UADK's
  "queues are busy", ``-EBUSY``).
- :class:`DeviceIsolated`: the device exceeded ``isolate_strategy`` faults per
  hour and refuses new queues until un-isolated.
- :class:`QueueDisabled` (a :class:`~virtio.errors.BrokenResourceError`): the
  queue's engine crashed or hung, or the ring broke; ``reset()`` it.
- :class:`RequestError` (a :class:`virtio.accel.AccelRequestError`, as the
  host's ``mic_host.client.accel`` raises): one request came back with a non-OK
  :class:`~virtio.accel.Status` (raised by the synchronous ``do``;
  asynchronous users read ``Completion.status``).
- :class:`QueueStateError` (a :class:`~virtio.errors.LocalProtocolError`): an
  operation not allowed in the queue's state (e.g. submit before ``start``).
- :class:`NoProvider` (a :class:`~virtio.errors.LocalProtocolError` and a
  ``LookupError``): no provider or device offers the algorithm.
"""

from __future__ import annotations

from virtio.accel import AccelRequestError
from virtio.errors import BrokenResourceError, LocalProtocolError, MicError, ResourceError

__all__ = [
    "AccelError",
    "DeviceIsolated",
    "NoProvider",
    "QueueBusy",
    "QueueDisabled",
    "QueueStateError",
    "RequestError",
]


class AccelError(MicError):
    """Root of the accelerator framework's own errors."""


class QueueBusy(ResourceError, AccelError):
    """No free queue on the device (``available_instances`` is 0)."""


class DeviceIsolated(ResourceError, AccelError):
    """The device isolated itself after too many faults (uacce ``isolate`` = 1)."""


class QueueDisabled(BrokenResourceError, AccelError):
    """The queue is disabled (engine fault, ring error, put); reset it to use it again."""


class QueueStateError(LocalProtocolError, AccelError):
    """The operation is not allowed in the queue's current state."""


class NoProvider(LocalProtocolError, AccelError, LookupError):
    """No provider offers the algorithm (the caller asked for something not offered)."""


class RequestError(AccelRequestError, AccelError):
    """A request completed with a non-OK status.

    ``status``, ``consumed`` and ``produced`` are the engine's answer; for
    ``OUT_OF_SPACE_RECOVERABLE`` ``consumed`` says where to resume.
    """
