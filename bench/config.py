"""The daemon configs the benchmarks launch: one place that writes their TOML.

Every bench that starts a real daemon used to carry its own copy of the same
``[[cards]]`` table (``mic0``, booted at start, a relaxed heartbeat) with a
block device under it. :func:`card` writes one card with its devices,
:func:`device` / :func:`block` one device; values are rendered as TOML
(strings quoted and escaped, booleans lower-case, lists as arrays, None left
out), so a path with a quote in it cannot break the file. The integration
tests' small configs (``tests/integration/helpers.py``) are written with it
too. The config format itself is ``docs/config.md``.

    cfg = card(block(image, num_queues=2))                     # mic0, 128M, boots at start
    cfg = card(device("console"), block(image), card_ram="64M")
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["block", "card", "device", "toml_value"]


def toml_value(value: object) -> str:
    """``value`` as a TOML value (str, Path, bool, int, float, or a list or
    tuple of those: an array, such as ``card_command``).

    Raises:
        TypeError: another type.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # a JSON string is a TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__} {value!r}")


def _pairs(items: dict[str, object]) -> list[str]:
    return [f"{k} = {toml_value(v)}" for k, v in items.items() if v is not None]


def device(type_: str, *, name: str | None = None, **options: object) -> str:
    """One ``[[cards.devices]]`` table (``options`` as an inline table)."""
    lines = ["[[cards.devices]]", *_pairs({"type": type_, "name": name})]
    if opts := _pairs(options):
        lines.append("options = { " + ", ".join(opts) + " }")
    return "\n".join(lines) + "\n"


def block(image: Path | str, *, name: str | None = None, **options: object) -> str:
    """A block device backed by the file ``image``."""
    return device("block", name=name, image=image, **options)


def card(
    *devices: str,
    name: str = "mic0",
    card_ram: str | None = "128M",
    boot_at_start: bool | None = True,
    heartbeat_timeout: float | None = 30.0,
    **settings: object,
) -> str:
    """One ``[[cards]]`` table and its ``devices`` (:func:`device`); a setting
    given as None is left out (the daemon's default)."""
    head = {
        "name": name,
        "boot_at_start": boot_at_start,
        "card_ram": card_ram,
        "heartbeat_timeout": heartbeat_timeout,
        **settings,
    }
    return "\n".join(["[[cards]]", *_pairs(head), "", *devices])
