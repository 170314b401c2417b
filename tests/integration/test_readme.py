"""README.md's Python snippets, run as written, so they cannot drift.

Every ```python block of the README is either a file of the user project of
the quick start (its first line is ``# path/to/file.py...``), written into a
fresh project folder outside the repository, or a script run on its own. The
project's tests are run by a separate ``pytest`` started from *another*
folder (the plugin from the installed entry point, no ``PYTHONPATH``); its
script and the README's ``micctl run`` lines run from the project folder.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import sys
from pathlib import Path

import pytest

from tests.integration.helpers import REPO, Done, booted, daemon, eventually

README = REPO / "README.md"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.M | re.S)
_FILE = re.compile(r"^# ([\w./-]+\.py)\b")


def python_blocks() -> list[str]:
    return _BLOCK.findall(README.read_text())


def project_files() -> dict[str, str]:
    return {m.group(1): b for b in python_blocks() if (m := _FILE.match(b))}


def scripts() -> list[str]:
    return [b for b in python_blocks() if not _FILE.match(b)]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MIC_STATE_DIR")}


async def run(*argv: str, cwd: Path, timeout: float = 120.0) -> Done:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        env=_env(),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(timeout):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return Done(proc.returncode, out.decode(), err.decode())


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "myproject"
    files = project_files()
    assert set(files) == {"tests/apps.py", "tests/test_card.py", "scripts/hello.py"}
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_the_readme_layout_matches_its_snippets() -> None:
    text = README.read_text()
    for name in project_files():
        assert Path(name).name in text.split("## Your own project")[1].split("```python")[0]


@pytest.mark.asyncio
async def test_the_project_tests_pass_from_any_folder(project: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = await run(
        sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
        str(project / "tests"), cwd=elsewhere,
    )  # fmt: skip
    assert r.rc == 0, r
    assert "2 passed" in r.out, r


@pytest.mark.asyncio
async def test_the_script_runs(project: Path) -> None:
    r = await run(sys.executable, "scripts/hello.py", cwd=project)
    assert r.rc == 0, r
    first, second = r.out.splitlines()
    assert first == "{'card': 'mic0', 'app': 'apps:write_hello', 'value': '6869'}"
    assert "did not finish on mic0 in 1s: cancelled it" in second


@pytest.mark.asyncio
async def test_the_micctl_lines_run_from_the_project(project: Path, state_dir: Path) -> None:
    text = README.read_text().split("## Your own project")[1]
    (hello,) = re.findall(r"^micctl run mic0 tests/apps\.py:write_hello.*?(?=\s+#)", text, re.M)
    micctl = [sys.executable, "-m", "mic_host.micctl", "--state-dir", str(state_dir)]
    async with daemon(state_dir) as client:
        card = await booted(client)
        r = await run(*micctl, *shlex.split(hello)[1:], cwd=project)
        assert (r.rc, r.out) == (0, "686579\n"), r
        proc = await asyncio.create_subprocess_exec(
            *micctl, "run", "mic0", "tests/apps.py:wait_forever", cwd=project, env=_env(),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        (entry,) = await eventually(card.apps, within=10, what="wait_forever is listed")
        r = await run(*micctl, "apps", "mic0", cwd=project)
        assert str(entry["id"]) in r.out
        assert "apps:wait_forever" in r.out
        r = await run(*micctl, "kill", "mic0", str(entry["id"]), cwd=project)
        assert r.rc == 0, r
        assert await asyncio.wait_for(proc.wait(), 10) == 1  # its run reports cancelled


@pytest.mark.asyncio
@pytest.mark.parametrize("index", range(len(scripts())))
async def test_the_other_snippets_run(index: int, tmp_path: Path) -> None:
    script = tmp_path / "snippet.py"
    script.write_text(scripts()[index])
    r = await run(sys.executable, str(script), cwd=tmp_path)
    assert r.rc == 0, r
