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


def test_report_renders_the_issue16_sections(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scaling, the per-request breakdown and every A/B file reach docs/performance.md."""
    results = tmp_path / "results"
    results.mkdir()
    for f in report.RESULTS.glob("*.json"):
        (results / f.name).write_text(f.read_text())
    (results / "profile.json").write_text(json.dumps(_PROFILE))
    monkeypatch.setattr(report, "RESULTS", results)
    monkeypatch.setattr(report, "OUT", tmp_path / "performance.md")
    monkeypatch.setattr(report, "SUMMARY", tmp_path / "summary.json")
    assert report.main() == 0
    text = (tmp_path / "performance.md").read_text()
    assert "## Where the time goes" in text
    assert "`Doorbell.ring (transport/notify.py)` | 3.00 | 25.0%" in text
    assert "## Cost as work grows" in text
    assert "## A/B, interleaved" in text
    summary = json.loads((tmp_path / "summary.json").read_text())["targets"]
    assert any(r["bench"] == "scaling" for r in summary)


_PROC = {
    "cpu_s": 1.0,
    "cpu_pct": 30.0,
    "us_per_request": 12.0,
    "samples": 100,
    "top_self": [
        {"function": "Doorbell.ring (transport/notify.py)", "share": 0.25, "us": 3.0},
        {"function": "BlockBackend._pread (backends/block.py)", "share": 0.1, "us": 1.2},
    ],
    "top_inclusive": [],
}
_PROFILE = {
    "when": "2026-12-04 18:00:00 UTC",
    "load": 1.0,
    "rate": 500,
    "runs": {
        "block-read": {
            "workload": "block 4 KiB randread QD32",
            "rate": 20000,
            "us_per_request": 24.0,
            "processes": {"daemon": _PROC, "card": _PROC},
        },
        "net": {"skipped": "needs root"},
    },
}
