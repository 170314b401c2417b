"""``bench/vhost_user.py`` keeps running: a very short run against qemu-storage-daemon,
and its section and summary rows render."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench import vhost_user


@pytest.mark.skipif(
    shutil.which("qemu-storage-daemon") is None,
    reason="needs qemu-storage-daemon (Debian qemu-system-common; .ci/run)",
)
def test_bench_measures_both_sides_and_renders(tmp_path: Path) -> None:
    out = tmp_path / "vhost_user.json"
    assert vhost_user.main(["--quick", "--seconds", "0.1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    cells = [r["cell"] for r in data["rows"]]
    assert cells == [c[0] for c in vhost_user.CELLS]
    for row in data["rows"]:
        assert row["micvop_iops"] > 0
        assert row["qsd_iops"] > 0
        assert row["ratio"] > 0
    text = "\n".join(vhost_user.section(data))
    assert "qemu-storage-daemon" in text
    assert "| randread QD32 |" in text
    targets = vhost_user.targets(data)
    assert {t["bench"] for t in targets} == {"vhost_user"}
    assert sum(t["met"] is not None for t in targets) == 4  # QD1 x2 latency, QD32 x2 IOPS
