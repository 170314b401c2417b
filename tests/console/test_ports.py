"""virtio-console over real rings, in one process (the VOP rig): MULTIPORT negotiated or
not, the control protocol, RESIZE both ways, garbage on the control queue and on the
agent port in both directions, the agent answering the host.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Callable

import pytest

from mic_card.agent import AGENT_PORT, Agent
from mic_card.drivers.console import ConsoleDevice, SinglePortConsole
from mic_card.shell import CardFS
from mic_host.backends.console import ConsoleBackend
from tests.integration.helpers import eventually
from tests.vop.rig import Rig
from virtio.constants import ConsoleFeature, DeviceType
from virtio.errors import LocalProtocolError, MicTimeoutError, RemoteProtocolError

CONSOLE = int(DeviceType.CONSOLE)


async def until(check: Callable[[], object], within: float = 5.0) -> None:
    await eventually(check, within=within, what="condition", period=0.01)


async def _boot(rig: Rig, backend: ConsoleBackend, driver: type = ConsoleDevice) -> ConsoleDevice:
    rig.add(backend)
    bus = await rig.boot(drivers={CONSOLE: driver})
    con = bus.driver("hvc0")
    assert isinstance(con, driver)
    return con


@pytest.mark.asyncio
async def test_multiport_ports_and_names(rig: Rig) -> None:
    be = ConsoleBackend(cols=100, rows=30)
    con = await _boot(rig, be)
    assert con.multiport
    async with asyncio.timeout(5):
        agent_port = await con.wait_port(AGENT_PORT)
        port0 = await con.console_port()
    await until(lambda: port0.console and agent_port.host_connected)
    assert be.multiport_active
    assert be.driver_ready
    assert con.max_nr_ports == 2
    assert (port0.console, port0.name, port0.size) == (True, None, (100, 30))
    assert (agent_port.id, agent_port.console) == (1, False)
    # the driver answered CONSOLE_PORT with PORT_OPEN=1
    await until(lambda: be.ports[0].guest_open)
    assert not be.ports[1].guest_open  # nobody opened the agent port yet

    # port 0 both ways, and the named port both ways, on their own queues
    await con.write(b"card says hi\n")
    assert b"card says hi" in be.output()
    await be.write(b"typed")
    async with asyncio.timeout(5):
        assert await con.read() == b"typed"
    seen: list[bytes] = []
    be.ports[1].on_output = seen.append
    await agent_port.write(b"to the host")
    assert seen == [b"to the host"]
    await be.ports[1].write(b"to the card")
    async with asyncio.timeout(5):
        assert await agent_port.readuntil(b"card") == b"to the card"
    assert b"to the host" not in be.output()  # the console log is port 0's only

    # RESIZE through the control queue
    sizes: list[tuple[int, int]] = []
    port0.resize_listeners.append(lambda c, r: sizes.append((c, r)))
    await be.resize(132, 43)
    await until(lambda: port0.size == (132, 43))
    assert sizes == [(132, 43)]
    assert (con.control_errors, be.control_errors) == (0, 0)


@pytest.mark.asyncio
async def test_without_multiport(rig: Rig) -> None:
    be = ConsoleBackend(cols=90, rows=20)
    con = await _boot(rig, be, SinglePortConsole)
    assert not con.multiport
    assert not be.multiport_active
    assert rig.bus is not None
    (dev,) = rig.bus.devices()
    assert dev["features"] & ConsoleFeature.MULTIPORT == 0
    assert dev["features"] & ConsoleFeature.SIZE
    assert list(con.ports) == [0]
    assert con.port("hvc0").size == (90, 20)
    with pytest.raises(LocalProtocolError):
        con.port(AGENT_PORT)
    with pytest.raises(LocalProtocolError):
        con.send_control_raw(b"x" * 8)
    await con.write(b"legacy\n")
    assert b"legacy" in be.output()
    await be.write(b"in")
    async with asyncio.timeout(5):
        assert await con.read() == b"in"
    # RESIZE without a control queue: the config space and a config change
    await be.resize(120, 50)
    await until(lambda: con.port(0).size == (120, 50))
    # the host agent is there but nobody will ever open the port: a clear timeout
    assert be.agent is not None
    with pytest.raises(MicTimeoutError, match="did not open its port"):
        await be.agent.ping(timeout=0.3)


@pytest.mark.asyncio
async def test_control_garbage_both_ways(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    be = ConsoleBackend()
    con = await _boot(rig, be)
    async with asyncio.timeout(5):
        port0 = await con.console_port()
    await until(lambda: port0.console)
    # card -> host: short, unknown port, a device-only event, too long
    for raw in (b"\x01", (9).to_bytes(4, "little") + b"\x06\x00\x01\x00",
                b"\0\0\0\0\x04\x00\x01\x00", bytes(40)):  # fmt: skip
        con.send_control_raw(raw)
    # host -> card: short, unknown port, a driver-only event, bad name
    for raw in (b"\x02", (9).to_bytes(4, "little") + b"\x06\x00\x01\x00",
                b"\0\0\0\0\x00\x00\x01\x00", b"\x01\0\0\0\x07\x00\x01\x00\x01\x02"):  # fmt: skip
        be._send_raw(raw)
    await until(lambda: be.control_errors >= 4 and con.control_errors >= 4)
    assert "rejected control message from the card" in caplog.text
    assert "rejected control message from the host" in caplog.text
    # both sides carry on
    await con.write(b"still here\n")
    assert b"still here" in be.output()
    await be.resize(70, 20)
    await until(lambda: port0.size == (70, 20))
    assert con.port(AGENT_PORT).id == 1


@pytest.mark.asyncio
async def test_agent_over_the_port(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    be = ConsoleBackend()
    con = await _boot(rig, be)
    async with asyncio.timeout(5):
        port = await con.wait_port(AGENT_PORT)
    agent = Agent(None, port, CardFS(None))
    host = be.agent
    assert host is not None
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(agent.run())
        assert (await host.ping(timeout=5))["pong"] is True
        r = await host.exec(["echo", "hi", "there"], timeout=5)
        assert (r["status"], base64.b64decode(r["stdout"])) == (0, b"hi there\n")
        r = await host.exec(line="echo one > /tmp/f; cat /tmp/f", timeout=5)
        assert (r["status"], base64.b64decode(r["stdout"])) == (0, b"one\n")
        r = await host.exec(line="sleep 9 &", timeout=5)
        assert r["status"] == 2  # '&' is not supported: a syntax error, not a crash
        r = await host.exec(line="echo 'a b' > /tmp/f", timeout=5)
        r = await host.exec(["cat", "/tmp/f"], timeout=5)
        assert base64.b64decode(r["stdout"]) == b"a b\n"
        r = await host.exec(["sleep", "5"], timeout=0.2)
        assert (r["status"], r["timed_out"]) == (124, True)
        assert b"timed out" in base64.b64decode(r["stderr"])
        # output over the bound stops the command, as a closed pipe would (141)
        r = await host.exec(["cat", "/dev/zero"], timeout=5, max_output=1000)
        assert (r["status"], r["truncated"]) == (141, True)
        assert base64.b64decode(r["stdout"]) == bytes(1000)
        with pytest.raises(RemoteProtocolError, match="unknown op"):
            await host.request("frobnicate", 5)
        with pytest.raises(RemoteProtocolError, match="argv"):
            await host.request("exec", 5, argv=[1, 2])
        # garbage to the card: answered with errors, logged; the agent carries on
        await be.ports[1].write(b'\xff\xfe garbage\n[]\n{"id": -1}\n' + b"x" * 100 + b"\n")
        # garbage from the card: dropped and logged by the host
        await port.write(b'nonsense\n{"id": 99999, "ok": true, "result": {}}\n')
        assert (await host.ping(timeout=5))["pong"] is True
        assert agent.bad_requests >= 4
        assert host.bad_lines >= 4  # its own garbage, plus the agent's error answers
        task.cancel()
    assert "agent: rejected request" in caplog.text
    assert "agent: rejected a line from the card" in caplog.text
