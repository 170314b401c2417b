"""Which event loop ``mic-host`` and ``mic-card`` run on (``MIC_EVENT_LOOP``).

Owns :func:`run`, the entry point both processes call. Must not import
anything above ``transport``.

- ``spin`` (the default): :mod:`transport.spinloop`, the stdlib loop with a
  selector that polls briefly before it sleeps;
- ``asyncio``: the plain stdlib loop (``asyncio.run``);
- ``uvloop``: uvloop's libuv loop (``pip install "mic-vop[uvloop]"``). It cannot
  poll before it sleeps the way the spin loop does (libuv blocks in
  ``epoll_wait`` with the timeout it computes), so it trades the spin for a
  faster loop iteration. If uvloop is not installed, the spin loop runs and a
  warning says so.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

from transport import spinloop

__all__ = ["ENV", "LOOPS", "loop_name", "run", "unavailable"]

log = logging.getLogger(__name__)
T = TypeVar("T")
ENV = "MIC_EVENT_LOOP"
LOOPS = ("spin", "asyncio", "uvloop")


def loop_name() -> str:
    """The loop ``MIC_EVENT_LOOP`` asks for (``spin`` when unset or unknown)."""
    name = os.environ.get(ENV, "spin").strip().lower() or "spin"
    if name not in LOOPS:
        log.warning("%s=%r is not one of %s: using the spin loop", ENV, name, ", ".join(LOOPS))
        return "spin"
    return name


def unavailable(name: str) -> str | None:
    """Why loop ``name`` cannot run here, or None if it can."""
    if name not in LOOPS:
        return f"unknown event loop {name!r} (one of {', '.join(LOOPS)})"
    if name == "uvloop":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            return 'uvloop is not installed (pip install "mic-vop[uvloop]")'
    return None


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on the loop :func:`loop_name` picks."""
    name = loop_name()
    if name == "uvloop":
        try:
            import uvloop
        except ImportError:
            log.warning("%s=uvloop: %s; using the spin loop", ENV, unavailable("uvloop"))
        else:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                return runner.run(main)
    if name == "asyncio":
        return asyncio.run(main)
    return spinloop.run(main)
