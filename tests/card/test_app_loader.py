"""The card's app loader in one process: code collected by the client
(:func:`mic_host.client.apps.resolve_app`) loaded by :class:`mic_card.apps.AppLoader`.
(The same through real processes: tests/integration/test_apps.py.)"""

from __future__ import annotations

import asyncio
import sys
import textwrap
from pathlib import Path

import pytest

from mic_card.apps import AppLoader, jsonable
from mic_host.client.apps import resolve_app
from transport.appcode import AppCode
from virtio.errors import LocalProtocolError, RemoteProtocolError


def project(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))
    return root


def load(spec: str, cwd: Path) -> tuple[AppLoader, object]:
    resolved = resolve_app(spec, cwd=cwd)
    assert resolved.code is not None
    code = AppCode.from_wire(resolved.code.to_wire())  # as it travels
    loader = AppLoader(code, resolved.app)
    return loader, loader.function(resolved.app.rpartition(":")[2])


PKG = {
    "lib/__init__.py": "from .core import *\n",
    "lib/core.py": """
        from __future__ import annotations

        from dataclasses import dataclass, field

        __all__ = ["Box", "make"]

        @dataclass
        class Box:
            items: list[int] = field(default_factory=list)

        def make() -> Box:
            return Box([1])
        """,
    "lib/apps.py": """
        import lib
        from . import core
        from lib.core import make

        async def main(card):
            return [make().items, lib.Box is core.Box, __name__]
        """,
}


def test_a_package_loads_without_touching_sys_modules(tmp_path: Path) -> None:
    root = project(tmp_path, PKG)
    resolve_app("lib.apps:main", cwd=root)  # the client's own imports (sysconfig...)
    before = set(sys.modules)
    loader, fn = load("lib.apps:main", root)
    assert asyncio.run(fn(None)) == [[1], True, "lib.apps"]  # type: ignore[operator]
    assert set(sys.modules) == before
    assert sorted(loader.modules) == ["lib", "lib.apps", "lib.core"]


def test_two_loads_are_independent_and_fresh(tmp_path: Path) -> None:
    counter = "N = []\nasync def main(card):\n    N.append(1)\n    return ('a', len(N))\n"
    a = project(tmp_path / "a", {"m.py": counter})
    b = project(tmp_path / "b", {"m.py": "async def main(card):\n    return 'b'\n"})
    _, fa = load("m:main", a)
    _, fb = load("m:main", b)
    _, fa2 = load("m:main", a)
    assert asyncio.run(fa(None)) == ("a", 1)  # type: ignore[operator]
    assert asyncio.run(fa(None)) == ("a", 2)  # type: ignore[operator]  # one run: one module
    assert asyncio.run(fb(None)) == "b"  # type: ignore[operator]
    assert asyncio.run(fa2(None)) == ("a", 1)  # type: ignore[operator]
    (a / "m.py").write_text("async def main(card):\n    return 'edited'\n")
    _, fa3 = load("m:main", a)
    assert asyncio.run(fa3(None)) == "edited"  # type: ignore[operator]


def test_only_statically_imported_project_modules_are_sent(tmp_path: Path) -> None:
    root = project(
        tmp_path,
        {
            "app.py": "import json\nimport helper\nimport pytest\nasync def main(card):\n"
            "    import late\n    return late.X\n",
            "helper.py": "",
            "late.py": "X = 1\n",
            "unused.py": "",
        },
    )
    resolved = resolve_app("app:main", cwd=root)
    assert resolved.code is not None
    assert [m.name for m in resolved.code.modules] == ["app", "helper", "late"]
    assert resolve_app("json:loads", cwd=root).code is None  # the installed environment
    assert resolve_app("mic_card.apps:load_app", cwd=root).code is None


def test_bad_specs_and_files_name_the_app(tmp_path: Path) -> None:
    with pytest.raises(LocalProtocolError, match="app 'nope': expected module:function"):
        resolve_app("nope", cwd=tmp_path)
    with pytest.raises(LocalProtocolError, match=r"app 'x/y\.py:main': no file"):
        resolve_app("x/y.py:main", cwd=tmp_path)
    with pytest.raises(RemoteProtocolError, match="not among the modules sent"):
        AppCode.from_wire({"module": "a", "modules": []})


def test_results_must_be_json() -> None:
    assert jsonable({"b": b"\x01", "t": (1, 2.5, None)}, "a:b") == {"b": "01", "t": [1, 2.5, None]}
    with pytest.raises(LocalProtocolError, match=r"result\['x'\] is set"):
        jsonable({"x": {1}}, "a:b")
    with pytest.raises(LocalProtocolError, match=r"result is float nan"):
        jsonable(float("nan"), "a:b")
