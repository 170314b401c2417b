"""virtio-rng for MIC-VOP: a worked example of a device type added from outside.

- :mod:`mic_vop_rng.backend`: the host backend (runs in ``mic-host``);
- :mod:`mic_vop_rng.driver`: the card driver (runs in the card OS);
- :mod:`mic_vop_rng.app`: a card app reading entropy through the driver.

The backend and the driver never import each other: they run in different
processes and meet only on the virtqueue. Nothing is imported here, so that
each side loads only its own half.
"""

#: The virtio device ID of an entropy device (virtio 1.2 §5.4.1).
VIRTIO_ID_RNG = 4
