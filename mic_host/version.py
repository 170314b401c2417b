"""The installed version of MIC-VOP, for ``mic-host --version`` and ``micctl --version``.

Read from the package metadata (``pyproject.toml``'s ``version``, as pip
installed it), so there is one source of truth. Imports only the standard
library.
"""

from __future__ import annotations

from importlib import metadata

__all__ = ["DISTRIBUTION", "package_version"]

#: The distribution name in ``pyproject.toml``.
DISTRIBUTION = "mic-vop"


def package_version() -> str:
    """``"0.1.0"``, or ``"unknown"`` when the package is not installed (a bare checkout)."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"
