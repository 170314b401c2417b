"""Every binary layout of MIC-VOP, declared once with ``construct``.

This package owns the wire formats: the split and packed virtqueue structures
(virtio 1.2 §2.7, §2.8), the request headers and config spaces of virtio-blk,
virtio-net and virtio-console (§5.1-5.3), and the MIC device page of Linux
``include/uapi/linux/mic_common.h`` (v4-v5.9): boot parameters, device entries
(``desc | vqconfig[num_vq] | host features | guest acks | config | pad8 | ctrl``)
and the per-vring info block. Everything is little-endian.

One module per family, none importing another::

    vring     split and packed ring structures, vring arithmetic, field_offset
    devices   virtio-blk, virtio-net and virtio-console headers and config spaces
    micpage   the MIC device page: structures, Linux offset helpers, its parse boundary

This ``__init__`` only re-exports: ``from virtio.layouts import ...`` is the
public path. It must not import asyncio, the OS, or ``transport``: it turns
bytes into values and values into bytes, nothing else.

Rules kept here (STYLE.md §3, §4):

- ``Const`` for magics, ``Padding`` for reserved bytes, ``Check`` for the
  invariants of the device page; every size is tested against the C/spec size.
- Bytes written by the peer are parsed by the ``parse_*``/``iter_*`` helpers and
  :meth:`DeviceEntry.parse`, which either succeed or raise
  :class:`~virtio.errors.RemoteProtocolError` (``reason="device-page"``), the
  ``construct`` error chained with ``from``. Building from bad local values
  raises :class:`~virtio.errors.LocalProtocolError`.
- The per-descriptor hot path does not use ``construct`` (about 10 us a parse):
  the ``*_STRUCT`` objects (and the twins in :mod:`virtio.blk`,
  :mod:`virtio.console`, :mod:`virtio.net`) are precompiled
  :class:`struct.Struct` twins whose formats are tested against the
  ``construct`` declarations.
"""

from virtio.layouts import devices, micpage, vring
from virtio.layouts.devices import *  # noqa: F403
from virtio.layouts.micpage import *  # noqa: F403
from virtio.layouts.vring import *  # noqa: F403

# Each module's __all__ is its public list; the package's is their union.
__all__ = [*vring.__all__, *devices.__all__, *micpage.__all__]
