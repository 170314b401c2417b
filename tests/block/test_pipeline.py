"""1 MiB requests: a batch's first half is published before the second half is read
(the card resubmits meanwhile), small requests are published once per batch, and
deep big reads through real processes return the right data."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

import mic_host
from mic_host.backends.block import PIPELINE_BYTES, BlockBackend
from mic_host.endpoint import QueueEndpoint
from virtio.blk import REQ_HEADER
from virtio.constants import BlkFeature, BlkReqType, BlkStatus, Feature
from virtio.errors import MicError
from virtio.memory import FlatMemory
from virtio.split import DeviceQueue, DriverQueue, SplitLayout

MiB = 1 << 20
QSIZE = 32
HDRS, STATUS, DATA = 0x10000, 0x20000, MiB


class _Owner:
    """The VOP device's side of an endpoint: records what the card can see (its
    used entries) at every publication."""

    def __init__(self, driver: DriverQueue[int], want: int) -> None:
        self.driver = driver
        self.seen: list[list[int]] = []
        self.want = want
        self.all_seen = asyncio.Event()

    def _interrupt(self) -> None:
        pass

    def _ring_error(self, index: int, exc: MicError) -> None:
        raise AssertionError(f"ring error {exc}")

    def _published(self, index: int, next_avail: int) -> None:
        got = [token for token, _ in self.driver.get_used_many()]
        if got:
            self.seen.append(got)
        if sum(map(len, self.seen)) >= self.want:
            self.all_seen.set()


class _Context:
    """What VOP hands a running backend (``BackendContext``), for one queue."""

    def __init__(self, ep: QueueEndpoint) -> None:
        self.name = "blk"
        self.queues = [ep]
        self.features = int(BlkFeature.FLUSH)
        self.log = logging.getLogger("test-pipeline")

    async def update_config(self, config: bytes) -> None:
        raise AssertionError("not expected")


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "d.img"
    p.write_bytes(b"".join(bytes([m + 1]) * MiB for m in range(8)))  # MiB m holds m+1
    return p


@pytest.mark.asyncio
@pytest.mark.parametrize("features", [0, int(Feature.EVENT_IDX)])
@pytest.mark.parametrize(
    ("size", "count", "expected"),
    [
        (MiB, 4, [[0, 1], [2, 3]]),  # big: the first half goes out first
        (MiB, 5, [[0, 1], [2, 3, 4]]),
        (PIPELINE_BYTES, 2, [[0], [1]]),
        (MiB, 1, [[0]]),
        (4096, 8, [list(range(8))]),  # small: one publication per batch
    ],
)
async def test_a_batch_of_big_reads_is_published_in_two_halves(
    image: Path, features: int, size: int, count: int, expected: list[list[int]]
) -> None:
    mem = FlatMemory(16 * MiB)
    layout = SplitLayout.contiguous(0, QSIZE)
    driver: DriverQueue[int] = DriverQueue(mem, layout, features)
    dq = DeviceQueue(mem, layout, features)
    dq.activate()
    owner = _Owner(driver, count)
    ep = QueueEndpoint(owner, 0, QSIZE)
    ep.attach(dq)
    backend = BlockBackend(image)
    task = asyncio.create_task(backend.run(_Context(ep)))
    try:
        await asyncio.sleep(0)  # the backend now waits for a batch
        for n in range(count):
            hdr = HDRS + 16 * n
            mem.view(hdr, 16, True)[:] = REQ_HEADER.pack(BlkReqType.IN, n * MiB // 512)
            driver.add([(hdr, 16)], [(DATA + n * MiB, size), (STATUS + n, 1)], n)
        driver.publish()
        ep.notify()
        await asyncio.wait_for(owner.all_seen.wait(), 30)
        assert owner.seen == expected
        for n in range(count):
            assert mem.view(STATUS + n, 1)[0] == BlkStatus.OK
            assert bytes(mem.view(DATA + n * MiB, size)) == bytes([n + 1]) * size
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await backend.aclose()


CONFIG = """
[[cards]]
name = "mic0"
boot_at_start = true
card_ram = "64M"

[[cards.devices]]
type = "block"
options = {{ image = "{img}" }}
"""


@pytest.mark.asyncio
async def test_deep_1mib_reads_across_processes_return_their_own_data(state_dir: Path) -> None:
    """Eight workers, 1 MiB each, through the daemon and a card: every read returns
    its own MiB although completions are published while others are still read."""
    img = state_dir / "big.img"
    img.write_bytes(b"".join(m.to_bytes(8, "little") * (MiB // 8) for m in range(16)))
    async with mic_host.launch(state_dir, CONFIG.format(img=img)) as client:
        card = client.card("mic0")
        await card.wait("online", timeout=60)
        res = (await card.run("tests.block.seq_apps:deep_big_reads", "vda", 8, 4))["value"]
        stats = await card.stats()
    assert res == {"wrong": [], "done": 64}
    assert stats["devices"][0]["backend"]["reads"] >= 64
