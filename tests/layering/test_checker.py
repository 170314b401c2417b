"""The layering checker on small synthetic trees: it sees every kind of import, and it fails.

Each tree is written to ``tmp_path``; nothing is imported. The project's own
tree is checked in :mod:`tests.layering.test_tree`.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tests.layering.checker import Barrier, Report, Rules, check, scan

#: two packages: ``core`` (the bottom, no event loop) and ``app`` on top of it
RULES = Rules(
    packages={"core": frozenset(), "app": frozenset({"core"})},
    layers={
        "core": (("base",), ("ring", "proto*"), ("__init__",)),
        "app": (("low",), ("mid", "mid2"), ("client",), ("top", "__init__")),
    },
    forbidden_outside={"core": frozenset({"asyncio", "socket"})},
    barriers=(Barrier("app", ("client",), ("mid",), "the client never imports mid"),),
)

CLEAN = {
    "core/__init__.py": "from core.ring import Ring\n",
    "core/base.py": "import struct\nimport threading\n",
    "core/ring.py": "from core.base import *\nfrom . import base\n",
    "core/protocol.py": "from .ring import Ring\nimport core.base\n",
    "app/__init__.py": "from app import top\n",
    "app/low.py": "import asyncio\nimport socket\nfrom core import ring\n",
    "app/mid/__init__.py": "from .device import Device\n",
    "app/mid/device.py": (
        "from typing import TYPE_CHECKING\n"
        "from .. import low\n"
        "if TYPE_CHECKING:\n"
        "    from app.low import X\n"
    ),
    "app/mid2.py": "X = 1\n",
    "app/client.py": "import importlib\nfrom app import low\n",
    "app/top.py": (
        "import importlib\n"
        "from app import mid, client\n"
        "def late():\n"
        "    importlib.import_module('app.mid.device')\n"
        "    return __import__('core.protocol')\n"
    ),
}


def tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def report(root: Path, files: dict[str, str], rules: Rules = RULES) -> Report:
    return check(scan(tree(root, files), rules.packages), rules)


def only(report: Report, section: str) -> list[str]:
    """The lines of ``section``, after checking that every other section is empty."""
    others = {t: v for t, v in report.sections().items() if t != section and v}
    assert not others, report.render()
    lines = report.sections()[section]
    assert lines, f"expected {section!r}, got none"
    return lines


CYCLES = "import cycles between files"


def test_a_clean_tree_passes(tmp_path: Path) -> None:
    result = report(tmp_path, CLEAN)
    assert result.ok, result.render()
    assert result.render() == "no violation"


def test_every_kind_of_import_is_an_arrow(tmp_path: Path) -> None:
    graph = scan(tree(tmp_path, CLEAN), RULES.packages)
    edges = graph.edges()
    assert set(edges["app.top"]) == {"app.mid", "app.client", "app.mid.device", "core.protocol"}
    # relative imports, `from pkg import submodule` (the submodule, not pkg)
    assert set(edges["core.ring"]) == {"core.base"}
    assert set(edges["app.mid.device"]) == {"app.low"}
    assert set(edges["app.low"]) == {"core.ring"}
    assert set(edges["app"]) == {"app.top"}
    kinds = {(i.importer, i.target, i.line): i.kinds for i in graph.imports}
    assert kinds["app.top", "app.mid.device", 4] == {"importlib", "in function"}
    assert kinds["app.top", "core.protocol", 5] == {"importlib", "in function"}
    assert kinds["app.mid.device", "app.low", 2] == frozenset()
    assert kinds["app.mid.device", "app.low", 4] == {"TYPE_CHECKING"}
    assert {"asyncio", "socket", "struct", "threading"} <= {i.target for i in graph.imports}


def test_decorators_and_defaults_run_where_the_function_is_defined(tmp_path: Path) -> None:
    files = CLEAN | {
        "core/proto_x.py": """\
            import importlib
            @importlib.import_module("core.base").deco
            def f(x=__import__("core.ring"), y=lambda: __import__("core.protocol")):
                import core.base
            """
    }
    graph = scan(tree(tmp_path, files), RULES.packages)
    found = {(i.target, i.line, i.kinds) for i in graph.imports if i.importer == "core.proto_x"}
    assert found == {
        ("importlib", 1, frozenset()),
        ("core.base", 2, frozenset({"importlib"})),
        ("core.ring", 3, frozenset({"importlib"})),
        ("core.protocol", 3, frozenset({"importlib", "in function"})),
        ("core.base", 4, frozenset({"in function"})),
    }


def test_a_two_file_cycle_is_reported(tmp_path: Path) -> None:
    files = CLEAN | {"app/mid2.py": "from app.mid import device\n"}
    files["app/mid/device.py"] = "import app.mid2\n"
    (cycle,) = only(report(tmp_path, files), CYCLES)
    assert cycle.startswith("cycle of 2 modules: app.mid.device, app.mid2\n")
    assert "e.g. app.mid.device -> app.mid2 -> app.mid.device" in cycle
    assert "app.mid.device -> app.mid2  app/mid/device.py:1\n" in cycle
    assert "app.mid2 -> app.mid.device  app/mid2.py:1" in cycle


def test_a_type_checking_only_cycle_is_reported(tmp_path: Path) -> None:
    files = CLEAN | {
        "core/protocol.py": """\
            from typing import TYPE_CHECKING
            from core.ring import Ring
            """,
        "core/ring.py": """\
            import typing
            if typing.TYPE_CHECKING:
                from core.protocol import Message
            """,
    }
    (cycle,) = only(report(tmp_path, files), CYCLES)
    assert "cycle of 2 modules: core.protocol, core.ring" in cycle
    assert "core.ring -> core.protocol  core/ring.py:3 [TYPE_CHECKING]" in cycle


def test_an_in_function_import_cycle_is_reported(tmp_path: Path) -> None:
    files = CLEAN | {
        "core/ring.py": """\
            class Ring:
                async def run(self) -> None:
                    from core import protocol
            """,
    }
    (cycle,) = only(report(tmp_path, files), CYCLES)
    assert "core.ring -> core.protocol  core/ring.py:3 [in function]" in cycle
    assert "core.protocol -> core.ring  core/protocol.py:1\n" in cycle


@pytest.mark.parametrize(
    "call",
    [
        "importlib.import_module('app.client')",
        "import_module('.client', 'app')",
        "import_module('.client', package=__package__)",
        "__import__('app.client')",
    ],
)
def test_an_importlib_literal_cycle_is_reported(tmp_path: Path, call: str) -> None:
    files = CLEAN | {
        "app/client.py": "from app.mid2 import x\n",
        "app/mid2.py": f"import importlib\nfrom importlib import import_module\n_M = {call}\n",
    }
    # client -> mid2 is down, mid2 -> client is up: the cycle and the upward arrow both show
    result = report(tmp_path, files)
    (cycle,) = result.cycles
    assert "app.mid2 -> app.client  app/mid2.py:3 [importlib]" in cycle
    assert [line.split("  ")[0] for line in result.layer_arrows] == ["app.mid2 -> app.client"]


def test_a_computed_dynamic_import_is_not_an_arrow(tmp_path: Path) -> None:
    files = CLEAN | {
        "core/base.py": "import importlib\nNAME = 'app'\nimportlib.import_module(NAME)\n"
    }
    assert report(tmp_path, files).ok


def test_an_upward_arrow_between_layers_is_reported(tmp_path: Path) -> None:
    files = CLEAN | {"app/low.py": "def f():\n    from app.mid2 import X\n"}
    (line,) = only(report(tmp_path, files), "imports pointing up the declared layers")
    assert line == (
        "app.low -> app.mid2  app/low.py:2 [in function]: layer 0 (low) imports layer 1 (mid, mid2)"
    )


def test_imports_inside_one_layer_are_allowed(tmp_path: Path) -> None:
    files = CLEAN | {"app/mid2.py": "from app.mid.device import Device\n"}
    assert report(tmp_path, files).ok


def test_a_forbidden_package_arrow_is_reported(tmp_path: Path) -> None:
    files = CLEAN | {
        "core/base.py": "import typing\nif typing.TYPE_CHECKING:\n    import app.mid2\n"
    }
    (line,) = only(report(tmp_path, files), "imports between packages that the rules forbid")
    assert line == (
        "core.base -> app.mid2  core/base.py:3 [TYPE_CHECKING]: "
        "core may import no other project package"
    )


def test_an_arrow_to_a_package_not_on_the_allowed_list_is_reported(tmp_path: Path) -> None:
    rules = Rules(packages={**RULES.packages, "other": frozenset({"core"})})
    files = CLEAN | {"other/__init__.py": "", "other/x.py": "from app import top\n"}
    (line,) = only(report(tmp_path, files, rules), "imports between packages that the rules forbid")
    assert line == "other.x -> app.top  other/x.py:1: other may import only core"


def test_a_forbidden_outside_module_is_reported(tmp_path: Path) -> None:
    files = CLEAN | {"core/ring.py": "import asyncio.events\nfrom socket import socketpair\n"}
    lines = only(report(tmp_path, files), "outside modules a package must not import")
    assert lines == [
        "core.ring -> asyncio.events  core/ring.py:1: core must not import asyncio",
        "core.ring -> socket  core/ring.py:2: core must not import socket",
    ]


def test_a_barrier_is_reported(tmp_path: Path) -> None:
    files = CLEAN | {"app/client.py": "from app.mid import Device\n"}
    (line,) = only(report(tmp_path, files), "imports through a barrier")
    assert line == "app.client -> app.mid  app/client.py:1: the client never imports mid"


def test_a_module_in_no_layer_is_reported(tmp_path: Path) -> None:
    files = CLEAN | {"app/extra/__init__.py": "", "core/proto2.py": ""}
    (line,) = only(report(tmp_path, files), "modules in no declared layer")
    assert line.startswith("app.extra (app/extra/__init__.py) matches no layer of app: add")
    assert "tests/layering/rules.py" in line


def test_the_most_specific_pattern_wins(tmp_path: Path) -> None:
    rules = Rules(
        packages=RULES.packages,
        layers={**RULES.layers, "app": (("low", "mid.device"), *RULES.layers["app"][1:])},
    )
    # mid/__init__ -> low is fine; mid.device is now in the lowest layer, so the
    # client (above) may import it, but mid.device may no longer import mid
    files = CLEAN | {"app/mid/device.py": "from app.mid import helper\n", "app/mid/helper.py": ""}
    lines = report(tmp_path, files, rules).layer_arrows
    assert [line.split("  ")[0] for line in lines] == ["app.mid.device -> app.mid.helper"]


def test_equally_specific_patterns_in_two_layers_are_reported(tmp_path: Path) -> None:
    rules = Rules(
        packages=RULES.packages, layers={"core": (("b*",), ("*e",), ("ring", "proto*", "__init__"))}
    )
    (line,) = only(report(tmp_path, CLEAN, rules), "modules matching two layers equally")
    assert line.startswith("core.base (core/base.py) matches layers [0, 1] of core equally")


def test_a_relative_import_above_the_top_is_refused(tmp_path: Path) -> None:
    tree(tmp_path, CLEAN | {"core/base.py": "from ... import x\n"})
    with pytest.raises(ValueError, match=r"core.base:1: cannot resolve '...'"):
        scan(tmp_path, RULES.packages)


def test_cycles_are_found_without_recursion(tmp_path: Path) -> None:
    """A long chain (deeper than the recursion limit would allow) closed into one cycle."""
    n = 1500
    files = {"core/__init__.py": ""}
    files |= {f"core/m{i}.py": f"import core.m{(i + 1) % n}\n" for i in range(n)}
    (cycle,) = report(tmp_path, files, Rules(packages={"core": frozenset()})).cycles
    assert cycle.startswith(f"cycle of {n} modules: ")
