"""Wire format of accelerator queues: a compatibility alias of :mod:`virtio.accel`.

The layouts and request rules live in ``virtio.accel`` because the host side
of an offload channel (``mic_host.client.accel``) speaks them too and ``mic_host``
never imports ``mic_card``. This module re-exports exactly
``virtio.accel.__all__`` (nothing of its own), so the card side's many
``from mic_card.accel.wire import ...`` keep working; new code may import
``virtio.accel`` directly.
"""

from virtio import accel as _accel
from virtio.accel import *  # noqa: F403

__all__ = list(_accel.__all__)
