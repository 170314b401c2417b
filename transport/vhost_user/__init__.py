"""vhost-user (QEMU docs/interop/vhost-user.rst): the protocol, its socket and its memory.

One concept per module, imports pointing down::

    protocol  message layouts (construct + struct twins), numbers, the sans-IO codec
    memory    GuestMemory: the front-end's memory table mapped as a ring-core Memory
    channel   VhostUserChannel: whole messages and their fds over a Unix socket

The back-end that serves MIC-VOP's backends over it is :mod:`mic_host.vhost_user`.
"""

from transport.vhost_user.channel import VhostUserChannel, close_fds
from transport.vhost_user.memory import GuestMemory
from transport.vhost_user.protocol import (
    MemRegion,
    Message,
    ProtocolFeature,
    Request,
    VringAddr,
)

__all__ = [
    "GuestMemory",
    "MemRegion",
    "Message",
    "ProtocolFeature",
    "Request",
    "VhostUserChannel",
    "VringAddr",
    "close_fds",
]
