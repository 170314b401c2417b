"""A bound on the daemon-log lines one device's peer can cause: the asyncio side.

The counting rules are :class:`virtio.ratelimit.LogBudget`'s (sans-IO, shared
with the link and VOP): at most ``per_second`` lines per one-second window,
the rest counted and reported as one "suppressed N" summary line.
:class:`LogLimiter` adds what a sans-IO budget cannot do: a timer on the
running loop, so the summary is written even if the flood stops. A backend
gives every line the card can trigger (a rejected control message, an
oversized chain...) to its limiter, so a card that repeats a mistake a
million times costs the daemon's log a few lines per second.

Imports only the standard library and ``virtio.ratelimit``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from virtio.ratelimit import LogBudget

__all__ = ["LogLimiter"]


class LogLimiter:
    """At most ``per_second`` lines per second through ``logger``, then a summary.

    ``label`` starts the summary line (the device's name). ``clock`` is for
    tests. Call :meth:`close` when the device goes: it cancels the summary
    timer and writes a pending summary now.
    """

    def __init__(
        self,
        logger: logging.Logger,
        label: str,
        *,
        per_second: int = 5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self._budget = LogBudget(label, logger, clock, lines=per_second, period=1.0)
        self._timer: asyncio.TimerHandle | None = None

    @property
    def total_suppressed(self) -> int:
        """Lines suppressed over the limiter's life."""
        return self._budget.suppressed_total

    def log(self, level: int, msg: str, *args: object) -> bool:
        """Log ``msg % args`` at ``level`` if this second's budget allows; False if suppressed."""
        if self._budget.allow(level):
            self.logger.log(level, msg, *args)
            return True
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (a unit test): the next line or close() reports it
                return False
            self._timer = loop.call_later(self._budget.period, self._flush)
        return False

    def warning(self, msg: str, *args: object) -> bool:
        return self.log(logging.WARNING, msg, *args)

    def _flush(self) -> None:
        self._timer = None
        self._budget.flush()  # writes the summary once the window has ended

    def close(self) -> None:
        """Report what is still suppressed and stop the timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._budget.flush(final=True)
