"""The ring core runs compiled where ``tools/mypyc_build.py`` built it, pure where asked.

``make test`` runs tests/virtio twice: once as built (compiled when the
machine has a C compiler), once with ``MIC_PURE_PYTHON=1 -p tools.pure_python``
(the Python sources). Each pass checks here that it runs what it claims to.
"""

from __future__ import annotations

from types import ModuleType

import pytest

import virtio.memory
import virtio.packed.device
import virtio.packed.driver
import virtio.split.chain
import virtio.split.device
import virtio.split.driver
from tools import mypyc_build, pure_python

HOT = (
    virtio.memory,
    virtio.split.chain,
    virtio.split.device,
    virtio.split.driver,
    virtio.packed.device,
    virtio.packed.driver,
)


def _compiled(mod: ModuleType) -> bool:
    return not (mod.__file__ or "").endswith(".py")


def test_every_compiled_module_is_in_the_build_list() -> None:
    listed = {m.removesuffix(".py").replace("/", ".") for m in mypyc_build.MODULES}
    assert {m.__name__ for m in HOT} <= listed


def test_the_ring_core_runs_what_was_built() -> None:
    files = {m.__name__: m.__file__ for m in HOT}
    if pure_python.pure_requested():
        # the pure pass: sources, whatever is built (-p tools.pure_python)
        assert not any(map(_compiled, HOT)), (
            f"MIC_PURE_PYTHON=1 but compiled modules were imported (run pytest with "
            f"-p tools.pure_python): {files}"
        )
        return
    if not mypyc_build.built_files():
        pytest.skip("the ring core is not built here (pure Python: no C compiler at install)")
    assert not mypyc_build.stale_sources(), "sources changed since the build: run make install"
    assert all(map(_compiled, HOT)), f"built, yet not imported compiled: {files}"


def test_interpreted_subclasses_of_compiled_classes_work() -> None:
    """What the rest of the tree subclasses stays subclassable when compiled."""
    from virtio.split import DeviceQueue, SplitLayout

    class Counting(DeviceQueue):
        __slots__ = ("popped",)

        def pop_many(self, limit: int = 32768) -> list[virtio.split.chain.Chain]:
            chains = super().pop_many(limit)
            self.popped += len(chains)
            return chains

    mem = virtio.memory.FlatMemory(1 << 16)
    lay = SplitLayout.contiguous(0, 8)
    drv: virtio.split.driver.DriverQueue[int] = virtio.split.driver.DriverQueue(mem, lay, 0)
    dev = Counting(mem, lay, 0)
    dev.popped = 0
    dev.activate()
    drv.add(((0x8000, 16),), (), 1)
    drv.publish()
    assert [c.head for c in dev.pop_many()] == [0]
    assert dev.popped == 1

    class Heap(virtio.memory.FirstFitAllocator):
        pass

    assert Heap(0, 4096).alloc(64) == 0

    class Fault(virtio.memory.MemoryFault):
        pass

    with pytest.raises(virtio.memory.MemoryFault, match="refused"):
        raise Fault(1, 2, False, "test")
    assert isinstance(mem, virtio.memory.Memory)


def test_a_chain_says_what_it_holds() -> None:
    chain = virtio.split.chain.Chain(3, [memoryview(b"ab")], [], 2, 0, [(0x1000, 2, False)])
    assert repr(chain) == (
        "Chain(head=3, readable_len=2, writable_len=0, segments=[(4096, 2, False)])"
    )
