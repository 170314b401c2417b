"""The memory barrier of the ring core (Linux ``virtio_mb``).

Owns :func:`full_fence`, the one full barrier both sides of a split ring put
between a store the peer polls and the next load of the peer's word. Imports
only ``threading``; must not import the other ``virtio.split`` modules,
asyncio, the OS or ``transport``.
"""

from __future__ import annotations

import threading

__all__ = ["full_fence"]

_fence_lock = threading.Lock()


def full_fence() -> None:
    """A full memory barrier between a store to the ring and a later load.

    Every notification decision is a Dekker handshake: one side stores its
    index (or event word) and then loads the peer's, the peer does the
    mirror image. x86 may let a load pass an earlier store (the store
    buffer), and then both sides read the other's old value and both decide
    "no wake-up needed": a lost wake-up. Linux puts ``virtio_mb()`` at each
    such point; CPython has no fence primitive, so this is an uncontended
    lock round trip, whose locked read-modify-write is a full barrier on x86
    (the same device ``transport.notify`` uses). Not I/O: the core stays sans-IO.
    """
    _fence_lock.acquire()
    _fence_lock.release()
