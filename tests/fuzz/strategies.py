"""Hypothesis strategies shared by the fuzz targets: JSON values a hostile peer
can write (huge, negative and float numbers, deep nesting, long strings, odd
Unicode), raw JSON texts the standard encoder never produces (duplicate keys,
non-finite constants, nesting past the recursion limit), and edits of a valid
object (a field removed, added or replaced).
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st

#: The settings of every fuzz target: reproducible, bounded, no per-example deadline.
FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None)
#: For targets that cost a socket pair or an event loop per example.
FUZZ_IO = settings(max_examples=120, deadline=None, derandomize=True, database=None)

#: Numbers that trip naive validation: bounds of common integer types, huge, negative.
EDGE_INTS = st.sampled_from(
    [0, -1, 1, 2**15, 2**16, 2**31 - 1, 2**31, 2**32, 2**53 - 1, 2**53, 2**63, 2**64, -(2**63)]
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    EDGE_INTS,
    st.integers(min_value=-(10**60), max_value=10**60),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
    st.integers(min_value=500, max_value=70_000).map(lambda n: "\u00e9\U0001f600x"[n % 3] * n),
)
JSON: st.SearchStrategy[Any] = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=12,
)


def nested(depth: int, kind: str) -> str:
    """JSON text nested ``depth`` deep: ``[[[...]]]`` or ``{"a":{"a":...}}``."""
    if kind == "list":
        return "[" * depth + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


#: Raw texts a hostile peer can send that ``json.dumps`` never makes.
RAW_TEXTS = st.one_of(
    st.builds(nested, st.sampled_from([50, 999, 5_000, 200_000]), st.sampled_from(["list", "obj"])),
    st.sampled_from(
        [
            "",
            "{",
            "}",
            "null",
            "[]",
            '"x"',
            "1",
            "NaN",
            "Infinity",
            '{"type":NaN}',
            '{"type":"heartbeat","uptime":Infinity}',
            '{"type":"heartbeat","uptime":-Infinity}',
            '{"type":"heartbeat","uptime":1e400}',
            '{"type":"heartbeat","uptime":' + "9" * 5000 + "}",
            '{"type":"heartbeat","type":"online","devices":[]}',
            '{"id":1,"id":2,"op":"ping"}',
            '{"id":1,"op":"ping"}{"id":2,"op":"ping"}',
            '{"id":1,"op":"ping"} trailing',
            '{"id":1,"op":"ping"\x00}',
            '{"\\ud800":1}',
        ]
    ),
)


def edits(valid: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """``valid`` with one field removed, added, or replaced by any JSON value."""
    keys = sorted(valid)

    def removed(k: str) -> dict[str, Any]:
        return {x: v for x, v in valid.items() if x != k}

    def replaced(k: str, v: Any) -> dict[str, Any]:
        return {**valid, k: v}

    def added(k: str, v: Any) -> dict[str, Any]:
        return {**valid, k: v}

    return st.one_of(
        st.builds(removed, st.sampled_from(keys)),
        st.builds(replaced, st.sampled_from(keys), JSON),
        st.builds(added, st.text(max_size=12), JSON),
    )


def dumps(obj: Any) -> str:
    """Compact JSON as the peers write it."""
    return json.dumps(obj, separators=(",", ":"))
