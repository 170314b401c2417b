"""A daemon started with mic_host.launch() belongs to its launcher: if the
launcher dies without closing it (a killed script or test runner), the daemon
shuts its cards down and exits instead of lingering."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import textwrap
from pathlib import Path

import pytest

from tests.integration.helpers import alive, eventually

LAUNCHER = textwrap.dedent(
    """
    import asyncio, json, sys
    import mic_host

    async def main(state_dir):
        async with mic_host.launch(state_dir=state_dir) as client:
            card = client.card("mic0")
            await card.wait("online", timeout=30)
            ping, st = await client.ping(), await card.status()
            print(json.dumps({"daemon": ping["pid"], "card": st["pid"]}), flush=True)
            await asyncio.sleep(3600)

    asyncio.run(main(sys.argv[1]))
    """
)


@pytest.mark.asyncio
async def test_daemon_exits_when_its_launcher_is_killed(state_dir: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", LAUNCHER, str(state_dir),
        stdout=asyncio.subprocess.PIPE, cwd=os.getcwd(),
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        pids = json.loads(line)
        assert alive(pids["daemon"])
        assert alive(pids["card"])
        os.kill(proc.pid, signal.SIGKILL)
        await proc.wait()
        await eventually(lambda: not alive(pids["daemon"]), within=15, what="daemon exits")
        await eventually(lambda: not alive(pids["card"]), within=5, what="card OS exits")
        assert "parent process" in (state_dir / "mic-host.log").read_text()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
