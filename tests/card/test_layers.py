"""The card OS's own layering, read from the source (every import counted:
type-only ones, ones inside functions, ``importlib`` with a literal name).

- ``mic_card.card`` (the composition root) is imported by ``mic_card.main`` only;
- shell, agent, offload and accel depend on ``mic_card.services``, never on the card OS;
- the net driver never imports the shell; the accel queue never imports the bus;
- accel children never import ``mic_card.accel.framework``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> set[str]:
    """Every module ``path`` names in an import (absolute names only: the tree uses them)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Call):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            arg = node.args[0] if node.args else None
            if name in ("import_module", "__import__") and isinstance(arg, ast.Constant):
                out.add(str(arg.value))
    return out


def _modules() -> dict[str, set[str]]:
    mods = {}
    for f in (ROOT / "mic_card").rglob("*.py"):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = _imports(f)
    return mods


def _names(imports: set[str], target: str) -> bool:
    return any(i == target or i.startswith(target + ".") for i in imports)


MODS = _modules()


def test_the_card_os_is_imported_by_main_only() -> None:
    users = {m for m, imps in MODS.items() if _names(imps, "mic_card.card")}
    assert users == {"mic_card.main"}


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("mic_card.drivers.net", "mic_card.shell"),
        ("mic_card.accel.queue", "mic_card.bus"),
        ("mic_card.accel.commands", "mic_card.offload"),
        ("mic_card.accel.commands", "mic_card.card"),
    ],
)
def test_forbidden_arrow(module: str, forbidden: str) -> None:
    assert not _names(MODS[module], forbidden)


def test_accel_children_never_import_the_framework() -> None:
    users = {
        m
        for m, imps in MODS.items()
        if m.startswith("mic_card.accel.") and _names(imps, "mic_card.accel.framework")
    }
    assert users == set()


def test_the_accel_command_imports_only_the_shell_registry_of_the_shell() -> None:
    shell = {i for i in MODS["mic_card.accel.commands"] if _names({i}, "mic_card.shell")}
    assert shell
    assert all(_names({i}, "mic_card.shell.registry") for i in shell)
