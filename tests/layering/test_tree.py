"""The product's import graph obeys the declared layers (tests/layering/rules.py).

Static: every module of virtio, transport, mic_host and mic_card is parsed,
none is imported. Each rule is its own test so a failure names the rule; the
message lists every offending import with file, line and how it is written.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest

from tests.layering.checker import Graph, Report, check, scan
from tests.layering.rules import LAYERS, PACKAGES, RULES

ROOT = Path(__file__).resolve().parents[2]


@cache
def _graph() -> Graph:
    return scan(ROOT, PACKAGES)


@cache
def _report() -> Report:
    return check(_graph(), RULES)


HOW_TO_FIX = (
    "Turn a wrong arrow around (the lower module declares a Protocol that the higher one\n"
    "implements, or receives what it needs as an argument), or move the code to the layer\n"
    "it belongs to. If the architecture changed, change the declared table in\n"
    "tests/layering/rules.py (and docs/architecture.md) instead."
)


def _fail_unless_empty(title: str, lines: list[str]) -> None:
    if lines:
        text = "\n".join([f"{title} ({len(lines)}):", *lines, "", HOW_TO_FIX])
        pytest.fail(text, pytrace=False)


def test_the_tree_is_there() -> None:
    """The scan sees the product (a wrong root would make every rule pass)."""
    modules = _graph().modules
    for package in PACKAGES:
        assert package in modules, package
    assert len(modules) > 50
    assert any(i.target == "virtio.errors" for i in _graph().imports)


def test_packages_import_only_the_packages_below() -> None:
    _fail_unless_empty("imports between packages that the rules forbid", _report().package_arrows)


def test_virtio_imports_no_event_loop_and_no_os() -> None:
    _fail_unless_empty("virtio imports that the sans-IO core forbids", _report().forbidden_outside)


def test_every_module_has_a_declared_layer() -> None:
    report = _report()
    _fail_unless_empty("modules in no declared layer", report.unplaced + report.ambiguous)


def test_imports_point_down_the_declared_layers() -> None:
    _fail_unless_empty("imports pointing up the declared layers", _report().layer_arrows)


def test_barriers_inside_packages() -> None:
    _fail_unless_empty("imports through a barrier", _report().barrier_arrows)


def test_no_import_cycle_between_files() -> None:
    _fail_unless_empty("import cycles between files", _report().cycles)


def test_the_table_names_each_pattern_once() -> None:
    for package, layers in LAYERS.items():
        patterns = [p for layer in layers for p in layer]
        assert len(patterns) == len(set(patterns)), (package, patterns)
        assert package in PACKAGES
