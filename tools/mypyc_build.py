"""Compile the ring core with mypyc, in place: ``make install`` runs this.

The hot modules of ``virtio`` (:data:`MODULES`: the split and packed ring
cores and the flat memory) are plain mypy-strict Python; mypyc turns them into
C extension modules that land next to their sources
(``virtio/split/driver.cpython-311-x86_64-linux-gnu.so``...) plus one shared
library holding all of them (``virtio/_ringcore__mypyc...so``). Python's
import system prefers an extension module to the ``.py`` of the same name, so
every process that imports ``virtio`` from this tree (the daemon, its cards,
the tests, the benchmarks) runs the compiled ring core. The sources stay the
reference: nothing else changes, and without the built files everything runs
as pure Python.

The same build compiles the hand-written C of :data:`C_EXTENSIONS` in place:
``transport/_pollguard.c``, which lets the event loop poll at the idle
priority (``transport/pollguard.py``; without it the loop polls as before).

Usage::

    python -m tools.mypyc_build           # build in place (a no-op when up to date)
    python -m tools.mypyc_build --clean   # remove the built modules: pure Python
    python -m tools.mypyc_build --status  # which implementation this tree runs

``MIC_PURE_PYTHON=1`` makes the build a ``--clean``. Without a C compiler or
the Python headers (Debian: ``gcc`` and ``python3-dev``) the build says so
and leaves the tree pure (exit status 0: the product works either way); a
compile error is a failure (exit status 1), and nothing half-built is left.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import os
import shutil
import sys
import sysconfig
from pathlib import Path

__all__ = [
    "C_EXTENSIONS",
    "GROUP",
    "MODULES",
    "ROOT",
    "build",
    "built_files",
    "clean",
    "main",
    "stale_sources",
    "up_to_date",
]

ROOT = Path(__file__).resolve().parent.parent

#: What is compiled: everything the per-request ring path runs (bench/ring.py's
#: profile, docs/throughput.md). Interpreted on purpose: the exceptions
#: (``virtio.memory_protocol.MemoryFault``, ``virtio.split.faults``,
#: ``virtio.errors``: interpreted code subclasses them, and a compiled
#: exception's ``__init__`` refuses an interpreted subclass) and the
#: runtime-checkable ``Memory`` protocol (mypyc cannot compile one).
MODULES = (
    "virtio/memory.py",
    "virtio/split/chain.py",
    "virtio/split/device.py",
    "virtio/split/device_base.py",
    "virtio/split/driver.py",
    "virtio/split/fence.py",
    "virtio/split/layout.py",
    "virtio/packed/device.py",
    "virtio/packed/driver.py",
    "virtio/packed/layout.py",
    "virtio/packed/state.py",
)

#: One shared library for all of them (cross-module calls stay native C calls).
GROUP = "virtio._ringcore"

#: Hand-written C extensions built beside them: module name -> source. The poll
#: guard (``transport/pollguard.py``) needs a thread that runs without the GIL.
C_EXTENSIONS = {"transport._pollguard": "transport/_pollguard.c"}

_EXT = importlib.machinery.EXTENSION_SUFFIXES


def built_files(root: Path = ROOT) -> list[Path]:
    """The extension modules in ``virtio/`` (a build's, including any left by an
    older build with another module list) and the :data:`C_EXTENSIONS`; empty:
    pure Python."""
    found = {p for suf in _EXT for p in (root / "virtio").rglob("*" + suf)}
    for name in C_EXTENSIONS:
        stem = root / name.replace(".", "/")
        found |= {p for suf in _EXT if (p := stem.with_name(stem.name + suf)).exists()}
    return sorted(found)


def stale_sources(root: Path = ROOT) -> list[str]:
    """Compiled modules whose source changed after the build (rebuild them)."""
    out = []
    for m in (*MODULES, *C_EXTENSIONS.values()):
        src = root / m
        stem = src.with_suffix("")
        for suf in _EXT:
            so = stem.with_name(stem.name + suf)
            if so.exists() and so.stat().st_mtime < src.stat().st_mtime:
                out.append(m)
    return out


def up_to_date(root: Path = ROOT) -> bool:
    """Is every module of :data:`MODULES` built, and newer than its source and this list?"""
    listed = {str(root / m.removesuffix(".py")) for m in MODULES}
    listed |= {str(root / n.replace(".", "/")) for n in C_EXTENSIONS}
    built = {str(p.with_name(p.name.split(".", 1)[0])) for p in built_files(root)}
    if built != listed | {str(root / (GROUP.replace(".", "/") + "__mypyc"))}:
        return False
    oldest = min(p.stat().st_mtime for p in built_files(root))
    sources = (*MODULES, *C_EXTENSIONS.values(), "tools/mypyc_build.py")
    newest = max((root / m).stat().st_mtime for m in sources)
    return oldest >= newest


def _toolchain_problem() -> str | None:
    """Why no extension can be built here, or None."""
    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        return f"no C compiler ({cc!r} is not on PATH; Debian: apt-get install gcc)"
    include = Path(sysconfig.get_paths()["include"])
    if not (include / "Python.h").exists():
        return f"no Python headers ({include}/Python.h; Debian: apt-get install python3-dev)"
    try:
        import mypyc  # noqa: F401
        import setuptools  # noqa: F401
    except ImportError as e:
        return f"{e.name} is not installed (make install brings it: the test extra)"
    return None


def clean(root: Path = ROOT) -> int:
    removed = built_files(root)
    for p in removed:
        p.unlink(missing_ok=True)
    shutil.rmtree(root / "build" / "mypyc", ignore_errors=True)
    return len(removed)


def build(root: Path = ROOT) -> None:
    """Compile :data:`MODULES` in place (raises on a compile error)."""
    from mypyc.build import mypycify
    from setuptools import Distribution, Extension

    clean(root)
    os.chdir(root)  # mypyc takes the mypy configuration (pyproject.toml) from here
    exts = mypycify(list(MODULES), opt_level="3", group_name=GROUP, target_dir="build/mypyc")
    exts += [
        Extension(name, [src], extra_compile_args=["-O2", "-Wall"])
        for name, src in C_EXTENSIONS.items()
    ]
    # A bare Distribution: no pyproject.toml parsing, so any setuptools will do.
    dist = Distribution({"name": "mic-vop-ringcore", "ext_modules": exts})
    cmd = dist.get_command_obj("build_ext")
    cmd.inplace = True  # type: ignore[attr-defined]
    cmd.build_temp = "build/mypyc/temp"  # type: ignore[attr-defined]
    dist.run_command("build_ext")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tools.mypyc_build", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--clean", action="store_true", help="remove the built modules (pure Python)")
    ap.add_argument("--status", action="store_true", help="say which ring core this tree runs")
    ap.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = ap.parse_args(argv)
    if args.status:
        built, stale = built_files(), stale_sources()
        if not built:
            print("ring core: pure Python (not built)")
        elif stale:
            print(f"ring core: compiled, STALE for {', '.join(stale)}: run make install")
            return 1
        else:
            print(f"ring core: compiled with mypyc ({len(built)} extension modules)")
        return 0
    if args.clean or os.environ.get("MIC_PURE_PYTHON") == "1":
        n = clean()
        why = "MIC_PURE_PYTHON=1" if not args.clean else "--clean"
        print(f"ring core: pure Python ({why}; {n} built modules removed)")
        return 0
    if not args.force and up_to_date():
        print("ring core: compiled with mypyc, up to date")
        return 0
    problem = _toolchain_problem()
    if problem is not None:
        n = clean()
        print(f"ring core: stays pure Python: {problem}", file=sys.stderr)
        return 0
    try:
        build()
    except BaseException as e:  # a mypyc or compiler error: leave nothing half-built
        clean()
        print(f"ring core: the mypyc build failed ({e!r}); nothing built", file=sys.stderr)
        return 1
    print(f"ring core: compiled with mypyc ({len(built_files())} extension modules)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
