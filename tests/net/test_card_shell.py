"""The card shell's ``ifconfig``, ``ip addr`` and ``netstat -i`` over a live NIC.

The commands run through the shell's registry (:func:`mic_card.shell.run_line`)
with a :class:`mic_card.card.Card` over the in-process bus of ``test_card_driver``.
"""

from __future__ import annotations

import types
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from mic_card.card import Card
from mic_card.shell import CaptureOutput, CardFS, ShellContext, run_line
from tests.net.test_card_driver import MAC, PEER, NetRig, RingNet, eth, until
from virtio.net import NET_HDR, format_mac


@pytest_asyncio.fixture
async def rig() -> AsyncIterator[NetRig]:
    r = NetRig()
    try:
        yield r
    finally:
        await r.aclose()


async def sh(rig: NetRig, line: str) -> tuple[int, str, str]:
    card = Card(types.SimpleNamespace(name="mic0", bus=rig.bus))  # type: ignore[arg-type]
    out, err = CaptureOutput(1 << 20), CaptureOutput(1 << 20)
    ctx = ShellContext(card, CardFS(card), out, err)
    status = await run_line(ctx, line)
    return status, out.data.decode(), err.data.decode()


PARAMS = {
    "net": [{"mac": format_mac(MAC), "card_ip": "172.31.1.1/24", "gateway": "172.31.1.254",
             "netns": "mic0", "mode": "frames", "mtu": 1500, "ifname": "eth0"}]
}  # fmt: skip


@pytest.mark.asyncio
async def test_ifconfig_ip_addr_and_netstat(rig: NetRig) -> None:
    dev = RingNet()
    await rig.boot(dev, params=PARAMS)
    nic = rig.nic()
    await nic.send(eth(PEER, MAC, b"x" * 100))
    await dev.inject(eth(MAC, PEER, b"y" * 50))
    await dev.inject_raw(NET_HDR.pack(0x80, 0, 0, 0, 0, 0, 1) + eth(MAC, PEER, b"bad"))
    await until(lambda: nic.rx_packets == 1 and sum(nic.rx_dropped.values()) == 1)

    status, out, _ = await sh(rig, "ifconfig")
    assert status == 0
    lines = out.splitlines()
    assert lines[0] == "eth0: flags=4163<UP,BROADCAST,RUNNING,MULTICAST>  mtu 1500"
    assert lines[1] == "        inet 172.31.1.1  netmask 255.255.255.0  broadcast 172.31.1.255"
    assert lines[2] == f"        ether {format_mac(MAC)}  txqueuelen 1000  (Ethernet)"
    assert lines[3] == "        RX packets 1  bytes 64 (64.0 B)"
    assert lines[4] == "        RX errors 1  dropped 0  overruns 0  frame 0"
    assert lines[5] == "        TX packets 1  bytes 114 (114.0 B)"
    assert "mode frames" in lines[7]
    assert (await sh(rig, "ifconfig eth0"))[1] == out
    status, _, err = await sh(rig, "ifconfig eth9")
    assert status == 1
    assert "Device not found" in err

    status, out, _ = await sh(rig, "ip addr")
    assert status == 0
    assert out.splitlines() == [
        "1: eth0: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc pfifo_fast state UP "
        "group default qlen 1000",
        f"    link/ether {format_mac(MAC)} brd ff:ff:ff:ff:ff:ff",
        "    inet 172.31.1.1/24 brd 172.31.1.255 scope global eth0",
        "       valid_lft forever preferred_lft forever",
    ]
    assert (await sh(rig, "ip a show dev eth0"))[1] == out
    assert (await sh(rig, "ip link"))[1] == "".join(out.splitlines(keepends=True)[:2])
    assert (await sh(rig, "ip route"))[0] == 2

    status, out, _ = await sh(rig, "netstat -i")
    assert status == 0
    rows = out.splitlines()
    assert rows[0] == "Kernel Interface table"
    assert rows[1].split() == ["Iface", "MTU", "RX-OK", "RX-ERR", "RX-DRP", "RX-OVR",
                               "TX-OK", "TX-ERR", "TX-DRP", "TX-OVR", "Flg"]  # fmt: skip
    assert rows[2].split() == ["eth0", "1500", "1", "1", "0", "0", "1", "0", "0", "0", "BMRU"]

    # link down: no RUNNING / LOWER_UP
    await dev.set_link(False)
    await nic.wait_link(False)
    assert (await sh(rig, "ifconfig"))[1].startswith(
        "eth0: flags=4099<UP,BROADCAST,MULTICAST>  mtu 1500"
    )
    assert "state DOWN" in (await sh(rig, "ip addr"))[1]
    assert (await sh(rig, "netstat -i"))[1].splitlines()[2].endswith(" BMU")


@pytest.mark.asyncio
async def test_no_nic(rig: NetRig) -> None:
    await rig.boot()
    assert await sh(rig, "ifconfig") == (0, "", "")
    assert (await sh(rig, "netstat -i"))[1].count("\n") == 2
    assert (await sh(rig, "netstat"))[0] == 2
