"""The daemon's recent log lines about each card (``micctl logs CARD --host``), and error events.

The daemon logs to stderr and ``STATE_DIR/mic-host.log``, one stream for every
card. :class:`HostLog` is a :class:`logging.Handler` on the root logger that
also keeps, per card, a bounded ring of the last :data:`KEEP` lines about that
card and hands new ones to followers (``logs --follow``) through bounded
:class:`~mic_host.events.Feed` s (a slow follower loses the oldest lines and
is told how many). A record is about a card when the task that logged it
works for that card (:data:`mic_host.events.CURRENT_CARD`: a control request
for it, or any task of its boot), or else when its message starts with
``"<card>:"`` (the daemon's own convention). Records at ERROR and above about
a card are also published as ``error`` events on the daemon's bus.

What a card can make the daemon log is already rate-limited upstream
(:class:`virtio.ratelimit.LogBudget`); the rings bound memory whatever gets here.

Daemon side (beside :mod:`mic_host.daemon`); imports :mod:`mic_host.events` only.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Collection, Iterator
from contextlib import contextmanager

from mic_host.events import CURRENT_CARD, MAX_MESSAGE, Event, EventBus, Feed

__all__ = ["KEEP", "MAX_LINE", "HostLog"]

#: Lines kept per card, and the length a kept line is cut to.
KEEP = 1000
MAX_LINE = 4096
_FMT = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")


class HostLog(logging.Handler):
    """Per-card rings of log lines (as ``log`` events), followers, error events."""

    def __init__(self, cards: Collection[str], *, events: EventBus, keep: int = KEEP) -> None:
        super().__init__(logging.DEBUG)
        self._rings: dict[str, deque[Event]] = {c: deque(maxlen=keep) for c in cards}
        self._fanout = EventBus()
        self._events = events
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()

    def _card_of(self, record: logging.LogRecord, message: str) -> str | None:
        card = CURRENT_CARD.get()
        if card in self._rings:
            return card
        head = message.partition(":")[0]
        return head if head in self._rings else None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            card = self._card_of(record, message)
            if card is None:
                return
            line = _FMT.format(record)[:MAX_LINE]
            if threading.get_ident() == self._thread:
                self._deliver(card, record, line, message)
            else:  # a worker thread: the feeds belong to the loop
                self._loop.call_soon_threadsafe(self._deliver, card, record, line, message)
        except Exception:  # a log handler must never raise into the caller
            self.handleError(record)

    def _deliver(self, card: str, record: logging.LogRecord, line: str, message: str) -> None:
        ev = self._fanout.publish(
            "log", card, level=record.levelname, logger=record.name, line=line
        )
        self._rings[card].append(ev)
        if record.levelno >= logging.ERROR:
            self._events.publish("error", card, logger=record.name, message=message[:MAX_MESSAGE])

    def recent(self, card: str, lines: int) -> list[Event]:
        """The last ``lines`` lines about ``card`` (oldest first)."""
        ring = self._rings.get(card)
        if ring is None or lines <= 0:
            return []
        return list(ring)[-lines:]

    @contextmanager
    def follow(self, card: str, maxlen: int) -> Iterator[Feed]:
        """New lines about ``card`` as they are logged."""
        with self._fanout.subscribe(card=card, maxlen=maxlen) as feed:
            yield feed

    @contextmanager
    def installed(self) -> Iterator[HostLog]:
        """On the root logger for the ``with`` block."""
        root = logging.getLogger()
        root.addHandler(self)
        try:
            yield self
        finally:
            root.removeHandler(self)
