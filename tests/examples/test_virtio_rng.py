"""examples/virtio-rng as a user installs it: a fresh venv, plain ``pip install``.

The product (from this repository) and the example project are installed into
a new virtual environment with ``pip install PATH`` (no editable install, no
``PYTHONPATH``); ``mic-host`` and ``micctl`` then run from that venv, in a
folder outside the repository, so the only way the daemon finds the ``rng``
backend, the card OS the ``virtio-rng`` driver and ``micctl run`` the app is
through the installed entry points and packages.

Skipped, saying why, when pip cannot reach a package index for the
dependencies (an offline machine without a wheel cache).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "virtio-rng"


def product_files() -> list[str]:
    """What the product's wheel is built from: pyproject, readme, packages (copied, so
    the build leaves no trace in the tree)."""
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = meta["tool"]["setuptools"]["packages"]["find"]["include"]
    return ["pyproject.toml", meta["project"]["readme"], *(p.rstrip("*") for p in packages)]


#: pip's words when it cannot get a distribution from any index.
OFFLINE = (
    "No matching distribution found",
    "Could not find a version that satisfies",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Network is unreachable",
)

pytestmark = pytest.mark.timeout(900)


@dataclass(frozen=True)
class Venv:
    root: Path
    env: dict[str, str]

    def bin(self, name: str) -> str:
        return str(self.root / "bin" / name)


def _clean_env() -> dict[str, str]:
    """This process's environment without anything that would leak our own packages."""
    drop = {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "PYTHONSTARTUP", "MIC_STATE_DIR"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONNOUSERSITE"] = "1"
    return env


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Venv:
    """A fresh venv with the product and the example installed by plain ``pip install``."""
    base = tmp_path_factory.mktemp("rng-venv")
    product = base / "mic-vop"
    product.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in product_files():
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, product / name, ignore=ignore)
        else:
            shutil.copy2(src, product / name)
    example = base / "virtio-rng"
    shutil.copytree(EXAMPLE, example, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    root = base / "venv"
    env = _clean_env()
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, env=env)
    pip = [str(root / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    done = subprocess.run(
        [*pip, str(product), str(example)], env=env, capture_output=True, text=True, timeout=800
    )
    if done.returncode != 0:
        if any(word in done.stderr for word in OFFLINE):
            pytest.skip(f"pip cannot reach a package index: {done.stderr.strip()[-300:]}")
        pytest.fail(f"pip install failed:\n{done.stdout}\n{done.stderr}")
    return Venv(root, env)


@dataclass
class Host:
    """A ``mic-host`` started from the venv, and ``micctl`` against it."""

    venv: Venv
    state_dir: Path
    cwd: Path

    async def micctl(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        argv = [self.venv.bin("micctl"), "--state-dir", str(self.state_dir), *args]
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=self.cwd,
            env=self.venv.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
        assert proc.returncode is not None
        return subprocess.CompletedProcess(argv, proc.returncode, out.decode(), err.decode())

    async def ok(self, *args: str) -> str:
        done = await self.micctl(*args)
        assert done.returncode == 0, f"micctl {' '.join(args)}: {done.stderr}"
        return done.stdout

    async def read(self, nbytes: int, device: str = "") -> dict[str, object]:
        """Run the example's card app; its JSON result."""
        args = ["run", "mic0", "mic_vop_rng.app:main", str(nbytes)]
        result: dict[str, object] = json.loads(await self.ok(*args, *([device] if device else [])))
        return result


CONFIG = """\
version = 1

[[cards]]
name = "mic0"
boot_at_start = true
card_ram = "16M"
host_ram = "4M"

[[cards.devices]]
type = "console"

[[cards.devices]]
type = "rng"
name = "entropy"
options = { max_bytes = 65536, period = 0.5 }
"""


@asynccontextmanager
async def mic_host(venv: Venv, tmp_path: Path) -> AsyncIterator[Host]:
    state_dir = Path(tempfile.mkdtemp(prefix="micrng", dir="/tmp"))  # a short socket path
    cwd = tmp_path / "elsewhere"  # not the repository: nothing importable by accident
    cwd.mkdir()
    cfg = cwd / "mic.toml"
    cfg.write_text(CONFIG)
    proc = await asyncio.create_subprocess_exec(
        venv.bin("mic-host"), "--state-dir", str(state_dir), "--config", str(cfg),
        cwd=cwd, env=venv.env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    host = Host(venv, state_dir, cwd)
    try:
        deadline = time.monotonic() + 60
        while (await host.micctl("ping")).returncode != 0:
            assert proc.returncode is None, "mic-host exited"
            assert time.monotonic() < deadline, "mic-host did not answer within 60 s"
            await asyncio.sleep(0.2)
        await host.ok("wait", "mic0", "online", "--timeout", "60")
        yield host
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        _print_logs(state_dir)  # pytest shows them if the test failed
        shutil.rmtree(state_dir, ignore_errors=True)


def _print_logs(state_dir: Path) -> None:
    for log in sorted(state_dir.glob("*.log")):
        print(f"--- {log.name} (tail) ---", *log.read_text().splitlines()[-40:], sep="\n")


def test_installed_not_found_on_a_path(venv: Venv, tmp_path: Path) -> None:
    """The product and the example come from the venv's site-packages."""
    code = "import mic_card, mic_vop_rng; print(mic_card.__file__); print(mic_vop_rng.__file__)"
    found = subprocess.run(
        [venv.bin("python"), "-c", code],
        cwd=tmp_path, env=venv.env, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert len(found) == 2
    assert all(path.startswith(str(venv.root / "lib")) for path in found), found


@pytest.mark.asyncio
async def test_rng_from_a_pip_installed_example(venv: Venv, tmp_path: Path) -> None:
    async with mic_host(venv, tmp_path) as host:
        # the device from the TOML config, on the card as virtio4-0
        first = await host.read(64)
        second = await host.read(64)
        assert first["device"] == second["device"] == "virtio4-0"
        assert first["bytes"] == second["bytes"] == 64
        assert isinstance(first["hex"], str)
        assert len(first["hex"]) == 128
        assert first["hex"] != second["hex"]
        # a read larger than one buffer, with the monobit sanity check on the card
        big = await host.read(10_000)
        assert big["bytes"] == 10_000

        # a second rng, hot-attached: a tight rate bound (1 KiB per 0.5 s)
        attached = await host.ok(
            "attach", "mic0", "rng", "--opt", "max_bytes=1024", "--opt", "max_request=256"
        )
        assert attached.strip() == "virtio4-1"
        t0 = time.monotonic()
        slow = await host.read(4096, "virtio4-1")
        elapsed = time.monotonic() - t0
        assert slow["device"] == "virtio4-1"
        assert slow["bytes"] == 4096
        assert elapsed >= 3.0  # 4 KiB at 1 KiB per (default) 1 s period: 3 waits at least

        status = json.loads(await host.ok("status", "mic0", "--json"))
        types = {d["name"]: d["type"] for d in status["cards"][0]["devices"]}
        assert types["entropy"] == "rng"
        assert sum(t == "rng" for t in types.values()) == 2

        # bad input: a count the driver refuses, an unknown device: clear errors
        bad = await host.micctl("run", "mic0", "mic_vop_rng.app:main", str(2 << 20))
        assert bad.returncode != 0
        assert "read of 2097152 bytes (0..1048576)" in bad.stderr
        bad = await host.micctl("run", "mic0", "mic_vop_rng.app:main", "8", "hvc0")
        assert bad.returncode != 0
        assert "mic0: hvc0 is not a bound virtio-rng device" in bad.stderr
        bad = await host.micctl("attach", "mic0", "rng", "--opt", "queue_size=3")
        assert bad.returncode != 0
        assert "queue_size 3 is not a power of two" in bad.stderr

        await host.ok("shutdown", "mic0", "--wait")
        card_log = (host.state_dir / "mic0-card.log").read_text()
        assert "card driver plug-in 'virtio-rng' loaded for device type 4" in card_log
        assert "entry point mic_vop_rng.driver:RngDriver (mic-vop-rng 0.1.0)" in card_log
