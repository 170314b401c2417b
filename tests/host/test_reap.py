"""Stopping a child that has just exited on its own reports its real status.

``proc.kill()`` (``Popen.send_signal``) polls before it signals, which reaps an
exited child behind asyncio's child watcher: the watcher then logs "Unknown
child process pid N, will report returncode 255" (what ``bench/net.py`` printed
at the end of every run, its iperf3 server exiting after ``-1``). The daemon's
``stop_card_os`` and the bench's ``stop`` signal with ``os.kill`` instead.
"""

from __future__ import annotations

import asyncio
import logging
import os
import warnings
from collections.abc import Awaitable, Callable, Iterator

import pytest

from bench.net import stop
from mic_host.card.process import stop_card_os

Stopper = Callable[[asyncio.subprocess.Process], Awaitable[None]]


@pytest.fixture
def pidfd_watcher() -> Iterator[None]:
    """Reap children from the event loop (pidfd, Python 3.12's default watcher), not
    from a thread: a child that has exited stays a zombie until the loop runs, so the
    race of the threaded watcher is turned into a certainty."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the watcher API, 3.12+
        policy = asyncio.get_event_loop_policy()
        old = asyncio.get_child_watcher()
        policy.set_child_watcher(asyncio.PidfdChildWatcher())
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            policy.set_child_watcher(old)


@pytest.mark.asyncio
@pytest.mark.usefixtures("pidfd_watcher")
@pytest.mark.parametrize("stopper", [stop_card_os, stop], ids=["stop_card_os", "bench.net.stop"])
async def test_stopping_an_exited_child_keeps_its_status(
    stopper: Stopper, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="asyncio")
    for _ in range(3):
        # It exits when told, with no loop iteration between that and our stop: the
        # watcher cannot have reaped it (the pipe write is a plain write(2) here).
        proc = await asyncio.create_subprocess_exec(
            "sh", "-c", "read x; exit 7", stdin=asyncio.subprocess.PIPE
        )
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        # Blocking on purpose: no loop iteration (the watcher would reap it).
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # noqa: ASYNC222
        await stopper(proc)
        assert proc.returncode == 7
    assert "Unknown child process" not in caplog.text
