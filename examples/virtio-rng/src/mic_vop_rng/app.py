"""A card app that reads entropy through the virtio-rng driver::

    micctl run mic0 mic_vop_rng.app:main            # 32 bytes from the first rng
    micctl run mic0 mic_vop_rng.app:main 4096 virtio4-1

Returns ``{"device", "bytes", "hex"}``. A sanity check, not a randomness test:
the bytes must not all be equal, and from 2500 bytes on the FIPS 140-2
monobit test must pass on the first 20,000 bits (9,725 < ones < 10,275).
"""

from __future__ import annotations

from typing import Any

from mic_card.services import CardServices
from mic_vop_rng import VIRTIO_ID_RNG

MONOBIT_BYTES = 2500


async def main(card: CardServices, nbytes: int | str = 32, device: str = "") -> dict[str, Any]:
    """Read ``nbytes`` from ``device`` (default: the first virtio-rng on the card).

    Raises:
        LookupError: no such virtio-rng device bound; ValueError: ``nbytes`` is
        not a count, or the bytes fail the sanity check.
    """
    n = int(nbytes)
    name = _rng_device(card, device)
    data: bytes = await card.device(name).read(n)  # the driver: mic_vop_rng.driver.RngDriver
    _sanity_check(name, data)
    return {"device": name, "bytes": len(data), "hex": data.hex()}


def _rng_device(card: CardServices, wanted: str) -> str:
    """``wanted`` if it is a bound virtio-rng device, else the first one.

    Goes by the device type in the card's device list, not by the driver's
    class: any driver bound to a virtio-rng device will do.
    """
    rngs = [d["name"] for d in card.devices() if d["type"] == VIRTIO_ID_RNG and d["driver"]]
    if wanted and wanted not in rngs:
        raise LookupError(f"{card.name}: {wanted} is not a bound virtio-rng device (those: {rngs})")
    if not rngs:
        raise LookupError(f"{card.name}: no virtio-rng device (micctl attach {card.name} rng)")
    return wanted or str(rngs[0])


def _sanity_check(name: str, data: bytes) -> None:
    if len(data) >= 8 and len(set(data)) == 1:
        raise ValueError(f"{name}: {len(data)} bytes all equal to {data[0]:#04x}")
    if len(data) >= MONOBIT_BYTES:
        ones = int.from_bytes(data[:MONOBIT_BYTES], "big").bit_count()
        if not 9725 < ones < 10275:
            raise ValueError(f"{name}: monobit test failed ({ones} ones in 20000 bits)")
