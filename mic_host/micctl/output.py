"""``micctl``'s output: tables for people, JSON for scripts, a progress report.

Pure formatting of the daemon's results (``status``, ``stats``, ``net``) and
:class:`Progress` on stderr; imports nothing from the project.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

__all__ = [
    "Progress",
    "format_net",
    "format_stats",
    "format_status",
    "format_table",
    "print_json",
    "print_state",
]


def _cell(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return str(v)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns separated by two spaces; ``None`` shows as ``-``."""
    cells = [list(headers), *([_cell(v) for v in r] for r in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells
    )


def _device_label(d: object) -> str:
    if not isinstance(d, Mapping):
        return _cell(d)
    label = str(d.get("device") or d.get("name") or "?")
    if d.get("type"):
        label += f":{d['type']}"
    if d.get("name") and d.get("device") and d["name"] != d["device"]:
        label += f"({d['name']})"
    return label


def format_status(result: Mapping[str, Any]) -> str:
    """The ``status`` table: CARD STATE SHUTDOWN PID DEVICES, one row per card."""
    rows = []
    for c in result.get("cards") or []:
        if not isinstance(c, Mapping):
            continue
        devices = c.get("devices") or []
        rows.append(
            [
                c.get("name"),
                c.get("state"),
                c.get("shutdown_status"),
                c.get("pid"),
                ", ".join(_device_label(d) for d in devices) or None,
            ]
        )
    table = format_table(["CARD", "STATE", "SHUTDOWN", "PID", "DEVICES"], rows)
    if result.get("suspended"):
        table += "\n(daemon suspended: cards stay down until 'micctl resume')"
    return table


_STAT_KEYS = ("wakeups", "chains", "buffers", "interrupts", "bytes", "errors")


def _flat(prefix: str, value: object) -> list[tuple[str, object]]:
    """``{"drops": {"rx": {"full": 2}}}`` -> ``[("drops.rx.full", 2)]``."""
    if isinstance(value, Mapping):
        return [kv for k, v in value.items() for kv in _flat(f"{prefix}{k}.", v)]
    return [(prefix.rstrip("."), value)]


def format_stats(result: Mapping[str, Any]) -> str:
    """The ``stats`` table, then each device's backend counters.

    The card rings one doorbell per device (VOP), so DOORBELLS is a device
    column; per queue: WAKEUPS (doorbells that found this queue with work),
    CHAINS (requests popped), BUFFERS (completions pushed), INTERRUPTS (to the
    card), BYTES, ERRORS (ring faults). Below the table, one line per device
    with its backend's own counters (I/O errors, refusals, drops...).
    """
    rows: list[list[object]] = []
    backends: list[str] = []
    for d in result.get("devices") or []:
        if not isinstance(d, Mapping):
            continue
        label = _device_label(d)
        queues = [q for q in d.get("queues") or [] if isinstance(q, Mapping)]
        first: list[object] = [label, d.get("doorbells")]
        if not queues:
            rows.append([*first, None, *([None] * len(_STAT_KEYS))])
        for i, q in enumerate(queues):
            name = q.get("name", q.get("index", i))
            rows.append([*(first if i == 0 else ["", ""]), name, *(q.get(k) for k in _STAT_KEYS)])
        counters = _flat("", d.get("backend") or {})
        if counters and counters != [("", {})]:
            backends.append(f"{label}: " + "  ".join(f"{k} {_cell(v)}" for k, v in counters))
    table = format_table(["DEVICE", "DOORBELLS", "QUEUE", *(k.upper() for k in _STAT_KEYS)], rows)
    if backends:
        table += "\nbackend counters:\n" + "\n".join(f"  {line}" for line in backends)
    return table


def format_net(result: Mapping[str, Any]) -> str:
    """``micctl net``: one block per net device, host side then card side."""
    blocks: list[str] = []
    for d in result.get("devices") or []:
        if not isinstance(d, Mapping):
            continue
        raw_card = d.get("card")
        card: Mapping[str, Any] = raw_card if isinstance(raw_card, Mapping) else {}
        label = d.get("name", "?") + (f" ({d['device']})" if d.get("device") else "")
        lines = [f"{label}: backend {d.get('backend', '?')}, link {d.get('link', '?')}"]
        if "host_interface" in d or "host_ip" in d:
            ns = d.get("netns") or "the daemon's"
            lines.append(
                f"  host: {d.get('host_interface') or '-'}  {d.get('host_ip') or '-'}"
                f"  (namespace {ns})"
            )
        # the card's own report wins: a frames-mode card has no namespace at all
        netns = card.get("netns") if "mode" in card else d.get("card_netns")
        lines.append(
            f"  card: {card.get('ifname') or d.get('device') or '-'}"
            f"  {card.get('card_ip') or d.get('card_ip') or '-'}"
            f"  mode {card.get('mode') or d.get('card_mode') or '-'}"
            f"  namespace {netns or '-'}"
            f"  mac {d.get('mac') or card.get('mac') or '-'}"
        )
        if d.get("offloads") is not None:
            offl = d["offloads"]
            text = " ".join(offl) if isinstance(offl, list) else str(offl)
            lines.append(f"  offloads: {text or 'none'}")
        counters = d.get("counters")
        if isinstance(counters, Mapping) and counters:
            flat = [f"{k} {v}" for k, v in counters.items() if not isinstance(v, Mapping)]
            lines.append("  " + "  ".join(flat))
            # drops by direction and reason: only the reasons that happened
            drops = counters.get("drops")
            if isinstance(drops, Mapping):
                seen = [
                    f"{way}_{reason} {n}"
                    for way, reasons in drops.items()
                    if isinstance(reasons, Mapping)
                    for reason, n in reasons.items()
                    if n
                ]
                if seen:
                    lines.append("  drops: " + "  ".join(seen))
        blocks.append("\n".join(lines))
    return "\n".join(blocks) if blocks else f"{result.get('card', '?')}: no net devices"


def print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def print_state(card: str, result: Mapping[str, Any]) -> None:
    if "state" in result:
        print(f"{result.get('card', card)}: {result['state']}")


class Progress:
    """A progress report on stderr: a redrawn bar on a TTY, a few plain lines otherwise
    (at 0, 25, 50, 75 and 100 %), so logs of scripted runs stay readable."""

    WIDTH = 30
    #: A rate over a shorter time than this says nothing (a 64 MiB allocation
    #: that takes 0.2 ms is not "342038 MiB/s"): it is not shown.
    MIN_RATE_SECONDS = 0.5

    def __init__(
        self, label: str, total: int, stream: TextIO | None = None, *, rate: bool = True
    ) -> None:
        """``rate=False``: no MiB/s (an allocation moves no data, so it has no speed)."""
        self.label = label
        self.total = max(total, 1)
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.rate = rate
        self._last_quarter = -1
        self._last_draw = 0.0
        self._done = False
        self._t0 = time.monotonic()

    def update(self, done: int) -> None:
        """Report ``done`` bytes; the 100% line is printed once, whatever calls follow."""
        if self._done:
            return
        frac = min(done / self.total, 1.0)
        self._done = frac >= 1.0
        mib = f"{done / 2**20:.1f}/{self.total / 2**20:.1f} MiB"
        if self.tty:
            now = time.monotonic()
            if frac < 1.0 and now - self._last_draw < 0.1:
                return
            self._last_draw = now
            fill = int(frac * self.WIDTH)
            bar = "#" * fill + "-" * (self.WIDTH - fill)
            elapsed = now - self._t0
            speed = ""
            if self.rate and elapsed >= self.MIN_RATE_SECONDS:
                speed = f" {done / elapsed / 2**20:.0f} MiB/s"
            self.stream.write(
                f"\r{self.label} [{bar}] {frac:4.0%} {mib}{speed}\x1b[K"
                + ("\n" if frac >= 1.0 else "")
            )
            self.stream.flush()
            return
        quarter = int(frac * 4)
        if quarter > self._last_quarter:
            self._last_quarter = quarter
            print(f"{self.label}: {quarter * 25}% ({mib})", file=self.stream, flush=True)
