"""Rate-limited logging: what a peer can make us write is bounded.

A hostile or buggy peer (a card on its control link, in its rings) must not
be able to grow a log without bound. A :class:`LogBudget` allows at most
``lines`` log lines per ``period`` seconds for one source (a card); the
lines over that are counted, not written, and when the window ends one
summary line says how many were suppressed. Every logger a source writes
through (:meth:`LogBudget.logger`) shares the one budget.

Sans-IO: the clock is a parameter (``clock``, e.g. ``time.monotonic``), so
tests drive time by hand. The summary is written on the first line after the
window ended, or by :meth:`LogBudget.flush` (the owner calls it from a timer
it already has, and once more with ``final=True`` when the source goes away).

Imports only ``logging`` (never the clock, asyncio or the OS).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["DEFAULT_LINES", "DEFAULT_PERIOD", "LimitedLogger", "LogBudget"]

#: lines per window a source may write by default
DEFAULT_LINES = 10
#: the window, in seconds
DEFAULT_PERIOD = 1.0


class LogBudget:
    """At most ``lines`` log lines per ``period`` seconds for ``source``.

    ``summary`` is the logger the "suppressed N" lines go to.
    """

    def __init__(
        self,
        source: str,
        summary: logging.Logger,
        clock: Callable[[], float],
        *,
        lines: int = DEFAULT_LINES,
        period: float = DEFAULT_PERIOD,
    ) -> None:
        if lines < 1 or period <= 0:
            raise ValueError(f"a log budget needs lines >= 1 and period > 0 ({lines}, {period})")
        self.source = source
        self.lines = lines
        self.period = period
        self._summary = summary
        self._clock = clock
        self._start: float | None = None
        self._used = 0
        self._suppressed = 0
        self._level = logging.NOTSET
        #: lines suppressed over the budget's life
        self.suppressed_total = 0

    def allow(self, level: int) -> bool:
        """Whether a line of ``level`` may be written now (counted either way)."""
        now = self._clock()
        if self._start is None or now - self._start >= self.period:
            self._close_window(now)
            self._start = now
        if self._used < self.lines:
            self._used += 1
            return True
        self._suppressed += 1
        self.suppressed_total += 1
        self._level = max(self._level, level)
        return False

    def flush(self, *, final: bool = False) -> None:
        """Write the summary of a window that has ended (any window if ``final``)."""
        now = self._clock()
        if self._start is not None and (final or now - self._start >= self.period):
            self._close_window(now)
            self._start = None

    def _close_window(self, now: float) -> None:
        if self._suppressed:
            span = now - self._start if self._start is not None else 0.0
            self._summary.log(
                self._level,
                "%s: suppressed %d similar log lines in %.1f s",
                self.source,
                self._suppressed,
                span,
            )
        self._used = 0
        self._suppressed = 0
        self._level = logging.NOTSET

    def logger(self, logger: logging.Logger) -> LimitedLogger:
        """``logger`` with this budget in front of it."""
        return LimitedLogger(logger, self)


class LimitedLogger:
    """The part of :class:`logging.Logger` the callers use, through a :class:`LogBudget`."""

    __slots__ = ("budget", "logger")

    def __init__(self, logger: logging.Logger, budget: LogBudget) -> None:
        self.logger = logger
        self.budget = budget

    def log(self, level: int, msg: str, *args: object, **kwargs: Any) -> None:
        if self.logger.isEnabledFor(level) and self.budget.allow(level):
            kwargs.setdefault("stacklevel", 2)
            self.logger.log(level, msg, *args, **kwargs)

    def debug(self, msg: str, *args: object, **kwargs: Any) -> None:
        self.log(logging.DEBUG, msg, *args, **_up(kwargs))

    def info(self, msg: str, *args: object, **kwargs: Any) -> None:
        self.log(logging.INFO, msg, *args, **_up(kwargs))

    def warning(self, msg: str, *args: object, **kwargs: Any) -> None:
        self.log(logging.WARNING, msg, *args, **_up(kwargs))

    def error(self, msg: str, *args: object, **kwargs: Any) -> None:
        self.log(logging.ERROR, msg, *args, **_up(kwargs))

    def exception(self, msg: str, *args: object, **kwargs: Any) -> None:
        kwargs.setdefault("exc_info", True)
        self.log(logging.ERROR, msg, *args, **_up(kwargs))


def _up(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Report the caller of ``warning()``, not this module, as the line's origin."""
    return {"stacklevel": 3, **kwargs}
