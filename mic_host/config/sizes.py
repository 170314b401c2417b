"""Size strings of the configuration and the command line: ``"64M"`` <-> bytes.

Binary units (K = 1024), an optional ``iB``/``B``. Imports ``virtio.errors`` only.
"""

from __future__ import annotations

import re

from virtio.errors import ConfigError

__all__ = ["parse_size", "format_size"]

_SIZE_RE = re.compile(r"^\s*([0-9]+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(value: object) -> int:
    """Parse a byte count: an int, or a string like ``"4096"``, ``"64M"``, ``"1GiB"``.

    Units are binary (K = 1024). Returns a non-negative int; callers check
    their own lower bound.

    Raises:
        ConfigError: not an int or a size string, or negative (the message
            has no key path; :func:`parse_config` adds it).
    """
    if isinstance(value, bool):
        raise ConfigError(f"bad size {value!r}: expected bytes or a string like '64M'")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"bad size {value}: must not be negative")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m is None or (m.group(3) and not m.group(2) and m.group(3).lower() == "ib"):
            raise ConfigError(
                f"bad size {value!r}: expected bytes or a number with K, M, G or T "
                "(binary units), e.g. '64M'"
            )
        return int(m.group(1)) * _UNITS[m.group(2).lower()]
    raise ConfigError(
        f"bad size {value!r}: expected bytes (int) or a string like '64M', "
        f"not {type(value).__name__}"
    )


def format_size(n: int) -> str:
    """The shortest exact binary-unit spelling: ``67108864 -> '64M'``, ``1000 -> '1000'``."""
    for unit in ("T", "G", "M", "K"):
        mult = _UNITS[unit.lower()]
        if n and n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)
