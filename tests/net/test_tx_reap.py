"""Transmit completions without interrupts, through real processes (issue 19).

The card's driver asks the host not to interrupt for its transmitq (Linux
virtio-net without ``napi_tx``) and reaps the completions itself: on the
next transmit, on any interrupt of the device, and from a timer when the NIC
goes idle. These tests run a ``mic-host`` daemon and a ``mic-card`` with a
``tap`` NIC and check, from the outside, that the ring never fills, that the
host's transmitq stays quiet, and that an idle card gets every slot back.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import eventually, micctl
from tests.net.test_e2e import needs_tap, net, run_in, tap_card

#: More than the card's 64 transmit slots: without reaping, the ring would fill.
PINGS = 100
DATAGRAMS = 300
HOST_ADDR = "172.31.1.254"

UDP_FLOOD = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(int(sys.argv[2])):
    s.sendto(b"x" * 64, (sys.argv[1], 9))
"""


async def queue_interrupts(state_dir: Path) -> tuple[int, int]:
    """The host's interrupts for net0's (receiveq, transmitq), from ``micctl stats``."""
    r = await micctl(state_dir, "stats", "mic0", "--json")
    assert r.rc == 0, r
    (dev,) = [d for d in r.json()["devices"] if d["name"] == "net0"]
    rx, tx = dev["queues"][0], dev["queues"][1]
    return int(rx["interrupts"]), int(tx["interrupts"])


async def card_stats(card: Any) -> dict[str, Any]:
    d = await net(card)
    stats: dict[str, Any] = d["card"]["stats"]
    return stats


@needs_tap
@pytest.mark.asyncio
async def test_transmit_completions_are_reaped_without_interrupts(state_dir: Path) -> None:
    async with tap_card(state_dir) as (_client, card, _hns, cns):
        slots = (await card_stats(card))["tx_slots"]
        assert slots < PINGS
        rx0, tx0 = await queue_interrupts(state_dir)

        # Request/reply: every reply's interrupt also reaps the request's slot.
        # -w: wait for every reply until the deadline (with -W alone, ping waits
        # only twice the largest round trip after the last request, which a
        # loaded machine can exceed for a reply that does come).
        ping = await run_in(cns, "ping", "-c", str(PINGS), "-i", "0.01", "-w", "60", HOST_ADDR)
        assert ping.rc == 0, ping.out + ping.err
        assert f"{PINGS} received" in ping.out, ping.out
        rx1, tx1 = await queue_interrupts(state_dir)
        assert rx1 > rx0  # the replies interrupt (EVENT_IDX may merge a few under load)
        # The requests do not (a few may: re-armed by the idle timer mid-ping).
        assert tx1 - tx0 < PINGS // 4, (tx0, tx1)

        # One way, no replies to reap with: slots come back on the next transmit.
        sent0 = (await net(card))["counters"]["tx_packets"]
        flood = await run_in(cns, sys.executable, "-c", UDP_FLOOD, HOST_ADDR, str(DATAGRAMS))
        assert flood.rc == 0, flood.err
        await eventually(
            lambda: _host_got(card, sent0 + DATAGRAMS), within=20, what="every datagram"
        )
        stats = await card_stats(card)
        assert not stats["tx_dropped"], stats

        # Idle: the timer reaps what is left, nothing stays held.
        await eventually(
            lambda: _all_free(card, slots), within=10, what="every transmit slot free again"
        )


async def _host_got(card: Any, n: int) -> bool:
    return bool((await net(card))["counters"]["tx_packets"] >= n)


async def _all_free(card: Any, slots: int) -> bool:
    return bool((await card_stats(card))["tx_slots_free"] == slots)
