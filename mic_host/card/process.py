"""The card OS child process: how the daemon starts one and how it makes sure it is gone.

``mic-card`` runs in its own session (process group) with its output in the
card's log (``STATE_DIR/CARD-card.log``); stopping it kills the whole group,
so what a ``card_command`` wrapper (or the card) started does not outlive
the boot. The child gets its control link as an inherited fd (the card end
of the boot's socket pair, ``--link-fd``), so a ``card_command`` wrapper
must pass open fds on (``env``, ``strace``, ``sh -c`` do; ``sudo`` closes them).

Imports only ``mic_host.config`` and ``mic_host.paths``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

from mic_host.config import CardConfig
from mic_host.paths import card_log_path

__all__ = ["spawn_card_os", "stop_card_os"]


async def spawn_card_os(
    cfg: CardConfig, *, state_dir: Path, link_fd: int
) -> asyncio.subprocess.Process:
    """Start ``mic-card`` for card ``cfg.name`` with its control link on ``link_fd``
    (inherited by the child only).

    Raises:
        OSError: the process could not be started.
    """
    logf = card_log_path(state_dir, cfg.name, "card")
    env = dict(os.environ)
    # The card OS runs in the daemon's environment: what an app imports from the
    # installed environment resolves as in the daemon (the app's own code comes
    # with each run, mic_card/apps.py).
    paths = [os.getcwd(), *[p for p in sys.path if p]]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    with logf.open("ab") as out:
        return await asyncio.create_subprocess_exec(
            *cfg.card_command,
            sys.executable,
            "-m",
            "mic_card",
            "--link-fd",
            str(link_fd),
            "--card",
            cfg.name,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env=env,
            start_new_session=True,
            pass_fds=(link_fd,),
        )


async def stop_card_os(proc: asyncio.subprocess.Process) -> None:
    """Kill the card OS and its process group (if still there), then reap it."""
    if proc.returncode is None:
        # os.kill, not proc.kill(): Popen.send_signal polls first and would reap
        # a card that has just exited behind the child watcher, which then logs
        # "Unknown child process" and reports 255 instead of its real status.
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        await proc.wait()
