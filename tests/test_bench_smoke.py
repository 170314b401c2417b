"""The benchmarks must keep running: a very short ring run and the report renderer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import report, ring


def test_ring_bench_runs_and_writes_ratios(tmp_path: Path) -> None:
    out = tmp_path / "ring.json"
    assert ring.main(["--quick", "--seconds", "0.02", "--runs", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = {(r["mode"], r["size"], r["batch"]) for r in data["rows"]}
    assert ("1proc", 64, 32) in rows
    assert all(r["micvop_rps"] > 0 and r["ratio_vs_ceiling"] > 0 for r in data["rows"])
    assert all(r["packed_rps"] > 0 and r["ratio_packed_vs_split"] > 0 for r in data["rows"])


def test_report_renders_every_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report, "OUT", tmp_path / "performance.md")
    assert report.main() == 0
    text = (tmp_path / "performance.md").read_text()
    assert "## Ring core" in text
    assert "## Card boot and memory" in text
    assert "## Block device" in text
    assert "## Accelerators" in text
