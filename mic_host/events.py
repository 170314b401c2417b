"""The daemon's event stream (as QEMU's QMP events): what happened, to which card, when.

Owns the vocabulary both sides share and the daemon's fan-out:

- :class:`Event`: one frozen value; on the wire (``micctl events --json``,
  ``client.events()``) it is a QMP-shaped object::

      {"event": "online", "card": "mic0", "data": {"from": "booting", ...},
       "timestamp": {"seconds": 1764860000, "microseconds": 123456},
       "time": "2026-12-04T15:00:00.123456+00:00", "monotonic": 5123.4, "seq": 17}

  ``timestamp`` is QMP's wall clock; ``time`` the same in ISO 8601 (UTC);
  ``monotonic`` the daemon's ``time.monotonic()`` (for intervals: the wall
  clock may jump); ``seq`` counts the daemon's events from 1 (a gap means
  events were dropped for this subscriber, which then gets ``events_lost``).
- :data:`KINDS`: every event name and its category (``state``, ``device``,
  ``net``, ``app``, ``error``, ``stream``); a subscriber filters by either.
- :class:`Feed`: one subscriber's bounded queue. A slow subscriber never
  stalls the daemon nor grows its memory: past ``maxlen`` the oldest event is
  dropped and counted, and the subscriber's next read is one ``events_lost``
  event (``data.count``) before what was kept, as QMP's event throttling and
  journald's rate limit report what they dropped.
- :class:`EventBus`: :meth:`EventBus.publish` (synchronous, never blocks,
  never raises) hands an event to every matching feed.
- :func:`emit`: publish from anywhere in the daemon without a reference to
  the bus (VOP devices, net backends). The daemon installs its bus for its
  lifetime (:func:`installed`; one daemon per process); with none installed
  :func:`emit` does nothing, so unit tests of those layers need no bus. The
  card an event belongs to is the ``card=`` argument or else the card whose
  request or boot the calling task serves (:data:`CURRENT_CARD`, a context
  variable the daemon sets per request and that every task a boot starts
  inherits).

Standard library only: the client side imports it too (for :class:`Event`
and :data:`KINDS`), the daemon side for the bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime
import itertools
import time
from collections import deque
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CATEGORIES",
    "CURRENT_CARD",
    "DEFAULT_FEED",
    "KINDS",
    "MAX_FEED",
    "Event",
    "EventBus",
    "Feed",
    "card_context",
    "emit",
    "installed",
]

#: event name -> category. Card states (:class:`mic_host.lifecycle.CardState`)
#: are events of category ``state`` under their own name.
KINDS: dict[str, str] = {
    **dict.fromkeys(
        ("booting", "online", "shutting_down", "ready", "resetting", "reset_failed", "crashed"),
        "state",
    ),
    "device_added": "device",
    "device_removed": "device",
    "device_needs_reset": "device",
    "link_up": "net",
    "link_down": "net",
    "app_started": "app",
    "app_ended": "app",
    "error": "error",
    "events_lost": "stream",
}
CATEGORIES = frozenset(KINDS.values())

#: Events a subscriber may have waiting by default, and at most.
DEFAULT_FEED = 256
MAX_FEED = 4096
#: An error event's message is cut here (it comes from a log line a card may provoke).
MAX_MESSAGE = 1000

#: The card the current task works for (set per control request, inherited by a boot's tasks).
CURRENT_CARD: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "mic_current_card", default=None
)


@dataclass(frozen=True, slots=True)
class Event:
    """One event. ``wall`` is epoch seconds, ``mono`` the daemon's monotonic clock."""

    kind: str
    card: str | None
    data: Mapping[str, Any] = field(default_factory=dict)
    wall: float = 0.0
    mono: float = 0.0
    seq: int = 0

    @property
    def category(self) -> str:
        return KINDS.get(self.kind, self.kind)

    def to_wire(self) -> dict[str, Any]:
        """The JSON object (module docstring)."""
        secs = int(self.wall)
        return {
            "event": self.kind,
            "card": self.card,
            "data": dict(self.data),
            "timestamp": {"seconds": secs, "microseconds": int((self.wall - secs) * 1e6)},
            "time": datetime.datetime.fromtimestamp(self.wall, datetime.UTC).isoformat(),
            "monotonic": round(self.mono, 6),
            "seq": self.seq,
        }

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> Event:
        """Parse what :meth:`to_wire` made (fields that are missing get defaults).

        Raises:
            ValueError: ``obj`` is not an event object.
        """
        kind, card = obj.get("event"), obj.get("card")
        data, ts = obj.get("data", {}), obj.get("timestamp", {})
        if not isinstance(kind, str) or not isinstance(data, dict) or not isinstance(ts, dict):
            raise ValueError(f"not an event: {obj!r:.200}")
        if card is not None and not isinstance(card, str):
            raise ValueError(f"event card must be a string or null: {card!r:.100}")
        try:
            wall = float(ts.get("seconds", 0)) + float(ts.get("microseconds", 0)) / 1e6
            mono, seq = float(obj.get("monotonic", 0.0)), int(obj.get("seq", 0))
        except (TypeError, ValueError, OverflowError) as e:
            raise ValueError(f"bad event clock or sequence: {e}") from e
        return cls(kind, card, data, wall, mono, seq)

    def describe(self) -> str:
        """One human line: ``2026-12-04T15:00:00.123 mic0 online from=booting ...``."""
        t = datetime.datetime.fromtimestamp(self.wall).isoformat(timespec="milliseconds")
        fields = " ".join(f"{k}={_short(v)}" for k, v in self.data.items() if v not in (None, ""))
        return " ".join(p for p in (t, self.card or "-", self.kind, fields) if p)


def _short(v: object) -> str:
    text = v if isinstance(v, str) else repr(v)
    return repr(text) if any(c.isspace() for c in text) or not text else text


class Feed:
    """One subscriber's queue: at most ``maxlen`` events, the oldest dropped (and counted).

    Filled synchronously by :meth:`EventBus.publish` (:meth:`offer`); read with
    ``await feed.get()``. When events were dropped, the next :meth:`get`
    returns one ``events_lost`` event (``data.count``: how many) first.
    """

    def __init__(
        self,
        *,
        card: str | None = None,
        kinds: Collection[str] | None = None,
        maxlen: int = DEFAULT_FEED,
        clock: Callable[[], tuple[float, float]] | None = None,
    ) -> None:
        if not 1 <= maxlen <= MAX_FEED:
            raise ValueError(f"a feed holds 1 to {MAX_FEED} events, not {maxlen}")
        self.card = card
        self.kinds = frozenset(kinds) if kinds else None
        self.maxlen = maxlen
        self._queue: deque[Event] = deque()
        self._ready = asyncio.Event()
        self._clock = clock or _now
        #: events dropped since the last loss marker, and over the feed's life
        self.lost = 0
        self.lost_total = 0
        self.closed = False

    def wants(self, ev: Event) -> bool:
        if self.card is not None and ev.card not in (self.card, None):
            return False
        return self.kinds is None or ev.kind in self.kinds or ev.category in self.kinds

    def offer(self, ev: Event) -> None:
        """Queue ``ev`` if it matches (never blocks; drops the oldest when full)."""
        if self.closed or not self.wants(ev):
            return
        if len(self._queue) >= self.maxlen:
            self._queue.popleft()
            self.lost += 1
            self.lost_total += 1
        self._queue.append(ev)
        self._ready.set()

    def __len__(self) -> int:
        return len(self._queue)

    def get_nowait(self) -> Event | None:
        """The next event (a loss marker first if events were dropped), or None."""
        if self.lost:
            n, self.lost = self.lost, 0
            wall, mono = self._clock()
            return Event("events_lost", self.card, {"count": n}, wall, mono, 0)
        if self._queue:
            return self._queue.popleft()
        self._ready.clear()
        return None

    async def get(self) -> Event:
        """Wait for the next event."""
        while (ev := self.get_nowait()) is None:
            await self._ready.wait()
        return ev


def _now() -> tuple[float, float]:
    return time.time(), time.monotonic()


class EventBus:
    """The daemon's events: numbered, stamped, handed to every subscribed :class:`Feed`."""

    def __init__(self, clock: Callable[[], tuple[float, float]] = _now) -> None:
        self._clock = clock
        self._seq = itertools.count(1)
        self._feeds: set[Feed] = set()
        self.published = 0

    def publish(self, kind: str, card: str | None = None, **data: Any) -> Event:
        """Stamp and deliver one event (synchronous; never blocks, never raises)."""
        wall, mono = self._clock()
        ev = Event(kind, card, data, wall, mono, next(self._seq))
        self.published += 1
        for feed in list(self._feeds):
            feed.offer(ev)
        return ev

    @contextlib.contextmanager
    def subscribe(
        self,
        *,
        card: str | None = None,
        kinds: Collection[str] | None = None,
        maxlen: int = DEFAULT_FEED,
    ) -> Iterator[Feed]:
        """``with bus.subscribe(card="mic0") as feed: ev = await feed.get()``.

        Raises:
            ValueError: ``maxlen`` out of range.
        """
        feed = Feed(card=card, kinds=kinds, maxlen=maxlen, clock=self._clock)
        self._feeds.add(feed)
        try:
            yield feed
        finally:
            feed.closed = True
            self._feeds.discard(feed)

    @property
    def subscribers(self) -> int:
        return len(self._feeds)


_installed: EventBus | None = None


@contextlib.contextmanager
def installed(bus: EventBus) -> Iterator[EventBus]:
    """Make ``bus`` the one :func:`emit` publishes to, for the ``with`` block."""
    global _installed
    previous, _installed = _installed, bus
    try:
        yield bus
    finally:
        _installed = previous


def emit(kind: str, card: str | None = None, **data: Any) -> None:
    """Publish on the installed bus (none: nothing happens). ``card`` defaults to
    :data:`CURRENT_CARD`. One call, for hooks deep in the daemon."""
    bus = _installed
    if bus is not None:
        bus.publish(kind, card if card is not None else CURRENT_CARD.get(), **data)


@contextlib.contextmanager
def card_context(card: str) -> Iterator[None]:
    """Run the block (and the tasks it starts) as work for ``card``."""
    token = CURRENT_CARD.set(card)
    try:
        yield
    finally:
        CURRENT_CARD.reset(token)
