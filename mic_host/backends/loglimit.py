"""A bound on the daemon-log lines one device's peer can cause.

Owns :class:`LogLimiter`: at most ``per_second`` lines per one-second window
for one device, the rest counted and reported as one ``... N more lines
suppressed`` summary when the window ends (a timer on the running loop, so the
summary comes even if the flood stops). A backend gives every line the card
can trigger (a rejected control message, an oversized chain...) to its
limiter, so a card that repeats a mistake a million times costs the daemon's
log a few lines per second, not a million.

Imports only the standard library; must not import ``transport`` or ``mic_card``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

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
        self.label = label
        self.per_second = per_second
        self._clock = clock
        self._window = -1.0e9
        self._count = 0
        self._suppressed = 0
        self._timer: asyncio.TimerHandle | None = None
        self.total_suppressed = 0

    def log(self, level: int, msg: str, *args: object) -> bool:
        """Log ``msg % args`` at ``level`` if this second's budget allows; False if suppressed."""
        now = self._clock()
        if now - self._window >= 1.0:
            self._summary()
            self._window = now
            self._count = 0
        if self._count < self.per_second:
            self._count += 1
            self.logger.log(level, msg, *args)
            return True
        self._suppressed += 1
        self.total_suppressed += 1
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (a unit test): the next line or close() reports it
                return False
            delay = max(0.0, self._window + 1.0 - now)
            self._timer = loop.call_later(delay, self._summary)
        return False

    def warning(self, msg: str, *args: object) -> bool:
        return self.log(logging.WARNING, msg, *args)

    def _summary(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._suppressed:
            self.logger.warning(
                "%s: %d more lines like the above suppressed (over %d per second)",
                self.label, self._suppressed, self.per_second,
            )  # fmt: skip
            self._suppressed = 0

    def close(self) -> None:
        """Report what is still suppressed and stop the timer."""
        self._summary()
