"""Card apps of a hostile card that attacks the host through its virtio console (issue 14).

Run inside ``mic-card`` (``tests.integration.hostile_console:fn``), as the apps
of :mod:`tests.integration.apps`. They bypass the console driver's own limits
(4 KiB transmit chunks, one header per control message) and put chains on its
queues directly, the way a buggy or hostile card OS could: every buffer lies
inside the card's own RAM, so each chain is valid by the ring's rules.
"""

from __future__ import annotations

import asyncio
from typing import Any

from mic_card.card import Card
from virtio.errors import WouldBlock

_QUEUE_TIMEOUT = 60.0


def _endpoint(card: Card, queue: str) -> Any:
    """The console's transmit endpoint ``queue``: ``"port0"`` (hvc0's transmitq)
    or ``"control"`` (the control transmitq)."""
    con = card.device("hvc0")
    if queue == "port0":
        return con.port(0).tx
    if queue == "control":
        return con._ctrl_tx
    raise ValueError(f"no console queue {queue!r}")


async def console_chain(card: Card, queue: str, segments: int, seg_bytes: int) -> dict[str, Any]:
    """Post ONE chain of ``segments`` readable buffers of ``seg_bytes`` each on ``queue``.

    The buffers tile the card's RAM from address 0 (wrapping around when the
    chain is larger than the RAM, so buffers may overlap). Returns the used
    length the host gave back, the chain's size and how long the host took.
    """
    ram = card.card_ram.size
    if seg_bytes > ram:
        raise ValueError(f"{seg_bytes} B buffers in {ram} B of card RAM")
    span = ram - ram % seg_bytes
    readable = [((i * seg_bytes) % span, seg_bytes) for i in range(segments)]
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    fut = _endpoint(card, queue).submit_nowait(readable, [])
    used = await asyncio.wait_for(fut, _QUEUE_TIMEOUT)
    return {"used": used, "bytes": segments * seg_bytes, "elapsed": loop.time() - t0}


async def console_flood(card: Card, chains: int, chain_bytes: int) -> dict[str, Any]:
    """Post ``chains`` chains of ``chain_bytes`` of printable text each on hvc0's
    transmitq (all reading one buffer), as fast as the ring takes them."""
    line = b"flood flood flood flood flood flood flood flood flood flood flood\n"
    addr = card.alloc(chain_bytes, 4096)
    try:
        view = card.memory.view(addr, chain_bytes, True)
        reps = -(-chain_bytes // len(line))
        view[:] = (line * reps)[:chain_bytes]
        del view
        tx = _endpoint(card, "port0")
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        futs = []
        for _ in range(chains):
            while True:
                try:
                    futs.append(tx.submit_nowait([(addr, chain_bytes)], []))
                    break
                except WouldBlock:  # the ring is full: wait for room
                    await asyncio.sleep(0.001)
        used = await asyncio.wait_for(asyncio.gather(*futs), _QUEUE_TIMEOUT)
        return {"chains": len(used), "bytes": chains * chain_bytes, "elapsed": loop.time() - t0}
    finally:
        card.free(addr)


async def control_garbage_flood(card: Card, count: int, size: int) -> int:
    """Send ``count`` control buffers of ``size`` zero bytes (a driver's message is 8)."""
    con = card.device("hvc0")
    for _ in range(count):
        con.send_control_raw(bytes(size))
    await asyncio.sleep(0.2)
    return count
