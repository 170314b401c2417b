"""The :class:`mic_host.backends.BackendContext` a vhost-user back-end runs its backend with."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from mic_host.endpoint import QueueEndpoint
from virtio.errors import RemoteProtocolError

__all__ = ["BackendContext"]


class BackendContext:
    """The :class:`mic_host.backends.BackendContext` a backend runs with."""

    def __init__(self, name: str, queues: Sequence[QueueEndpoint]) -> None:
        self._name = name
        self._queues = queues
        self.acked = 0
        self._log = logging.getLogger(f"mic_host.vhost_user.{name}")

    @property
    def name(self) -> str:
        return self._name

    @property
    def queues(self) -> Sequence[QueueEndpoint]:
        return self._queues

    @property
    def features(self) -> int:
        return self.acked

    @property
    def log(self) -> logging.Logger:
        return self._log

    async def update_config(self, config: bytes) -> None:
        # A config-change notification needs the BACKEND_REQ channel, not offered.
        raise RemoteProtocolError("config change is not supported over vhost-user")
