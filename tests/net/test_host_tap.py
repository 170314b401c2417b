"""The ``tap`` backend (and the switch's TAP uplink) against real kernel TAPs.

Each test works inside a throw-away network namespace (``mvt-XXXXXX``), so
nothing touches the machine's own network; the host side of the TAP is
observed and driven with AF_PACKET sockets bound to it (with
``PACKET_VNET_HDR`` to send and see GSO packets as one 64 KiB frame).
Skipped with the reason when TAP devices or namespaces are unavailable.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mic_host.backends import create_backend
from mic_host.backends.net import SwitchNetBackend, TapNetBackend, create_net_backend
from tests.net.test_host_rig import (
    ALL,
    PLAIN,
    eth,
    hdr,
    needs_tap,
    netns,
    packet_socket,
    recv_incoming,
    running,
    tap_mac,
    uid,
    until,
    wait_oper_up,
)
from tests.net.test_host_switch import tcp_gso_frame
from transport.tap import ip, netns_exists
from virtio.errors import ConfigError
from virtio.net import BROADCAST, NET_HDR_SIZE, parse_config

VNET10 = 10  # struct virtio_net_hdr on a packet socket: no num_buffers


def tap_backend(ns: str, **kw: object) -> TapNetBackend:
    kw.setdefault("card_mode", "frames")
    b = create_net_backend(
        backend="tap", ifname=f"mvt{uid()}", netns=ns, host_ip="10.77.1.254/24", **kw
    )
    assert isinstance(b, TapNetBackend)
    return b


@needs_tap
@pytest.mark.asyncio
async def test_tx_frames_reach_the_tap_gso_included() -> None:
    async with netns() as ns:
        b = tap_backend(ns)
        cap = packet_socket(ns, b.ifname, vnet_hdr=True)
        try:
            async with running(b, ALL) as card:
                await wait_oper_up(ns, b.ifname)
                me = b.mac
                host = tap_mac(ns, b.ifname)
                small = eth(host, me, b"ping" * 10)
                card.send(hdr() + small, split=[5])  # header split across descriptors
                assert (await recv_incoming(cap, "the small frame"))[VNET10:] == small
                big = tcp_gso_frame(host, me, 65000)
                card.send(hdr(1, 1, 54, 1448, 34, 16) + big, split=[12, 4000])
                got = await recv_incoming(cap, "the 64 KiB segment")
                assert got[1] == 1  # gso_type TCPV4: one segment, not 45 frames
                assert got[VNET10:] == big
                await card.sent(2)
                assert b.tx_packets == 2
                assert b.tx_gso == 1
                assert b.info()["host_interface"] == b.ifname
        finally:
            cap.close()


@needs_tap
@pytest.mark.asyncio
async def test_rx_from_the_tap_into_posted_buffers() -> None:
    async with netns() as ns:
        b = tap_backend(ns)
        tx = packet_socket(ns, b.ifname)
        try:
            async with running(b, PLAIN) as card:
                await wait_oper_up(ns, b.ifname)
                host = tap_mac(ns, b.ifname)
                frames = [eth(b.mac, host, bytes([i]) * (60 + i * 100)) for i in range(10)]
                for f in frames:
                    tx.send(f)
                got = await card.recv(10)
                assert [g[1] for g in got] == frames
                assert all(g[2] == 1 and g[0][6] == 1 for g in got)  # num_buffers written
                assert all(g[0][:2] == (0, 0) for g in got)  # no offloads for a plain card
                assert b.rx_packets == 10 + card.ignored
                assert b.tap.offloads == 0
        finally:
            tx.close()


@needs_tap
@pytest.mark.asyncio
async def test_mrg_rxbuf_spreads_a_64k_gso_packet_over_buffers() -> None:
    async with netns() as ns:
        b = tap_backend(ns)
        tx = packet_socket(ns, b.ifname, vnet_hdr=True)
        try:
            async with running(b, ALL) as card:
                await wait_oper_up(ns, b.ifname)
                assert b.tap.offloads != 0  # GUEST_CSUM/TSO negotiated: the TAP takes GSO
                host = tap_mac(ns, b.ifname)
                big = tcp_gso_frame(b.mac, host, 65000)
                # virtio_net_hdr: NEEDS_CSUM, TCPV4, hdr_len 54, gso_size 1448, csum 34+16
                tx.send(hdr(1, 1, 54, 1448, 34, 16)[:VNET10] + big)
                (h, frame, nbufs) = (await card.recv(1, "the GSO packet"))[0]
                assert frame == big
                assert h[1] == 1
                assert h[3] == 1448
                want = -(-(len(big) + NET_HDR_SIZE) // 16384)
                assert nbufs == want == 4
                assert card.rx_chunks[-4:] == [16384] * 3 + [len(big) + NET_HDR_SIZE - 3 * 16384]
                assert b.rx_gso == 1
                assert b.max_packet == len(big)
        finally:
            tx.close()


@needs_tap
@pytest.mark.asyncio
async def test_a_card_without_guest_tso_gets_segments() -> None:
    async with netns() as ns:
        b = tap_backend(ns)
        tx = packet_socket(ns, b.ifname, vnet_hdr=True)
        try:
            async with running(b, PLAIN) as card:
                await wait_oper_up(ns, b.ifname)
                host = tap_mac(ns, b.ifname)
                tx.send(hdr(1, 1, 54, 1448, 34, 16)[:VNET10] + tcp_gso_frame(b.mac, host, 14480))
                got = await card.recv(10, "segments")
                assert all(h[:2] == (0, 0) and len(f) <= 1514 for h, f, _ in got)
                assert b.rx_gso == 0
        finally:
            tx.close()


@needs_tap
@pytest.mark.asyncio
async def test_no_rx_buffers_pauses_the_reader_without_spinning() -> None:
    async with netns() as ns:
        b = tap_backend(ns)
        tx = packet_socket(ns, b.ifname)
        try:
            async with running(b, PLAIN, rx=0) as card:
                card.post_rx(1)
                await wait_oper_up(ns, b.ifname)
                host = tap_mac(ns, b.ifname)
                frames = [eth(b.mac, host, bytes([i]) * 100) for i in range(5)]
                for f in frames:
                    tx.send(f)
                await until(lambda: b.rx_no_buffers >= 1, "the backend ran out of buffers")
                # the reader is off: the kernel keeps the packets, the loop stays idle
                assert not b._reading
                got = await card.recv(5)  # recv() reposts what it consumed
                assert [g[1] for g in got] == frames
                # every pause ended with buffers the card posted: no spinning
                assert b.rx_no_buffers <= card.posts
        finally:
            tx.close()


@needs_tap
@pytest.mark.asyncio
async def test_reset_link_and_carrier() -> None:
    async with netns() as ns:
        b = tap_backend(ns)
        async with running(b, ALL) as card:
            await wait_oper_up(ns, b.ifname)
            await until(lambda: b.tap.offloads != 0, "offloads on")
            await b.set_link(False)
            assert not parse_config(card.ctx.configs[-1]).link_up
            out = await ip("-o", "link", "show", "dev", b.ifname, netns=ns)
            assert "NO-CARRIER" in out
            card.send(hdr() + eth(BROADCAST, b.mac, b"x" * 40))
            await card.sent(1)
            assert b.tx_drops["link_down"] == 1
            await b.set_link(True)
            await card.reset()  # returns once held RX chains are back
            assert not b._held
            assert b.tap.offloads == 0
            card.features = PLAIN
            card.driver_ok()
            card.post_rx(8)
            tx = packet_socket(ns, b.ifname)
            try:
                await wait_oper_up(ns, b.ifname)
                f = eth(b.mac, tap_mac(ns, b.ifname), b"after reset")
                tx.send(f)
                assert (await card.recv(1))[0][1] == f
                assert b.tap.offloads == 0
            finally:
                tx.close()
    assert b.tap.closed


@needs_tap
@pytest.mark.asyncio
async def test_card_namespace_foreign_refused_stale_deleted(tmp_path: Path) -> None:
    async with netns() as hns, netns("mvtc") as foreign:
        opts = {"state_dir": str(tmp_path), "card": "micx", "name": "net0"}
        ifname = f"mvt{uid()}"
        with pytest.raises(ConfigError, match=r"already exists \(not created by this daemon\)"):
            create_backend(
                "net", backend="tap", ifname=ifname, netns=hns, card_netns=foreign, **opts
            )
        assert netns_exists(foreign)  # not ours: left alone
        assert ifname not in await ip("-o", "link", "show", netns=hns)  # TAP closed again
        # the same name, recorded as ours (a daemon that died left it): deleted and made
        # again by the host before the card boots
        record = tmp_path / "micx-net0.netns"
        record.write_text(foreign + "\n")
        stale = os.stat(f"/run/netns/{foreign}").st_ino
        owner = create_net_backend.namespaces
        b = create_backend("net", backend="switch", switch=f"t{uid()}", card_netns=foreign, **opts)
        assert netns_exists(foreign)
        made = os.stat(f"/run/netns/{foreign}").st_ino
        assert made != stale
        assert owner.owns(foreign)
        assert record.read_text() == foreign + "\n"
        await b.aclose()  # the boot ended: the namespace outlives it
        assert netns_exists(foreign)
        # the next boot's backend reuses it as it is
        b = create_backend("net", backend="switch", switch=f"t{uid()}", card_netns=foreign, **opts)
        assert os.stat(f"/run/netns/{foreign}").st_ino == made
        await b.aclose()
        # the device goes for good (detach, daemon stop): deleted with its record
        await owner.release(record)
        assert not netns_exists(foreign)
        assert not record.exists()
        assert not owner.owns(foreign)
        await owner.release(record)  # twice: nothing left to do
        # frames mode: the card opens no TAP, the host makes no namespace
        b = create_backend(
            "net", backend="switch", switch=f"t{uid()}", card_netns=foreign, card_mode="frames",
            **opts,
        )  # fmt: skip
        assert not netns_exists(foreign)
        await b.aclose()


@needs_tap
@pytest.mark.asyncio
async def test_switch_uplink_tap_joins_cards_to_the_host() -> None:
    async with netns() as ns:
        upname = f"mvu{uid()}"
        b = create_net_backend(
            backend="switch",
            switch=f"t{uid()}",
            card_mode="frames",
            uplink=upname,
            netns=ns,
            host_ip="10.78.0.254/24",
        )
        assert isinstance(b, SwitchNetBackend)
        assert b.card_params()["gateway"] == "10.78.0.254"
        cap = packet_socket(ns, upname)
        try:
            async with running(b, ALL) as card:
                host = tap_mac(ns, upname)
                f = eth(host, b.mac, b"card to host")
                card.send(hdr() + f)
                assert (await recv_incoming(cap, "the card's frame")) == f
                g = eth(b.mac, host, b"host to card")
                cap.send(g)
                assert (await card.recv(1))[0][1] == g
                assert b.switch.uplink is not None
                assert b.switch.uplink.tap.offloads != 0  # the only card takes everything
        finally:
            cap.close()
        assert upname not in await ip("-o", "link", "show", netns=ns)  # closed with the switch


@pytest.mark.skipif(not os.path.exists("/dev/net/tun"), reason="/dev/net/tun does not exist")
def test_tap_without_privilege_names_the_switch_backend() -> None:
    code = (
        # import first: the interpreter's own files may not be readable by nobody
        "import os\n"
        "from mic_host.backends import create_backend, net\n"
        "from virtio.errors import ConfigError\n"
        "if os.geteuid() == 0:\n"
        "    os.setuid(65534)\n"
        "try:\n"
        "    create_backend('net', backend='tap', ifname='mvtperm0', card_mode='frames')\n"
        "except ConfigError as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("TapPermissionError"), out
    assert "cannot create TAP device 'mvtperm0'" in out
    assert "`switch` net backend" in out
