"""vhost-user back-end: MIC-VOP's backends served to real virtio front-ends (QEMU).

    server  VhostUserServer: one backend on a Unix socket, one front-end at a time
    cli     ``mic-vhost-user``: the standalone command (``blk``)

The protocol, its socket and memory mapping are :mod:`transport.vhost_user`.
"""

from mic_host.vhost_user.server import VhostUserServer

__all__ = ["VhostUserServer"]
