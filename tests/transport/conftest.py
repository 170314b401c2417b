"""Fixtures: a short socket path, and a host with a real card process attached."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from transport import MessageLink, PcieConfig, PcieHost

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def sock_path() -> Iterator[str]:
    # AF_UNIX paths are limited to 108 bytes: pytest's tmp_path can be longer
    d = tempfile.mkdtemp(prefix="micvop-")
    try:
        yield os.path.join(d, "mic0.sock")
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def spawn(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.transport.card_proc", *args, cwd=REPO
    )


async def reap(proc: asyncio.subprocess.Process, grace: float = 10.0) -> int:
    """Wait for the process (kill it if it does not exit within ``grace`` seconds)."""
    try:
        async with asyncio.timeout(grace):
            return await proc.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        return await proc.wait()


@dataclass
class Pair:
    host: PcieHost
    link: MessageLink
    proc: asyncio.subprocess.Process

    async def call(self, **msg: Any) -> dict[str, Any]:
        await self.link.send(msg)
        async with asyncio.timeout(30):
            return await self.link.recv()


@contextlib.asynccontextmanager
async def card_pair(path: str, **host_kw: Any) -> AsyncIterator[Pair]:
    host_kw.setdefault("config", PcieConfig(card_ram_size=16 << 20, host_ram_size=16 << 20))
    async with PcieHost(path, **host_kw) as host:
        proc = await spawn(path)
        try:
            async with asyncio.timeout(30):
                link = await host.accept()
            pair = Pair(host, link, proc)
            yield pair
            if not link.lost:
                with contextlib.suppress(Exception):
                    await pair.call(op="exit")
        finally:
            await reap(proc)
