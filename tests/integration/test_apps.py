"""Card apps from the caller's project, through real processes.

Every app here lives in a temporary project folder outside the repository,
on no ``sys.path`` of the daemon or the card: it reaches the card only
because ``micctl run`` / ``card.run`` send its code (mic_host/client/apps.py,
mic_card/apps.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from mic_host.client import CardClient
from mic_host.client.apps import AppCodeTooLarge, AppError, resolve_app
from tests.integration.helpers import Done, booted, daemon, eventually
from transport.appcode import MAX_APP_CODE
from virtio.errors import LocalProtocolError, MicError, MicTimeoutError


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


async def micctl_in(cwd: Path, state_dir: Path, *args: str, timeout: float = 30.0) -> Done:
    """``micctl`` run from ``cwd`` (the user's project folder)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mic_host.micctl", "--state-dir", str(state_dir), *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=cwd,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )  # fmt: skip
    async with asyncio.timeout(timeout):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return Done(proc.returncode, out.decode(), err.decode())


PROJECT = {
    "mymod.py": """
        import helper

        async def main(card, x="none"):
            return {"card": card.name, "x": x, "helper": helper.VALUE, "raw": b"hi"}
        """,
    "helper.py": "VALUE = 'from the helper'\n",
    "scripts/tool.py": """
        import sys

        async def main(card):
            return [card.name, "tool", "mymod" in sys.modules]
        """,
    "pkg/__init__.py": "NAME = 'pkg'\n",
    "pkg/util.py": "def twice(x):\n    return 2 * x\n",
    "pkg/sub/__init__.py": "",
    "pkg/sub/core.py": """
        from dataclasses import dataclass

        from .. import util
        from ..util import twice
        from . import leaf

        @dataclass
        class Point:
            x: int

        async def main(card, n):
            import pkg

            return {"n": twice(int(n)), "u": util.twice(1), "leaf": leaf.LEAF,
                    "pkg": pkg.NAME, "point": Point(3).x}
        """,
    "pkg/sub/leaf.py": "LEAF = 'leaf'\n",
    "sleeper.py": """
        import asyncio

        async def main(card, seconds):
            await asyncio.sleep(float(seconds))
            return "woke up"
        """,
    "failing.py": """
        from helper import VALUE

        def lookup(d):
            return d["missing"]

        async def main(card):
            return lookup({"present": VALUE})
        """,
    "broken.py": "async def main(card):\n    return (1,\n\ndef (:\n",
    "noimport.py": "import no_such_module_anywhere\n\nasync def main(card):\n    return 1\n",
    "notjson.py": "async def main(card):\n    return {'ok': [1, object()]}\n",
    "notasync.py": "def main(card):\n    return 1\n",
    "bigresult.py": "async def main(card):\n    return 'x' * (2 << 20)\n",
    "exits.py": "import sys\n\nasync def main(card):\n    sys.exit(3)\n",
    "probe.py": """
        import sys

        async def main(card, *names):
            return [n for n in names if n in sys.modules]
        """,
}


@pytest_asyncio.fixture
async def card(state_dir: Path) -> AsyncIterator[CardClient]:
    async with daemon(state_dir) as client:
        yield await booted(client)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return write(tmp_path / "project", PROJECT)


@pytest.mark.asyncio
async def test_micctl_runs_apps_from_the_current_folder(
    card: CardClient, project: Path, state_dir: Path
) -> None:
    r = await micctl_in(project, state_dir, "run", "mic0", "mymod:main", "42")
    assert r.rc == 0, r
    assert json.loads(r.out) == {
        "card": "mic0", "x": "42", "helper": "from the helper", "raw": "6869"
    }  # fmt: skip
    r = await micctl_in(project, state_dir, "run", "mic0", "scripts/tool.py:main")
    assert (r.rc, json.loads(r.out)) == (0, ["mic0", "tool", False]), r
    r = await micctl_in(
        project / "scripts", state_dir, "run", "mic0", "../pkg/sub/core.py:main", "4"
    )
    assert r.rc == 0, r
    assert json.loads(r.out)["n"] == 8
    # from elsewhere, the module is not found where the caller is: a clear error
    r = await micctl_in(project / "pkg", state_dir, "run", "mic0", "mymod:main")
    assert r.rc == 1
    assert r.err.strip().startswith("micctl: app 'mymod:main': no module named 'mymod'"), r


@pytest.mark.asyncio
async def test_library_runs_modules_files_and_packages(
    card: CardClient, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(project)
    assert (await card.run("mymod:main", 7))["value"]["x"] == 7
    expected = {"n": 10, "u": 2, "leaf": "leaf", "pkg": "pkg", "point": 3}
    assert (await card.run("pkg.sub.core:main", 5))["value"] == expected
    assert (await card.run("pkg/sub/core.py:main", 5))["value"] == expected
    # nothing the apps loaded stayed in the card's sys.modules
    names = ["mymod", "helper", "pkg", "pkg.sub", "pkg.sub.core", "scripts", "tool", "probe"]
    assert (await card.run("probe:main", *names))["value"] == []


@pytest.mark.asyncio
async def test_an_edited_app_runs_its_new_code(card: CardClient, tmp_path: Path) -> None:
    proj = write(tmp_path / "p", {"ver.py": "async def main(card):\n    return 1\n"})
    assert (await card.run("ver:main", cwd=str(proj)))["value"] == 1
    (proj / "ver.py").write_text("async def main(card, extra=0):\n    return 2 + extra\n")
    assert (await card.run("ver:main", 10, cwd=str(proj)))["value"] == 12


@pytest.mark.asyncio
async def test_same_named_modules_from_two_projects_run_concurrently(
    card: CardClient, tmp_path: Path
) -> None:
    app = """
        import asyncio
        import common

        STATE = []

        async def main(card, delay):
            STATE.append(common.WHO)
            await asyncio.sleep(delay)
            return [common.WHO, len(STATE)]
        """
    a = write(tmp_path / "a", {"same.py": app, "common.py": "WHO = 'a'\n"})
    b = write(tmp_path / "b", {"same.py": app, "common.py": "WHO = 'b'\n"})
    runs = [card.run("same:main", 0.5 - i * 0.1, cwd=str(p)) for i, p in enumerate((a, b, a))]
    results = [r["value"] for r in await asyncio.gather(*runs)]
    assert results == [["a", 1], ["b", 1], ["a", 1]]  # fresh module state per run


@pytest.mark.asyncio
async def test_failures_come_back_with_the_card_traceback(
    card: CardClient, project: Path, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(project)
    with pytest.raises(AppError) as info:
        await card.run("failing:main")
    e = info.value
    assert str(e).startswith("app failing:main failed on mic0: KeyError: 'missing'")
    assert e.traceback is not None
    assert f'File "{project / "failing.py"}", line 5, in lookup' in e.traceback
    assert 'return d["missing"]' in e.traceback
    assert "mic_card" not in e.traceback  # starts at the app's own frame

    r = await micctl_in(project, state_dir, "run", "mic0", "failing:main")
    assert r.rc == 1
    *tb, last = r.err.splitlines()
    assert last == "micctl: app failing:main failed on mic0: KeyError: 'missing'"
    assert tb[0] == "Traceback (most recent call last):"
    assert '    return d["missing"]' in tb

    with pytest.raises(AppError, match=r"app broken:main failed to load: SyntaxError") as info:
        await card.run("broken:main")
    assert info.value.traceback is not None
    assert f'File "{project / "broken.py"}", line 4' in info.value.traceback
    with pytest.raises(AppError, match=r"noimport:main failed to load: ModuleNotFoundError"):
        await card.run("noimport:main")
    with pytest.raises(AppError, match=r"not JSON: result\['ok'\]\[1\] is object"):
        await card.run("notjson:main")
    r = await micctl_in(project, state_dir, "run", "mic0", "notjson:main")
    assert r.rc == 1
    assert "returned a value that is not JSON" in r.err
    with pytest.raises(MicError, match="main is not an async function"):
        await card.run("notasync:main")
    with pytest.raises(LocalProtocolError, match="no module named 'nothere'"):
        await card.run("nothere:main")
    with pytest.raises(MicError, match="bigresult:main: its result cannot be sent"):
        await card.run("bigresult:main")
    with pytest.raises(AppError, match="exits:main failed on mic0: SystemExit: 3"):
        await card.run("exits:main")
    # the card carries on
    assert (await card.run("mymod:main"))["value"]["card"] == "mic0"


@pytest.mark.asyncio
async def test_code_over_the_limit_is_refused_naming_the_app(
    card: CardClient, tmp_path: Path, state_dir: Path
) -> None:
    big = "# " + "x" * 1000 + "\n"
    proj = write(
        tmp_path / "big",
        {"huge.py": "import filler\n\nasync def main(card):\n    return 1\n",
         "filler.py": big * (MAX_APP_CODE // len(big) + 1)},
    )  # fmt: skip
    with pytest.raises(AppCodeTooLarge, match=r"app 'huge:main': its code is \d+ KiB in 2 modules"):
        resolve_app("huge:main", cwd=proj)
    with pytest.raises(AppCodeTooLarge, match="over the 512 KiB a run may send"):
        await card.run("huge:main", cwd=str(proj))
    r = await micctl_in(proj, state_dir, "run", "mic0", "huge:main")
    assert r.rc == 1
    assert "filler.py" in r.err
    assert "over the 512 KiB" in r.err


@pytest.mark.asyncio
async def test_apps_are_listed_killed_and_cancelled(
    card: CardClient, project: Path, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(project)

    async def running() -> list[dict[str, object]]:
        return await card.apps()

    # micctl apps / micctl kill: the run reports cancelled
    run = asyncio.create_task(card.run("sleeper:main", 60))
    (entry,) = await eventually(running, within=10, what="the sleeper is listed")
    assert entry["app"] == "sleeper:main"
    r = await micctl_in(project, state_dir, "apps", "mic0")
    assert r.rc == 0, r
    header, row = r.out.splitlines()
    assert header.split() == ["ID", "APP", "STARTED", "ELAPSED"]
    assert row.split()[:2] == [str(entry["id"]), "sleeper:main"]
    r = await micctl_in(project, state_dir, "kill", "mic0", str(entry["id"]))
    assert (r.rc, r.out) == (0, f"cancelled app {entry['id']} sleeper:main\n"), r
    with pytest.raises(MicError, match=r"app sleeper:main \(id \d+\) was cancelled on mic0"):
        await run
    assert await card.apps() == []
    r = await micctl_in(project, state_dir, "kill", "mic0", str(entry["id"]))
    assert r.rc == 1
    assert f"no app {entry['id']} is running on mic0" in r.err

    # cancelling card.run() cancels the app on the card
    run = asyncio.create_task(card.run("sleeper:main", 60))
    await eventually(running, within=10, what="the sleeper is listed")
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    await eventually(lambda: _none(card), within=10, what="the cancelled app is gone")

    # so does a timeout
    with pytest.raises(MicTimeoutError, match=r"did not finish on mic0 in 0\.5s"):
        await card.run("sleeper:main", 60, timeout=0.5)
    await eventually(lambda: _none(card), within=10, what="the timed-out app is gone")
    r = await micctl_in(project, state_dir, "run", "--timeout", "0.5", "mic0", "sleeper:main", "60")
    assert r.rc == 1
    assert "did not finish on mic0 in 0.5s" in r.err

    # Ctrl-C on micctl run
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mic_host.micctl", "--state-dir", str(state_dir),
        "run", "mic0", "sleeper:main", "60",
        cwd=project, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    await eventually(running, within=10, what="micctl's app is listed")
    proc.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 130, err
    await eventually(lambda: _none(card), within=10, what="the interrupted app is gone")
    assert (await card.run("sleeper:main", 0))["value"] == "woke up"


async def _none(card: CardClient) -> bool:
    return await card.apps() == []
