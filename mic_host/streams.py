"""The daemon's streaming ops: ``events`` and ``logs``, and the event hooks on cards.

- :func:`serve_events`: one subscriber of the daemon's :class:`~mic_host.events.EventBus`
  (bounded: a client that stops reading loses the oldest events, and is told).
- :func:`serve_logs`: ``micctl logs``: a card's console log (the file
  :mod:`mic_host.backends.console_log` writes, rotated to ``.1``) and the
  daemon's log lines about the card (:class:`~mic_host.hostlog.HostLog`), the
  recent ones and, with ``follow``, new ones until the card goes down (or, for
  a card that is down, until it has booted and gone down again).
- :func:`watch_card`: publishes a card's lifecycle moves as events, and
  (:func:`announce_devices`) the devices it found at boot as it comes online;
  :func:`track_app`: ``app_started``/``app_ended`` around a ``run``.

Daemon side, beside :mod:`mic_host.daemon` (which delegates here); imports
the card manager, the events vocabulary and the control server's
:class:`~mic_host.control.server.Stream`.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import itertools
import os
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from mic_host.card import CardManager
from mic_host.control.server import Stream
from mic_host.events import CATEGORIES, KINDS, MAX_FEED, MAX_MESSAGE, EventBus, Feed, emit
from mic_host.hostlog import HostLog
from mic_host.lifecycle import CardState, Transition
from virtio.errors import BrokenResourceError, LocalProtocolError

__all__ = ["announce_devices", "serve_events", "serve_logs", "track_app", "watch_card"]

#: Seconds between looks at a followed console log (the writer batches 50 ms).
FOLLOW_PERIOD = 0.2
#: Most lines ``logs`` sends from history, per source.
MAX_LINES = 10_000
_CHUNK = 32 << 10  # console text per item
_READ_MAX = 256 << 10  # console bytes read per look
_DOWN = (CardState.READY, CardState.CRASHED, CardState.RESET_FAILED)


def watch_card(bus: EventBus, m: CardManager) -> None:
    """Publish every state change of ``m`` as an event named after the new state."""

    def on_transition(tr: Transition) -> None:
        if tr.new is tr.old:
            return
        data: dict[str, Any] = {
            "from": str(tr.old),
            "cause": str(tr.event),
            "shutdown_status": str(tr.shutdown_status),
        }
        if tr.new in (CardState.CRASHED, CardState.RESET_FAILED) and m.last_error:
            data["error"] = m.last_error[:MAX_MESSAGE]
        if tr.new is CardState.ONLINE:
            announce_devices(bus, m)
        bus.publish(str(tr.new), tr.card, **data)

    m.lifecycle.add_listener(on_transition)


def announce_devices(bus: EventBus, m: CardManager) -> None:
    """One ``device_added`` (``boot: true``) per device the card found at boot.

    Published as the card comes online, just before its ``online`` event, as
    Linux announces the devices present at boot with the same ``add`` uevents
    as hot-plugged ones (udev's coldplug): a subscriber learns every device
    and its card name (``vda``) from the stream alone, whether it was there at
    boot or attached later (``boot: false``).
    """
    for d in m.status()["devices"]:
        bus.publish(
            "device_added", m.name, name=d["name"], device=d["device"], type=d["type"], boot=True
        )


_runs = itertools.count(1)


async def track_app(m: CardManager, app: str, run: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    """Await ``run`` (the card's ``run`` op) between ``app_started`` and ``app_ended``.

    A run refused up front (the card is not online) is no app: no events.
    """
    if m.state is not CardState.ONLINE:
        return await run
    rid = next(_runs)
    emit("app_started", m.name, app=app, run=rid)
    t0 = time.monotonic()
    try:
        result = await run
    except BaseException as e:
        error = f"{type(e).__name__}: {e}"[:MAX_MESSAGE]
        took = round(time.monotonic() - t0, 6)
        emit("app_ended", m.name, app=app, run=rid, ok=False, error=error, seconds=took)
        raise
    emit("app_ended", m.name, app=app, run=rid, ok=True, seconds=round(time.monotonic() - t0, 6))
    return result


def _feed_size(what: str, buffer: float) -> int:
    n = int(buffer)
    if n != buffer or not 1 <= n <= MAX_FEED:
        raise LocalProtocolError(f"{what}: buffer must be an integer from 1 to {MAX_FEED}")
    return n


async def serve_events(
    bus: EventBus, stream: Stream, card: str | None, kinds: list[Any], buffer: float
) -> dict[str, Any]:
    """Stream the bus's events (for ``card``, of ``kinds``) until the client goes.

    Raises:
        LocalProtocolError: an unknown kind or category, a bad buffer size.
    """
    for k in kinds:
        if not isinstance(k, str) or (k not in KINDS and k not in CATEGORIES):
            names = ", ".join(sorted(CATEGORIES | KINDS.keys()))
            raise LocalProtocolError(f"events: unknown event kind {k!r} (kinds: {names})")
    maxlen = _feed_size("events", buffer)
    with bus.subscribe(card=card, kinds=kinds, maxlen=maxlen) as feed:
        await stream.start({"card": card, "kinds": kinds, "buffer": maxlen})
        with contextlib.suppress(BrokenResourceError):
            while True:
                await stream.send((await feed.get()).to_wire())
    return {"reason": "client gone"}


# ------------------------------------------------------------------------- logs


def _console_log(m: CardManager, device: str | None) -> Path | None:
    """The log file of the card's first console (or ``device``: host or card name).

    Raises:
        LocalProtocolError: no such console.
    """
    consoles = [d for d in m.status()["devices"] if d.get("log")]
    if device is not None:
        consoles = [d for d in consoles if device in (d.get("name"), d.get("device"))]
        if not consoles:
            raise LocalProtocolError(f"{m.name}: no console {device!r}")
    return Path(consoles[0]["log"]) if consoles else None


def _tail(path: Path, lines: int) -> tuple[bytes, int | None, int]:
    """The last ``lines`` lines of ``path`` (reaching into ``path.1`` if needed),
    and the inode and size the file had (where following starts)."""
    if lines <= 0:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return b"", None, 0
        return b"", st.st_ino, st.st_size
    want = min(max(lines * 256, 64 << 10), 1 << 20)
    data, ino, size = b"", None, 0
    for p in (path, path.with_name(path.name + ".1")):
        try:
            with open(p, "rb") as f:
                st = os.fstat(f.fileno())
                if p == path:
                    ino, size = st.st_ino, st.st_size
                f.seek(max(0, st.st_size - (want - len(data))))
                data = f.read(want - len(data)) + data
        except FileNotFoundError:
            continue
        if data.count(b"\n") > lines or len(data) >= want:
            break
    cut = data.splitlines(keepends=True)[-lines:]
    return b"".join(cut), ino, size


class _Follow:
    """A console log followed as ``tail -F`` does: across rotation and truncation."""

    def __init__(self, path: Path, ino: int | None, pos: int) -> None:
        self.path = path
        self.ino = ino
        self.pos = pos
        self._f: BinaryIO | None = None

    def _open(self) -> bool:
        try:
            self._f = open(self.path, "rb")  # noqa: SIM115 - closed in close()
        except FileNotFoundError:
            return False
        st = os.fstat(self._f.fileno())
        if st.st_ino != self.ino:
            self.ino, self.pos = st.st_ino, 0  # a new file: from its start
        elif st.st_size < self.pos:
            self.pos = 0  # truncated
        self._f.seek(self.pos)
        return True

    def read(self) -> bytes:
        """What was appended since the last call (at most ``_READ_MAX`` bytes)."""
        if self._f is None and not self._open():
            return b""
        assert self._f is not None
        out = self._f.read(_READ_MAX)
        self.pos += len(out)
        if len(out) < _READ_MAX:
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                return out
            if st.st_ino != self.ino or st.st_size < self.pos:  # rotated or truncated
                self.close()
                if self._open():
                    assert self._f is not None
                    more = self._f.read(_READ_MAX - len(out))
                    self.pos += len(more)
                    out += more
        return out

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def _chunks(text: str) -> Iterator[str]:
    for i in range(0, len(text), _CHUNK):
        yield text[i : i + _CHUNK]


async def serve_logs(
    m: CardManager,
    hostlog: HostLog,
    stream: Stream,
    *,
    source: str,
    lines: float,
    follow: bool,
    device: str | None,
) -> dict[str, Any]:
    """``logs``: recent console and host lines of ``m``, then (``follow``) new ones.

    Raises:
        LocalProtocolError: a bad line count, or no such console.
    """
    n = int(lines)
    if n != lines or not 0 <= n <= MAX_LINES:
        raise LocalProtocolError(f"logs: lines must be an integer from 0 to {MAX_LINES}")
    console = _console_log(m, device) if source in ("all", "console") else None
    host = source in ("all", "host")
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with hostlog.follow(m.name, MAX_FEED) as feed:
        await stream.start(
            {"card": m.name, "console_log": str(console) if console else None, "follow": follow}
        )
        try:
            tail = None
            if console is not None:
                data, ino, size = await asyncio.to_thread(_tail, console, n)
                tail = _Follow(console, ino, size)
                for text in _chunks(decoder.decode(data)):
                    await stream.send({"source": "console", "text": text})
            last = 0
            if host:
                for ev in hostlog.recent(m.name, n):
                    last = ev.seq
                    await stream.send(_host_item(ev.data))
            if not follow:
                return {"reason": "done"}
            return await _follow(m, stream, tail, feed if host else None, last, decoder)
        except BrokenResourceError:
            return {"reason": "client gone"}
        finally:
            if tail is not None:
                tail.close()


def _host_item(data: Any) -> dict[str, Any]:
    return {"source": "host", "level": data["level"], "line": data["line"]}


async def _follow(
    m: CardManager,
    stream: Stream,
    tail: _Follow | None,
    feed: Feed | None,
    last: int,
    decoder: codecs.IncrementalDecoder,
) -> dict[str, Any]:
    """New lines until the card has been up and is down again."""
    was_up = m.state not in _DOWN
    down_since: float | None = None
    while True:
        if feed is not None:
            while (ev := feed.get_nowait()) is not None:
                if ev.kind == "events_lost":
                    await stream.send({"source": "host", "lost": ev.data["count"]})
                elif ev.seq > last:
                    await stream.send(_host_item(ev.data))
        got = b""
        if tail is not None:
            got = await asyncio.to_thread(tail.read)
            for text in _chunks(decoder.decode(got)):
                await stream.send({"source": "console", "text": text})
        up = m.state not in _DOWN
        if up:
            was_up, down_since = True, None
        elif was_up:
            # down: one more look after the console writer's last batch, then stop
            now = time.monotonic()
            if down_since is None:
                down_since = now
            elif now - down_since >= 2 * FOLLOW_PERIOD and not got:
                return {"reason": f"{m.name} is {m.state}"}
        if len(got) < _READ_MAX:
            await asyncio.sleep(FOLLOW_PERIOD)
