"""The benchmarks must keep running: a very short ring run and the report renderer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import latency, report, ring


def test_ring_bench_runs_and_writes_ratios(tmp_path: Path) -> None:
    out = tmp_path / "ring.json"
    assert ring.main(["--quick", "--seconds", "0.02", "--runs", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = {(r["mode"], r["size"], r["batch"]) for r in data["rows"]}
    assert ("1proc", 64, 32) in rows
    assert all(r["micvop_rps"] > 0 and r["ratio_vs_ceiling"] > 0 for r in data["rows"])
    assert all(r["packed_rps"] > 0 and r["ratio_packed_vs_split"] > 0 for r in data["rows"])


def test_latency_bench_measures_the_floor(tmp_path: Path) -> None:
    out = tmp_path / "latency.json"
    assert latency.main(["--quick", "--rows", "floor", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    floor = data["rows"][0]
    assert floor["key"] == "floor"
    assert floor["n"] >= 1000
    assert 0 < floor["p50_us"] <= floor["p99_us"]


def test_report_renders_every_section(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(report, "OUT", tmp_path / "performance.md")
    monkeypatch.setattr(report, "SUMMARY", tmp_path / "summary.json")
    assert report.main() == 0
    summary = json.loads((tmp_path / "summary.json").read_text())["targets"]
    benches = {r["bench"] for r in summary}
    assert {"ring", "boot", "block", "accel", "net", "isolation", "latency"} <= benches
    assert all({"target", "measured", "goal", "met"} <= r.keys() for r in summary)
    printed = capsys.readouterr().out
    assert printed.rstrip().endswith("targets met")  # make bench ends with the table
    assert "## Summary: every target" in (tmp_path / "performance.md").read_text()
    text = (tmp_path / "performance.md").read_text()
    assert "## Ring core" in text
    assert "## Card boot and memory" in text
    assert "## Block device" in text
    assert "## Accelerators" in text
