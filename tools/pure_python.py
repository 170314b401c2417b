"""Run the ring core from its Python sources although mypyc built it (``MIC_PURE_PYTHON=1``).

Python's import system prefers an extension module to the ``.py`` of the same
name, so a tree where ``tools/mypyc_build.py`` ran imports the compiled ring
core. :class:`SourceFirstFinder`, put in front of ``sys.meta_path``, makes
every ``virtio.*`` module load from its ``.py`` instead, in this process. It
must be installed before the first ``virtio`` submodule is imported; hence a
pytest plugin loaded with ``-p`` (before the entry-point plugins, which
import ``virtio``)::

    MIC_PURE_PYTHON=1 python -m pytest -p tools.pure_python tests/virtio

``make test`` runs tests/virtio a second time that way, so the pure-Python
ring core stays tested (and its coverage gate is measured there); the
benchmarks call :func:`install_from_env` before importing ``virtio``. Other
processes (``mic-host``, its cards) run what is built: ``make pure`` (or
``MIC_PURE_PYTHON=1 make install``) removes the compiled modules for them.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Sequence
from types import ModuleType

__all__ = ["SourceFirstFinder", "install", "install_from_env", "pure_requested"]

_SOURCE = (importlib.machinery.SourceFileLoader, importlib.machinery.SOURCE_SUFFIXES)


class SourceFirstFinder(importlib.abc.MetaPathFinder):
    """Finds ``virtio.*`` modules in their package's directories, sources only."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith("virtio.") or path is None:
            return None
        for entry in path:
            spec = importlib.machinery.FileFinder(entry, _SOURCE).find_spec(fullname)
            if spec is not None and spec.loader is not None:
                return spec
        return None


def pure_requested() -> bool:
    return os.environ.get("MIC_PURE_PYTHON") == "1"


def install() -> None:
    """Load ``virtio.*`` from sources from now on in this process.

    Raises:
        RuntimeError: a compiled ``virtio`` module is already imported (too late).
    """
    if any(isinstance(f, SourceFirstFinder) for f in sys.meta_path):
        return
    early = sorted(
        name
        for name, mod in list(sys.modules.items())
        if name.startswith("virtio.") and not str(getattr(mod, "__file__", ".py")).endswith(".py")
    )
    if early:
        raise RuntimeError(
            "MIC_PURE_PYTHON=1 came too late (load tools.pure_python first: pytest -p "
            f"tools.pure_python): {', '.join(early)} already compiled"
        )
    sys.meta_path.insert(0, SourceFirstFinder())


def install_from_env() -> bool:
    """:func:`install` if ``MIC_PURE_PYTHON=1``; returns whether it did."""
    if pure_requested():
        install()
        return True
    return False


# As a pytest plugin (``-p tools.pure_python``): act at import, before any test
# module or other plugin imports virtio.
install_from_env()


def pytest_report_header() -> str:
    import virtio.split.driver as drv

    kind = "compiled (mypyc)" if not (drv.__file__ or "").endswith(".py") else "pure Python"
    return f"ring core: {kind} ({drv.__file__})"
