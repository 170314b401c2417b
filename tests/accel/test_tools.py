"""The shell's functions: ``accel list`` text and ``accel bench`` output."""

from __future__ import annotations

import pytest

from mic_card.accel import AccelFramework, accel_bench, accel_list_text, bench_args, format_bench
from virtio.errors import LocalProtocolError

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def test_accel_list(fw: AccelFramework) -> None:
    text = accel_list_text(fw)
    assert "mic-zip: api=mic-accel-v2 flags=1 (SVA)" in text
    assert "mic-zip-nosva" in text
    assert "flags=0 (-)" in text
    assert "available_instances=" in text
    assert "isolate_strategy=0" in text
    assert "algorithms: aes-cbc aes-ctr aes-xts aes-gcm sha256" in text


@pytest.mark.parametrize(
    ("alg", "mode", "batch", "op"),
    [("zlib", "sva", 4, None), ("sha256", "nosva", 8, None), ("gzip", "nosva", 1, "decompress")],
)
async def test_accel_bench(
    fw: AccelFramework, alg: str, mode: str, batch: int, op: str | None
) -> None:
    before = {d.name: d.available_instances for d in fw.devices.values()}
    r = await accel_bench(fw, alg, 4096, 0.2, batch=batch, mode=mode, op=op)
    assert r["alg"] == alg
    assert r["length"] == 4096
    assert r["batch"] == batch
    assert r["requests"] >= batch
    assert r["errors"] == 0
    assert r["kib_s"] > 0
    assert r["kops"] > 0
    assert r["avg_lat_us"] > 0
    assert 0 <= r["cpu_pct"] <= 400
    table = format_bench([r, r])
    head, *rows = table.splitlines()
    for col in ("alg", "length", "perf KiB/s", "iops Kops", "CPU_rate %", "avg latency us"):
        assert col in head
    assert len(rows) == 2
    assert rows[0].split()[0] == alg
    # the bench leaves no queue behind
    assert before == {d.name: d.available_instances for d in fw.devices.values()}


async def test_bench_refuses_bad_arguments(fw: AccelFramework) -> None:
    with pytest.raises(LocalProtocolError):
        await accel_bench(fw, "zlib", 4096, 0.1, mode="turbo")
    with pytest.raises(LocalProtocolError, match="no SVA"):
        await _nosva_sva(fw)
    assert bench_args(["--alg", "zlib", "--size", "4096", "--seconds", "1", "--json"])["json"]
    with pytest.raises(LocalProtocolError, match="accel bench"):
        bench_args(["--size", "x"])


async def _nosva_sva(fw: AccelFramework) -> None:
    # only the no-SVA device offers "deflate" once the others are isolated
    zip_ = fw.device("mic-zip")
    zip_.isolate = True
    try:
        await accel_bench(fw, "deflate", 4096, 0.1, mode="sva")
    finally:
        zip_.isolate = False
