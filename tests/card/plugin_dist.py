"""Real installed distributions for the driver plug-in tests, without pip.

:func:`make_dist` writes ``NAME-VERSION.dist-info`` (METADATA, entry_points.txt)
and the plug-in's modules into a folder; a folder on ``sys.path`` (or
``PYTHONPATH``) is exactly how ``importlib.metadata`` finds what pip installed.
"""

from __future__ import annotations

from pathlib import Path


def make_dist(
    root: Path,
    dist: str,
    entry_points: dict[str, str],
    modules: dict[str, str] | None = None,
    *,
    group: str = "mic_vop.drivers",
) -> Path:
    """Install distribution ``dist`` 1.0 into ``root`` with ``entry_points``
    (name -> ``module:attr``) in ``group`` and ``modules`` (name -> source)."""
    info = root / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    lines = [f"[{group}]", *(f"{name} = {value}" for name, value in entry_points.items())]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    for name, source in (modules or {}).items():
        (root / f"{name}.py").write_text(source)
    return root
