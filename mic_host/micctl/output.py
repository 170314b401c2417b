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


_STAT_KEYS = ("kicks", "interrupts", "buffers", "bytes", "errors")


def format_stats(result: Mapping[str, Any]) -> str:
    """The ``stats`` table: one row per device queue with its counters."""
    rows: list[list[object]] = []
    for d in result.get("devices") or []:
        if not isinstance(d, Mapping):
            continue
        queues = d.get("queues") or []
        if not queues:
            rows.append([_device_label(d), None, *([None] * len(_STAT_KEYS))])
        for i, q in enumerate(queues):
            if not isinstance(q, Mapping):
                continue
            name = q.get("name", q.get("index", i))
            rows.append([_device_label(d), name, *(q.get(k) for k in _STAT_KEYS)])
    return format_table(["DEVICE", "QUEUE", *(k.upper() for k in _STAT_KEYS)], rows)


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
        lines.append(
            f"  card: {card.get('ifname') or d.get('device') or '-'}"
            f"  {card.get('card_ip') or d.get('card_ip') or '-'}"
            f"  mode {card.get('mode') or d.get('card_mode') or '-'}"
            f"  namespace {card.get('netns') or d.get('card_netns') or '-'}"
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

    def __init__(self, label: str, total: int, stream: TextIO | None = None) -> None:
        self.label = label
        self.total = max(total, 1)
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self._last_quarter = -1
        self._last_draw = 0.0
        self._t0 = time.monotonic()

    def update(self, done: int) -> None:
        frac = min(done / self.total, 1.0)
        mib = f"{done / 2**20:.1f}/{self.total / 2**20:.1f} MiB"
        if self.tty:
            now = time.monotonic()
            if frac < 1.0 and now - self._last_draw < 0.1:
                return
            self._last_draw = now
            fill = int(frac * self.WIDTH)
            bar = "#" * fill + "-" * (self.WIDTH - fill)
            rate = done / max(now - self._t0, 1e-6) / 2**20
            self.stream.write(
                f"\r{self.label} [{bar}] {frac:4.0%} {mib} {rate:.0f} MiB/s"
                + ("\n" if frac >= 1.0 else "")
            )
            self.stream.flush()
            return
        quarter = int(frac * 4)
        if quarter > self._last_quarter:
            self._last_quarter = quarter
            print(f"{self.label}: {quarter * 25}% ({mib})", file=self.stream, flush=True)
