"""``micctl vhost-user export``: a real ``mic-host`` serves vhost-user net sockets on its switch.

No QEMU and no privileges: two Python front-ends (``NetFrontEnd``, a memfd and
a :class:`DriverQueue` per ring) connect to two exports of the switch the
daemon's card names, and a frame one sends reaches the other through the
daemon's :class:`L2Switch`. ``list`` shows them; a bad switch name, a relative
path, a socket exported twice and an unknown unexport are refused with a
clear message; unexport disconnects the front-end and removes the socket; the
daemon removes its sockets when it stops. (The QEMU guest that pings a card
across the switch is ``test_net_guest``.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.integration.conftest import state_dir
from tests.integration.helpers import HEARTBEAT, daemon, micctl
from tests.vhost_user.net_frontend import NetFrontEnd, frame
from transport.vhost_user import ProtocolFeature
from virtio.errors import LocalProtocolError

__all__ = ["state_dir"]

SWITCH = "lan0"
PROTO = int(ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK)


def _config() -> str:
    keys = "".join(f"{k} = {v}\n" for k, v in HEARTBEAT.items())
    return (
        'version = 1\n\n[[cards]]\nname = "mic0"\ncard_ram = "16M"\nhost_ram = "4M"\n'
        + keys
        + '[[cards.devices]]\ntype = "net"\nname = "net0"\n'
        + f'options = {{ backend = "switch", switch = "{SWITCH}", card_mode = "frames" }}\n'
    )


async def _front_end(path: Path) -> NetFrontEnd:
    fe = await NetFrontEnd.connect(path)
    assert isinstance(fe, NetFrontEnd)
    await fe.negotiate_net(PROTO)
    await fe.start_net()
    return fe


@pytest.mark.asyncio
async def test_export_list_unexport_and_refusals(state_dir: Path) -> None:
    a, b = state_dir / "a.sock", state_dir / "b.sock"
    async with daemon(state_dir, _config()) as client:
        r = await micctl(
            state_dir, "vhost-user", "export", "--switch", "nosuch", "--socket", str(a)
        )
        assert r.rc == 1
        assert "no switch 'nosuch'" in r.err
        assert SWITCH in r.err  # the configured one is named
        with pytest.raises(LocalProtocolError, match="absolute path"):
            await client.vhost_user_export("a.sock", SWITCH)
        with pytest.raises(LocalProtocolError, match="mtu 10 outside"):
            await client.vhost_user_export(str(a), SWITCH, mtu=10)
        for sock in (a, b):
            r = await micctl(state_dir, "vhost-user", "export", "--switch", SWITCH,
                             "--socket", str(sock))  # fmt: skip
            assert (r.rc, r.out) == (0, f"exporting switch {SWITCH} on {sock}\n"), r.err
            assert a.stat().st_mode & 0o777 == 0o600
        with pytest.raises(LocalProtocolError, match="already exported"):
            await client.vhost_user_export(str(a), SWITCH)

        fa, fb = await _front_end(a), await _front_end(b)
        try:
            fb.post_rx(4)
            payload = os.urandom(512)
            fa.send_frame(frame(1, payload))
            token, length = await fb.used(0)
            assert fb.rx_frame(token, length) == frame(1, payload)
            r = await micctl(state_dir, "vhost-user", "list", "--json")
            rows = {row["socket"]: row for row in json.loads(r.out)}
            assert set(rows) == {str(a), str(b)}
            assert rows[str(a)]["connected"]
            assert rows[str(a)]["switch"] == SWITCH
            assert rows[str(a)]["counters"]["tx_packets"] == 1
            assert rows[str(b)]["counters"]["rx_packets"] == 1
            r = await micctl(state_dir, "vhost-user", "list")
            assert r.out.splitlines()[0].split()[:3] == ["SOCKET", "SWITCH", "CONNECTED"], r.out

            r = await micctl(state_dir, "vhost-user", "unexport", "--socket", str(a))
            assert (r.rc, r.out) == (0, f"{a}: unexported\n"), r.err
            assert await fa.closed_by_peer()
            assert not a.exists()
            assert [e["socket"] for e in (await client.vhost_user_exports())["exports"]] == [str(b)]
            r = await micctl(state_dir, "vhost-user", "unexport", "--socket", str(a))
            assert r.rc == 1
            assert "is not exported" in r.err
        finally:
            fa.close()
            fb.close()
        assert b.exists()
    assert not b.exists()  # the daemon removed its socket when it stopped
