"""virtio-net end to end through real processes: a ``mic-host`` daemon, ``mic-card``
card OS processes, kernel TAP devices in network namespaces, ``ping`` and ``iperf3``.

The ``tap`` tests need root (TAP devices, namespaces) and skip with the reason
otherwise; every namespace and interface has a unique name and is removed
afterwards, so nothing touches the machine's own network. The ``switch``
tests run cards in frames mode (the unprivileged path) and need nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from mic_host.client import CardClient, Client
from tests.integration.helpers import HEARTBEAT, booted, command, daemon, eventually, micctl
from transport.tap import ip_sync, netns_exists, tap_privilege_problem
from virtio.errors import MicError
from virtio.net import MAX_PACKET

APPS = "tests.net.apps"
PROBLEM = tap_privilege_problem()
needs_tap = pytest.mark.skipif(PROBLEM is not None, reason=f"TAP/netns: {PROBLEM}")


def app(fn: str) -> str:
    return f"{APPS}:{fn}"


def uid() -> str:
    return uuid.uuid4().hex[:6]


def net_card(name: str, net_options: dict[str, Any], *, card_ram: str = "32M", **keys: Any) -> str:
    """A card table with a console and one net device (no disk)."""
    opts = ", ".join(f"{k} = {json.dumps(v)}" for k, v in net_options.items())
    settings = {"card_ram": card_ram, "host_ram": "4M", **HEARTBEAT, **keys}
    text = f'[[cards]]\nname = "{name}"\n'
    text += "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items())
    text += '[[cards.devices]]\ntype = "console"\n'
    text += f'[[cards.devices]]\ntype = "net"\nname = "net0"\noptions = {{ {opts} }}\n'
    return text


def cfg(*cards: str) -> str:
    return "version = 1\n\n" + "\n".join(cards)


@contextlib.contextmanager
def host_netns() -> Any:
    """A namespace standing for the host's network (the host TAP goes there)."""
    name = f"mvh-{uid()}"
    ip_sync("netns", "add", name)
    ip_sync("link", "set", "lo", "up", netns=name)
    try:
        yield name
    finally:
        ip_sync("netns", "del", name)


async def run_in(netns: str, *argv: str, timeout: float = 30.0) -> Any:
    return await command("ip", "netns", "exec", netns, *argv, timeout=timeout)


async def net(card: CardClient, **kw: Any) -> dict[str, Any]:
    r = await card.net(**kw)
    devs = r["devices"]
    assert len(devs) == 1, r
    d: dict[str, Any] = devs[0]
    return d


@contextlib.asynccontextmanager
async def tap_card(state_dir: Path) -> AsyncIterator[tuple[Client, CardClient, str, str]]:
    """mic0 with a ``tap`` NIC whose host TAP lives in a test namespace; yields
    (client, card, host namespace, card namespace)."""
    with host_netns() as hns:
        card_ns = f"mvc-{uid()}"
        opts = {"backend": "tap", "ifname": f"mv{uid()}", "netns": hns, "card_netns": card_ns}
        try:
            async with daemon(state_dir, cfg(net_card("mic0", opts))) as client:
                card = await booted(client, "mic0")
                await eventually(
                    lambda: _card_link_ready(card),
                    within=20,
                    what="the card's TAP is configured",
                )
                yield client, card, hns, card_ns
        finally:
            assert not netns_exists(card_ns), "the card's namespace outlived the daemon"


async def _card_link_ready(card: CardClient) -> bool:
    d = await net(card)
    info = d.get("card") or {}
    return bool(info.get("mode") == "tap" and info.get("ready", True) and info.get("link") == "up")


# -- tap --------------------------------------------------------------------------------


@needs_tap
@pytest.mark.asyncio
async def test_ping_both_ways_and_micctl_net(state_dir: Path) -> None:
    async with tap_card(state_dir) as (_client, card, hns, cns):
        # mpssd's addressing: mic0 is 172.31.1.1, the host 172.31.1.254
        d = await net(card)
        assert (d["host_ip"], d["card_ip"]) == ("172.31.1.254/24", "172.31.1.1/24")
        assert d["backend"] == "tap"
        assert d["card"]["netns"] == cns
        ping = await run_in(hns, "ping", "-c", "3", "-i", "0.2", "-W", "3", "172.31.1.1")
        assert ping.rc == 0, ping.out + ping.err
        ping = await run_in(cns, "ping", "-c", "3", "-i", "0.2", "-W", "3", "172.31.1.254")
        assert ping.rc == 0, ping.out + ping.err

        shown = await micctl(state_dir, "net", "mic0")
        assert shown.rc == 0, shown.err
        assert "backend tap" in shown.out
        assert "172.31.1.254/24" in shown.out
        assert cns in shown.out
        js = (await micctl(state_dir, "net", "mic0", "--json")).json()
        assert js["devices"][0]["card"]["netns"] == cns

        # the card shell shows its NIC
        out, _err, status = await card.exec("ifconfig")
        assert status == 0
        assert b"172.31.1.1" in out
        assert b"RX packets" in out


@needs_tap
@pytest.mark.skipif(shutil.which("iperf3") is None, reason="iperf3 is not installed")
@pytest.mark.asyncio
async def test_iperf3_tcp_uses_large_segments(state_dir: Path) -> None:
    async with tap_card(state_dir) as (_client, card, hns, cns):
        server = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", cns, "iperf3", "-s", "-1", "-B", "172.31.1.1",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        try:
            await asyncio.sleep(0.5)
            res = await run_in(hns, "iperf3", "-c", "172.31.1.1", "-t", "2", "-J", timeout=60)
            assert res.rc == 0, res.out[-2000:] + res.err
            bps = json.loads(res.out)["end"]["sum_received"]["bits_per_second"]
            assert bps > 0
        finally:
            with contextlib.suppress(ProcessLookupError):
                server.kill()
            await server.wait()
        d = await net(card)
        # offloads negotiated and used: TSO segments crossed the rings as one chain
        assert {"tso4", "csum"} <= set(d["offloads"])
        assert d["counters"]["gso_packets"] > 0
        assert d["counters"]["max_packet"] > 1514 + 12
        # ...and each took one receive buffer of the card's: one used element per
        # packet on the receiveq, not one per 16 KiB piece
        assert d["card"]["stats"]["rx_buffer_size"] >= MAX_PACKET
        st = await card.stats()
        (dev,) = (x for x in st["devices"] if x["type"] == "net")
        rxq = dev["queues"][0]
        packets = dev["backend"]["rx_packets"]
        assert packets > 1000
        assert rxq["buffers"] == packets, (rxq, dev["backend"])


@needs_tap
@pytest.mark.asyncio
async def test_link_down_up_and_detach_attach(state_dir: Path) -> None:
    async with tap_card(state_dir) as (_client, card, hns, cns):
        target = "172.31.1.1"
        d = await net(card, link=False)
        assert d["link"] == "down"
        await eventually(
            lambda: _card_link(card, "down"), within=10, what="the card sees the link down"
        )
        ping = await run_in(hns, "ping", "-c", "1", "-W", "1", target)
        assert ping.rc != 0
        await net(card, link=True)
        await eventually(lambda: _card_link(card, "up"), within=10, what="link up again")
        ping = await run_in(hns, "ping", "-c", "2", "-W", "3", target)
        assert ping.rc == 0, ping.out

        # hot remove: the card's interface and namespace go away
        await card.detach("net0")
        await eventually(lambda: not netns_exists(cns), within=10, what="card namespace removed")
        # hot add: back on the network
        opts = {"backend": "tap", "ifname": f"mv{uid()}", "netns": hns, "card_netns": cns}
        res = await card.attach("net", name="net1", **opts)
        assert res["device"] == "eth0"
        await eventually(lambda: _card_link_ready_named(card, "net1"), within=20, what="re-up")
        ping = await run_in(hns, "ping", "-c", "2", "-W", "3", target)
        assert ping.rc == 0, ping.out


async def _card_link(card: CardClient, state: str) -> bool:
    d = await net(card)
    return bool((d.get("card") or {}).get("link") == state)


async def _card_link_ready_named(card: CardClient, device: str) -> bool:
    r = await card.net(device)
    info = r["devices"][0].get("card") or {}
    return bool(info.get("mode") == "tap" and info.get("link") == "up")


@needs_tap
@pytest.mark.asyncio
async def test_hostile_card_frames_are_dropped_and_counted(state_dir: Path) -> None:
    async with tap_card(state_dir) as (_client, card, hns, _cns):
        used = (await card.run(app("send_bad_tx")))["value"]
        assert used == [0] * 7  # every chain answered
        d = await net(card)
        counters = d["counters"]
        assert counters["tx_dropped"] >= 7, counters
        tx = counters["drops"]["tx"]
        assert (tx["runt"], tx["bad_header"], tx["oversize"]) == (2, 4, 1), tx
        # the host and the card are fine
        ping = await run_in(hns, "ping", "-c", "2", "-W", "3", "172.31.1.1")
        assert ping.rc == 0, ping.out
        assert (await card.status())["state"] == "online"


@needs_tap
@pytest.mark.asyncio
async def test_foreign_namespace_refused_with_a_clear_error(state_dir: Path) -> None:
    with host_netns() as taken:
        opts = {"backend": "tap", "ifname": f"mv{uid()}", "card_netns": taken}
        async with daemon(state_dir, cfg(net_card("mic0", opts))) as client:
            card = client.card("mic0")
            with pytest.raises(MicError):  # the boot fails; the state says why
                await card.boot(wait=True, timeout=20)
            st = await card.status()
            assert st["state"] in ("crashed", "ready", "reset_failed")
            assert "already exists" in (st["last_error"] or "")
        assert netns_exists(taken)  # not ours: left alone


# -- switch (unprivileged path) ------------------------------------------------------------


def switch_cards(n: int, switch: str, **extra: Any) -> str:
    return cfg(
        *(
            net_card(
                f"mic{i}", {"backend": "switch", "switch": switch, "card_mode": "frames"}, **extra
            )
            for i in range(n)
        )
    )


@pytest.mark.asyncio
async def test_cards_talk_through_the_switch(state_dir: Path) -> None:
    async with daemon(state_dir, switch_cards(3, f"sw{uid()}")) as client:
        cards = [await booted(client, f"mic{i}") for i in range(3)]
        macs = [(await c.run(app("mac_of")))["value"] for c in cards]
        assert len(set(macs)) == 3
        # broadcast from mic0 floods to mic1 and mic2 (not back to mic0)
        recv1 = asyncio.create_task(cards[1].run(app("recv_frames"), 5, 10.0))
        recv2 = asyncio.create_task(cards[2].run(app("recv_frames"), 5, 10.0))
        recv0 = asyncio.create_task(cards[0].run(app("recv_frames"), 1, 3.0))
        await asyncio.sleep(0.3)
        await cards[0].run(app("send_frames"), "ff:ff:ff:ff:ff:ff", 5, "bcast")
        assert (await recv1)["value"] == [f"bcast {i}" for i in range(5)]
        assert (await recv2)["value"] == [f"bcast {i}" for i in range(5)]
        assert (await recv0)["value"] == []
        # the switch learned mic0's MAC: unicast from mic1 reaches only mic0
        recv0 = asyncio.create_task(cards[0].run(app("recv_frames"), 3, 10.0))
        recv2 = asyncio.create_task(cards[2].run(app("recv_frames"), 1, 3.0))
        await asyncio.sleep(0.3)
        await cards[1].run(app("send_frames"), macs[0], 3, "uni")
        assert (await recv0)["value"] == ["uni 0", "uni 1", "uni 2"]
        assert (await recv2)["value"] == []
        d = await net(cards[0])
        assert d["backend"] == "switch"
        assert d["card"]["mode"] == "frames"


@pytest.mark.asyncio
async def test_a_stopped_card_does_not_block_the_switch(state_dir: Path) -> None:
    sw = f"sw{uid()}"
    text = switch_cards(3, sw, heartbeat_timeout=30.0)
    async with daemon(state_dir, text) as client:
        cards = [await booted(client, f"mic{i}") for i in range(3)]
        macs = [(await c.run(app("mac_of")))["value"] for c in cards]
        # teach the switch where mic1 is
        await cards[1].run(app("send_frames"), macs[0], 1, "hello")
        await cards[0].run(app("drain"))
        pid2 = (await cards[2].status())["pid"]
        os.kill(pid2, signal.SIGSTOP)  # mic2 stops consuming its receive queue
        try:
            # floods reach the stopped card too: its port fills, then drops
            await cards[0].run(app("send_frames"), "ff:ff:ff:ff:ff:ff", 600, "flood")
            await cards[1].run(app("drain"))
            recv1 = asyncio.create_task(cards[1].run(app("recv_frames"), 20, 10.0))
            await asyncio.sleep(0.3)
            await cards[0].run(app("send_frames"), macs[1], 20, "after")
            got = (await recv1)["value"]
            assert got == [f"after {i}" for i in range(20)]
            d2 = await net(cards[2])
            assert d2["counters"]["rx_dropped"] > 0
        finally:
            os.kill(pid2, signal.SIGCONT)


@needs_tap
@pytest.mark.asyncio
async def test_privileged_cards_ping_each_other_through_the_switch(state_dir: Path) -> None:
    sw = f"sw{uid()}"
    ns = [f"mvc-{uid()}", f"mvc-{uid()}"]
    cards_toml = [
        net_card(f"mic{i}", {"backend": "switch", "switch": sw, "card_netns": ns[i]})
        for i in range(2)
    ]
    async with daemon(state_dir, cfg(*cards_toml)) as client:
        cards = [await booted(client, f"mic{i}") for i in range(2)]
        for c in cards:
            await eventually(lambda c=c: _card_link_ready(c), within=20, what="card TAP up")
        infos = [await net(c) for c in cards]
        # the switch's default addressing: 172.31.255.<node>/24
        assert [d["card_ip"] for d in infos] == ["172.31.255.1/24", "172.31.255.2/24"]
        ping = await run_in(ns[0], "ping", "-c", "3", "-i", "0.2", "-W", "3", "172.31.255.2")
        assert ping.rc == 0, ping.out + ping.err
        ping = await run_in(ns[1], "ping", "-c", "2", "-W", "3", "172.31.255.1")
        assert ping.rc == 0, ping.out + ping.err
    assert not any(netns_exists(n) for n in ns)
