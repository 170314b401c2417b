"""The bounds on what a card can make the console backend do (issue 14), in one process:
the log limiter, the console log (0600, off the loop, rotated, flow control, a
failing disk), the pty backlog, oversized and large transmit chains, control
chains longer than a driver's message, host -> card control messages the card
never takes.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mic_card.drivers.console import ConsoleDevice
from mic_host.backends.console import MAX_TX_CHAIN, TX_STEP, ConsoleBackend
from mic_host.backends.console_log import ConsoleLog
from mic_host.backends.console_pty import ConsolePty
from mic_host.backends.loglimit import LogLimiter
from tests.integration.helpers import eventually
from tests.vop.rig import Rig
from virtio.console import CONTROL_SIZE, MAX_DRIVER_CONTROL
from virtio.constants import ConsoleEvent, DeviceType

CONSOLE = int(DeviceType.CONSOLE)
MIB = 1 << 20


async def until(check: Callable[[], object], within: float = 5.0) -> None:
    await eventually(check, within=within, what="condition", period=0.01)


async def _boot(rig: Rig, backend: ConsoleBackend) -> ConsoleDevice:
    rig.add(backend)
    bus = await rig.boot(drivers={CONSOLE: ConsoleDevice})
    con = bus.driver("hvc0")
    assert isinstance(con, ConsoleDevice)
    async with asyncio.timeout(5):
        await con.console_port()
    return con


# -- the log limiter ------------------------------------------------------------------


def test_limiter_lets_n_per_second_through_then_summarises(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    now = [100.0]
    lim = LogLimiter(logging.getLogger("t.limit"), "dev0", per_second=3, clock=lambda: now[0])
    passed = [lim.warning("bad %d", i) for i in range(10)]
    assert passed == [True] * 3 + [False] * 7
    assert [r.getMessage() for r in caplog.records] == ["bad 0", "bad 1", "bad 2"]
    now[0] += 1.0  # the next window: the summary first, then the line
    assert lim.warning("bad %d", 10)
    assert [r.getMessage() for r in caplog.records][3:] == [
        "dev0: suppressed 7 similar log lines in 1.0 s",
        "bad 10",
    ]
    for i in range(5):
        lim.warning("more %d", i)
    lim.close()  # a pending summary is written at close
    assert caplog.records[-1].getMessage().startswith("dev0: suppressed 3 similar")
    assert lim.total_suppressed == 10


@pytest.mark.asyncio
async def test_limiter_summary_comes_without_another_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    lim = LogLimiter(logging.getLogger("t.limit2"), "dev1", per_second=1)
    lim.warning("first")
    lim.warning("second")
    await until(lambda: "dev1: suppressed 1 similar log lines" in caplog.text, 3.0)
    lim.close()


# -- the console log ------------------------------------------------------------------


@pytest.mark.asyncio
async def test_log_is_private_written_off_the_loop_and_rotated(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    path.write_bytes(b"old\n")
    path.chmod(0o644)  # left by an older daemon: made private
    lg = ConsoleLog(path, label="c", max_bytes=100_000)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert lg.size == 4
    task = asyncio.create_task(lg.run())
    try:
        line = b"x" * 99 + b"\n"
        for _ in range(2500):  # 250 kB: two rotations
            lg.append(line)
        await lg.flush()
        assert lg.rotations == 2
        assert path.stat().st_size <= 100_000
        rotated = path.with_name("c.log.1")
        assert rotated.stat().st_size == 100_000
        assert stat.S_IMODE(rotated.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert (lg.written, lg.dropped) == (250_000, 0)
        tail = path.read_bytes()  # what came after the second rotation, in order
        assert len(tail) == 250_000 + 4 - 200_000
        assert tail == (line * 501)[-len(tail) :]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    lg.append(b"after the task\n")
    await lg.aclose()
    assert path.read_bytes().endswith(b"after the task\n")
    lg.append(b"ignored once closed")
    await lg.aclose()


@pytest.mark.asyncio
async def test_log_holds_the_writer_back_past_max_pending(tmp_path: Path) -> None:
    lg = ConsoleLog(tmp_path / "c.log", label="c", max_pending=1000)
    lg.append(b"y" * 1500)
    waiter = asyncio.create_task(lg.room())
    await asyncio.sleep(0.05)
    assert not waiter.done()  # nothing writes yet: the producer waits
    task = asyncio.create_task(lg.run())
    async with asyncio.timeout(5):
        await waiter
    await lg.flush()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await lg.aclose()
    assert (tmp_path / "c.log").read_bytes() == b"y" * 1500


@pytest.mark.asyncio
async def test_log_write_failure_drops_and_logs_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    lg = ConsoleLog(tmp_path / "c.log", label="c")
    real = lg._file

    class Full:
        async def write(self, data: Any) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        async def close(self) -> None:
            pass

    lg._file = Full()
    for _ in range(5):
        lg.append(b"lost\n")
        await lg.flush()
    assert lg.dropped == 25
    assert caplog.text.count("console log write failed") == 1
    lg._file = real
    lg.append(b"kept\n")
    await lg.flush()
    assert "console log writes work again (25 bytes were dropped so far)" in caplog.text
    await lg.aclose()
    assert (tmp_path / "c.log").read_bytes() == b"kept\n"


# -- the pty ----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_pty_backlog_stays_bounded_when_nobody_reads() -> None:
    pty = ConsolePty("t", max_backlog=16 * 1024)
    try:
        # console-sized writes, the loop running between them: once the slave's
        # buffer is full the master waits for writability that never comes
        for _ in range(3000):  # 12 MiB, nobody attached to the slave
            pty.write(b"z" * 4096)
            assert len(pty._backlog) <= 16 * 1024 + 4096
            await asyncio.sleep(0)
        assert pty.dropped > 6 * MIB
    finally:
        pty.close()


# -- chains ---------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_oversized_transmit_chain_is_returned_unread(
    rig: Rig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    be = ConsoleBackend(log_path=tmp_path / "c.log")
    con = await _boot(rig, be)
    tx = con.port(0).tx
    seg = 2 * MIB  # overlapping buffers: a 32 MiB chain in 4 MiB of card RAM
    async with asyncio.timeout(5):
        used = await tx.submit_nowait([(0, seg)] * 16, [])
    assert used == 0
    assert be.ports[0].oversized == 1
    assert be.ports[0].bytes_from_card == 0
    assert be.stats()["oversized_chains"] == 1
    assert f"transmit chain of {32 * MIB} bytes over the {MAX_TX_CHAIN}-byte limit" in caplog.text
    # the console carries on
    await con.write(b"after\n")
    await be.flush_log()
    assert (tmp_path / "c.log").read_bytes() == b"after\n"
    await be.aclose()


@pytest.mark.asyncio
async def test_large_chain_is_handed_on_in_pieces_with_the_loop_running(rig: Rig) -> None:
    be = ConsoleBackend(max_chain=4 * MIB)
    con = await _boot(rig, be)
    pieces: list[int] = []
    ticks = 0
    be.ports[0].on_output = lambda data: pieces.append(len(data))

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    mem = rig.mem.card.raw()
    pattern = bytes(range(256)) * 4096  # 1 MiB
    mem[MIB : 2 * MIB] = pattern
    t = asyncio.create_task(ticker())
    try:
        async with asyncio.timeout(5):
            used = await con.port(0).tx.submit_nowait([(MIB, MIB)] * 3, [])
    finally:
        t.cancel()
    assert used == 0
    assert sum(pieces) == 3 * MIB
    assert max(pieces) == TX_STEP
    assert len(pieces) == 3 * MIB // TX_STEP
    assert ticks >= len(pieces) - 1  # the loop ran between the pieces
    await be.aclose()


@pytest.mark.asyncio
async def test_long_control_chain_is_rejected_unread(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    be = ConsoleBackend()
    con = await _boot(rig, be)
    before = be.control_errors
    async with asyncio.timeout(5):
        used = await con._ctrl_tx.submit_nowait([(0, 2 * MIB)] * 8, [])
    assert used == 0
    assert be.control_errors == before + 1
    assert f"buffer of {16 * MIB} bytes, a driver's message is {CONTROL_SIZE}" in caplog.text
    assert MAX_DRIVER_CONTROL == CONTROL_SIZE == 8
    await be.aclose()


def test_control_messages_the_card_never_takes_are_capped() -> None:
    be = ConsoleBackend()
    for _ in range(1000):  # DEVICE_READY after DEVICE_READY, no buffers posted
        be._send(0, ConsoleEvent.DEVICE_ADD, 1)
    assert len(be._ctrl_out) == 256
    assert be.control_dropped == 744


def test_bad_log_path_is_a_config_error(tmp_path: Path) -> None:
    from virtio.errors import ConfigError

    with pytest.raises(ConfigError, match="cannot open log"):
        ConsoleBackend(log_path=tmp_path / "no" / "such" / "dir.log")
    assert not os.path.exists(tmp_path / "no")
