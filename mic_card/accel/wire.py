"""Wire format of accelerator queues (re-exported from :mod:`virtio.accel`).

The layouts live in ``virtio.accel`` because the host side of an offload
channel (``mic_host.accel``) speaks them too and ``mic_host`` never imports
``mic_card``; this module keeps the card side's imports short.
"""

from virtio.accel import (
    ALG_NAMES,
    API,
    IV_MAX,
    KEY_MAX,
    QUEUE_RING_SIZE,
    REQ_SIZE,
    REQ_STRUCT,
    RESP_OFF,
    RESP_SIZE,
    RESP_STRUCT,
    RSA_ALGS,
    RSA_MAX_BYTES,
    SLOT_SIZE,
    STATUS_MAGIC,
    WIRE_VERSION,
    Alg,
    Op,
    QueueGeometry,
    ReqFlag,
    ReqHeader,
    RespHeader,
    Status,
    StatusWord,
    alg_by_name,
    output_bound,
)

__all__ = [
    "ALG_NAMES",
    "API",
    "IV_MAX",
    "KEY_MAX",
    "QUEUE_RING_SIZE",
    "REQ_SIZE",
    "REQ_STRUCT",
    "RESP_OFF",
    "RESP_SIZE",
    "RESP_STRUCT",
    "RSA_ALGS",
    "RSA_MAX_BYTES",
    "SLOT_SIZE",
    "STATUS_MAGIC",
    "WIRE_VERSION",
    "Alg",
    "Op",
    "QueueGeometry",
    "ReqFlag",
    "ReqHeader",
    "RespHeader",
    "Status",
    "StatusWord",
    "alg_by_name",
    "output_bound",
]
