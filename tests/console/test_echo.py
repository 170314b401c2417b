"""The console's short path (issue 19): a typed byte is echoed from the card's interrupt
callback and the card's output is served in the host's doorbell callback, in order,
with the line editor's behaviour unchanged. Real processes, then the in-process rig
for the ordering of a big chain the doorbell callback hands to the loop.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from mic_card.drivers.console import ConsoleDevice
from mic_host.backends.console import TX_STEP, ConsoleBackend
from tests.integration.helpers import booted, card_toml, config, daemon
from tests.vop.rig import Rig
from virtio.constants import DeviceType

APPS = "tests.console.apps"
PROMPT = b"mic0:~# "
MIB = 1 << 20


def _port0_tx(stats: dict[str, Any]) -> dict[str, Any]:
    (dev,) = [d for d in stats["devices"] if d["type"] == "console"]
    (q,) = [q for q in dev["queues"] if q["index"] == 1]  # port 0's transmitq
    return q  # type: ignore[no-any-return]


async def _irq_echoed(card: Any) -> int:
    info = (await card.run(f"{APPS}:console_info"))["value"]
    (port0,) = [p for p in info["ports"] if p["id"] == 0]
    return int(port0["irq_echoed"])


@pytest.mark.asyncio
async def test_typed_bytes_echo_from_the_interrupt_in_order(state_dir: Path) -> None:
    async with daemon(state_dir, config(card_toml("mic0", disk=None))) as client:
        card = await booted(client)
        async with card.console() as con:
            assert await con.command("echo ready") == "ready\n"
            echoed0 = await _irq_echoed(card)
            tx0 = _port0_tx(await card.stats())
            text = "echo typed-one-at-a-time"
            for ch in text:  # a person typing: each byte after the last one's echo
                await con.write(ch)
                await con.read_until(ch)
            typed = _port0_tx(await card.stats())
            # Nobody on the card waits for an echo's completion: the host was
            # asked not to interrupt for them (EVENT_IDX may let one through).
            assert typed["chains"] - tx0["chains"] >= len(text)
            assert typed["interrupts"] - tx0["interrupts"] <= 2
            for key, echo in (("X", b"X"), ("\x7f", b"\b \b")):  # a typo, erased
                await con.write(key)
                await con.read_until(echo)
            # Every byte after the first waited in a line editor that had echoed
            # all before it: its echo left from the receive interrupt.
            assert await _irq_echoed(card) - echoed0 >= len(text) - 1 + 1 + 3
            await con.write("Z\x7f\r")  # together: echoed in order, whoever echoes
            await con.read_until(b"Z\b \b\r\ntyped-one-at-a-time\r\n" + PROMPT)
            tx1 = _port0_tx(await card.stats())
            # The host served the card's output in the doorbell callback: the
            # chains went out without waking the port's transmit loop.
            assert tx1["chains"] - tx0["chains"] >= len(text)
            assert tx1["wakeups"] - tx0["wakeups"] <= 2
            # Typeahead while a command runs is echoed by the editor afterwards.
            await con.sendline("sleep 0.5")
            await con.read_until(b"sleep 0.5\r\n")
            await con.write("echo after\r")
            await con.read_until(PROMPT + b"echo after\r\nafter\r\n" + PROMPT)
            # Editing still works on the short path: Ctrl-U, UTF-8, escape sequences.
            await con.write("garbage\x15echo k\x1b[A\u00e9pt\r")
            await con.read_until("\r\nk\u00e9pt\r\n".encode() + PROMPT)


@pytest.mark.asyncio
async def test_a_big_chain_from_the_doorbell_callback_keeps_the_order(rig: Rig) -> None:
    be = ConsoleBackend(max_chain=4 * MIB)
    rig.add(be)
    bus = await rig.boot(drivers={int(DeviceType.CONSOLE): ConsoleDevice})
    con = bus.driver("hvc0")
    assert isinstance(con, ConsoleDevice)
    async with asyncio.timeout(5):
        port = await con.console_port()
    out: list[bytes] = []
    be.ports[0].on_output = out.append
    mem = rig.mem.card.raw()
    mem[MIB : 2 * MIB] = b"b" * MIB
    mem[2 * MIB : 2 * MIB + 4] = b"tail"
    # Both published with one kick: the callback pops the big one (handed to
    # the loop, in pieces) and the loop must not output the small one first.
    big = port.tx.submit_nowait([(MIB, MIB)] * 2, [])
    small = port.tx.submit_nowait([(2 * MIB, 4)], [])
    async with asyncio.timeout(5):
        assert await asyncio.gather(big, small) == [0, 0]
    assert b"".join(out) == b"b" * (2 * MIB) + b"tail"
    assert max(len(o) for o in out) == TX_STEP
    await be.aclose()
