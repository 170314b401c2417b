"""Helpers of the integration tests: small configs (16 MiB card RAM, 1 MiB disks;
the TOML is written by :mod:`bench.config`, the benches' config writer), a launched
daemon, ``micctl``/``mic-host`` as subprocesses, processes in ``/proc``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import mic_host
from bench import config as bench_config
from mic_host.client import CardClient, Client

REPO = Path(__file__).resolve().parents[2]
APPS = "tests.integration.apps"

#: Heartbeat settings for most cards: fast enough to notice, loose enough for 2 busy cores.
HEARTBEAT = {"heartbeat_interval": 0.25, "heartbeat_timeout": 3.0}


def app(fn: str) -> str:
    """``module:function`` of a card app in :mod:`tests.integration.apps`."""
    return f"{APPS}:{fn}"


def block_toml(image: str, *, size: str = "1M", name: str | None = None, **options: Any) -> str:
    """One ``[[cards.devices]]`` block device table (``create = true``); ``options``
    are more block options (``num_queues``...)."""
    return bench_config.block(image, name=name, size=size, create=True, **options)


def card_toml(
    name: str = "mic0",
    *,
    console: bool = True,
    disk: str | None = "{state_dir}/{card}.img",
    **keys: Any,
) -> str:
    """One ``[[cards]]`` table: small RAM, fast heartbeat, a console and a 1 MiB disk
    (``vda``) unless told otherwise; ``keys`` are more card keys (``boot_timeout``...).
    """
    # boot_at_start None: left out (the daemon's default, not booted) unless a key sets it
    settings: dict[str, Any] = {"boot_at_start": None, "card_ram": "16M", "host_ram": "4M"}
    settings |= HEARTBEAT | keys
    devices = [bench_config.device("console")] if console else []
    if disk is not None:
        devices.append(block_toml(disk, name="disk"))
    return bench_config.card(*devices, name=name, **settings)


def config(*cards: str) -> str:
    """A whole config from :func:`card_toml` tables (default: one ``mic0``)."""
    return "version = 1\n\n" + "\n".join(cards or (card_toml(),))


# -- state directories and daemons ----------------------------------------------------


@contextlib.asynccontextmanager
async def daemon(state_dir: Path, cfg: str | None = None) -> AsyncIterator[Client]:
    """A ``mic-host`` launched for ``state_dir`` with TOML text ``cfg``; stopped after."""
    async with mic_host.launch(state_dir, cfg if cfg is not None else config()) as client:
        yield client


async def booted(client: Client, name: str = "mic0") -> CardClient:
    """Boot ``name`` and wait until it is online."""
    card = client.card(name)
    await card.boot(wait=True, timeout=30)
    return card


# -- subprocesses ---------------------------------------------------------------------


@dataclass
class Done:
    """How a command ended."""

    rc: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


async def command(*argv: str, timeout: float = 30.0) -> Done:
    """Run ``argv`` from the repository root; its exit status and output (bounded)."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.communicate()
        raise
    assert proc.returncode is not None
    return Done(proc.returncode, out.decode(), err.decode())


async def micctl(state_dir: Path, *args: str, timeout: float = 30.0) -> Done:
    """``micctl --state-dir STATE_DIR ARGS...`` as a separate process."""
    return await command(
        sys.executable, "-m", "mic_host.micctl", "--state-dir", str(state_dir), *args,
        timeout=timeout,
    )  # fmt: skip


async def mic_host_cmd(*args: str, timeout: float = 30.0) -> Done:
    """``mic-host ARGS...`` as a separate process (for runs that must fail)."""
    return await command(sys.executable, "-m", "mic_host.daemon", *args, timeout=timeout)


# -- processes ------------------------------------------------------------------------


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, process group) of ``pid``, or None if there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[2])


def alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie."""
    st = _stat(pid)
    return st is not None and st[0] not in "ZX"


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid``."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None and st[1] == pgid and st[0] not in "ZX":
                out.append(int(entry))
    return out


async def eventually(check: Any, *, within: float, what: str, period: float = 0.05) -> Any:
    """Poll ``check()`` (sync or async) until it is truthy; fail after ``within`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if loop.time() > deadline:
            pytest.fail(f"not within {within}s: {what}")
        await asyncio.sleep(period)
