"""Card apps of the data-path tests (``tests.block.datapath_apps:fn``), run inside ``mic-card``.

They place request data where a driver chooses to: on the engine's 64 B grid
(the driver's own buffers) or off it (``skew`` bytes into a buffer), the case
vop_vringh.c served by CPU.
"""

from __future__ import annotations

from typing import Any

from mic_card.drivers.block import BlockDevice
from mic_card.services import CardServices
from virtio.constants import BlkReqType


def _blk(card: CardServices, dev: str) -> BlockDevice:
    d = card.device(dev)
    assert isinstance(d, BlockDevice)
    return d


async def read_at(card: CardServices, dev: str, sector: int, nbytes: int, skew: int) -> list[Any]:
    """One read of ``nbytes`` at ``sector`` into card RAM ``skew`` bytes past a
    64 B-aligned buffer; ``[status, hex data]``."""
    blk = _blk(card, dev)
    with blk.buffer(nbytes + 64) as buf:
        buf.view[:] = b"\xee" * len(buf.view)
        status = await blk._submit(BlkReqType.IN, sector, None, (buf.addr + skew, nbytes))
        return [status, bytes(buf.view[skew : skew + nbytes]).hex()]


async def write_at(card: CardServices, dev: str, sector: int, data: str, skew: int) -> int:
    """One write of ``data`` (hex) at ``sector`` from card RAM ``skew`` bytes past a
    64 B-aligned buffer; the status byte."""
    blk = _blk(card, dev)
    raw = bytes.fromhex(data)
    with blk.buffer(len(raw) + 64) as buf:
        buf.view[skew : skew + len(raw)] = raw
        return await blk._submit(BlkReqType.OUT, sector, (buf.addr + skew, len(raw)), None)
