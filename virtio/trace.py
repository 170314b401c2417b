"""Per-hop timestamps of single requests: an optional trace, off by default.

Owns the hop names and the in-memory record of one process. Call sites test
the module-level flag themselves, so a disabled trace costs one attribute load
and a branch per hop, never a function call::

    from virtio import trace
    ...
    if trace.ON:
        trace.mark(trace.SUBMIT)

The core has no clock (STYLE.md §1): :func:`enable` is given one by the
process that turns the trace on (``transport.tracing``, from ``MIC_TRACE``),
which also writes :func:`records` out at exit. :func:`breakdown` turns the
records of every process into a per-hop table (``bench/latency.py --trace``);
``CLOCK_MONOTONIC`` is shared by the processes of one machine, so host and
card marks can be merged.

Must not import anything but the standard library's pure modules.
"""

from __future__ import annotations

import itertools
import statistics
from array import array
from collections.abc import Callable, Iterable

__all__ = [
    "HOPS",
    "ON",
    "breakdown",
    "disable",
    "enable",
    "mark",
    "records",
]

#: The hops, in the order one block request crosses them.
SUBMIT = 0  #: card driver adds the chain (DriverEndpoint.submit_nowait)
DOORBELL = 1  #: card publishes avail.idx and rings the host (kick)
HOST_WAKE = 2  #: host doorbell pump hands the ring to the device
POP = 3  #: host backend pops the chain (QueueEndpoint)
IO_DONE = 4  #: host backend finished the I/O (block: preadv/pwritev returned)
PUSH = 5  #: host backend puts the used entry (QueueEndpoint.put)
INTERRUPT = 6  #: host publishes used.idx and interrupts the card
CARD_IRQ = 7  #: card doorbell pump hands the interrupt to the driver
COMPLETE = 8  #: card driver resolves the request's future
PTY_IN = 9  #: host console backend read typed bytes from the pty
PTY_OUT = 10  #: host console backend wrote card output to the pty
HOST_TAP_IN = 11  #: host net backend read a frame from its TAP
HOST_TAP_OUT = 12  #: host net backend wrote a frame to its TAP
CARD_TAP_IN = 13  #: card net driver read a frame from the card TAP
CARD_TAP_OUT = 14  #: card net driver wrote a frame to the card TAP

HOPS = (
    "submit",
    "doorbell",
    "host_wake",
    "pop",
    "io_done",
    "push",
    "interrupt",
    "card_irq",
    "complete",
    "pty_in",
    "pty_out",
    "host_tap_in",
    "host_tap_out",
    "card_tap_in",
    "card_tap_out",
)

#: True while tracing: call sites check it before calling :func:`mark`.
ON = False
_clock: Callable[[], int] | None = None
#: The marks, as flat ``hop, ns, hop, ns, ...`` machine integers: an array is
#: not tracked by the cyclic GC, where a list of tuples made the collector run
#: every ~80 traced requests and its full collections scan every mark so far,
#: pauses the trace then blamed on the hops (issue 19, the tails).
_buf: array[int] = array("q")
_cap = 0


def enable(clock: Callable[[], int], capacity: int = 1 << 20) -> None:
    """Start recording (at most ``capacity`` marks; later ones are dropped)."""
    global ON, _clock, _cap
    _clock, _cap = clock, 2 * capacity
    del _buf[:]
    ON = True


def disable() -> None:
    global ON
    ON = False


def mark(hop: int) -> None:
    """Record ``hop`` now (only call it when :data:`ON`)."""
    if _clock is not None and len(_buf) < _cap:
        _buf.append(hop)
        _buf.append(_clock())


def records() -> list[tuple[int, int]]:
    """The marks recorded so far, ``(hop, ns)``."""
    return list(zip(_buf[::2], _buf[1::2], strict=True))


def breakdown(
    marks: Iterable[tuple[int, int]], start: int = SUBMIT, max_episode_ns: int = 50_000_000
) -> dict[str, object]:
    """Split time-ordered ``marks`` into episodes that begin at hop ``start`` and
    report the median time of every step ``a -> b`` between consecutive marks,
    in the order they happen (by median time since the episode began).
    Episodes longer than ``max_episode_ns`` (idle gaps) are ignored.
    """
    ordered = sorted(marks, key=lambda m: m[1])
    episodes: list[list[tuple[int, int]]] = []
    cur: list[tuple[int, int]] | None = None
    for hop, t in ordered:
        if hop == start:
            cur = [(hop, t)]
            episodes.append(cur)
        elif cur is not None:
            cur.append((hop, t))
    steps: dict[str, list[int]] = {}
    at: dict[str, list[int]] = {}  # when the step ends, since the episode began
    totals: list[int] = []
    for ep in episodes[:-1] if len(episodes) > 1 else episodes:
        if len(ep) < 2 or ep[-1][1] - ep[0][1] > max_episode_ns:
            continue
        totals.append(ep[-1][1] - ep[0][1])
        for (a, ta), (b, tb) in itertools.pairwise(ep):
            key = f"{HOPS[a]} -> {HOPS[b]}"
            steps.setdefault(key, []).append(tb - ta)
            at.setdefault(key, []).append(tb - ep[0][1])
    n = len(totals)
    return {
        "start": HOPS[start],
        "episodes": n,
        "steps": [
            {
                "step": k,
                "count": len(v),
                "per_episode": round(len(v) / n, 2) if n else 0.0,
                "p50_us": round(statistics.median(v) / 1000, 1),
            }
            for k, v in sorted(steps.items(), key=lambda kv: statistics.median(at[kv[0]]))
            if n and len(v) >= n // 4
        ],
        "episode_p50_us": round(statistics.median(totals) / 1000, 1) if totals else None,
        "median_episode": _median_episode(episodes, max_episode_ns),
    }


def _median_episode(
    episodes: list[list[tuple[int, int]]], max_episode_ns: int
) -> list[tuple[str, float]]:
    """The hops of the episode of median length, as ``(hop, µs since the start)``."""
    ok = [ep for ep in episodes[:-1] if len(ep) > 1 and ep[-1][1] - ep[0][1] <= max_episode_ns]
    if not ok:
        return []
    ok.sort(key=lambda ep: ep[-1][1] - ep[0][1])
    ep = ok[len(ok) // 2]
    return [(HOPS[h], round((t - ep[0][1]) / 1000, 1)) for h, t in ep]
