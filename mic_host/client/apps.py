"""Card apps from the caller's project: find the app, collect the code the card needs.

``card.run("mymod:main")`` (and ``micctl run``) runs code of *your* project on
the card. This module resolves the app where you are, the way ``python -m``
would, and collects its sources (:func:`resolve_app`); the card loads them
fresh for that run (:mod:`mic_card.apps`). Forms of an app:

- ``module:function``: ``module`` as ``python -m`` finds it from here: the
  current folder first, then ``sys.path`` (a module this process already
  imported is taken from where it was imported, so ``f"{__name__}:main"`` in
  a test module works whatever pytest's import mode);
- ``path/to/file.py:function``: that file; if its folder is a package
  (``__init__.py``), the module is named from the outermost package, so its
  relative imports work;
- a module inside a package (``mypkg.apps:main``): the package's
  ``__init__.py`` files travel with it.

What is sent: the app's module, its parent packages, and every module they
import with an ``import`` statement (anywhere in the file, followed
transitively) that lives in your project. Modules of the installed
environment (the standard library, site-packages, MIC-VOP's own packages
``virtio``, ``transport``, ``mic_host``, ``mic_card``) are not sent: the card
runs in the same environment as the daemon and imports them itself. A module
imported only by name at run time (``importlib.import_module("x")``) is not
seen; import it with a statement. At most :data:`~transport.appcode.MAX_APP_CODE`
bytes of source per run (:class:`AppCodeTooLarge` otherwise).

Parsing is cached per file (by modification time and size), so a suite that
runs hundreds of apps pays a ``stat`` and a read per file and run.

Also :class:`AppError`: an app that raised on the card, with its card-side
traceback. Part of the client library: imports ``transport.appcode`` and
``virtio.errors`` only.
"""

from __future__ import annotations

import ast
import functools
import importlib.machinery
import importlib.util
import os
import site
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from transport.appcode import (
    APP_FAILED_MARK,
    MAX_APP_CODE,
    MAX_APP_MODULES,
    AppCode,
    AppModule,
)
from virtio.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "INSTALLED_PACKAGES",
    "AppCodeTooLarge",
    "AppError",
    "ResolvedApp",
    "app_error",
    "resolve_app",
]

#: Top-level packages never sent: MIC-VOP's own (the card has them installed).
INSTALLED_PACKAGES = frozenset({"virtio", "transport", "mic_host", "mic_card"})


class AppCodeTooLarge(LocalProtocolError):
    """The code an app needs is over the size limit a run may send."""


class AppError(RemoteProtocolError):
    """An app failed on the card: ``str(e)`` is the summary (``app X failed on mic0:
    KeyError: 'missing'``), ``e.traceback`` the card-side traceback (or None)."""

    def __init__(self, message: str, *, app: str, card: str, traceback: str | None) -> None:
        super().__init__(message, reason="app")
        self.app = app
        self.card = card
        self.traceback = traceback

    def __str__(self) -> str:
        text = super().__str__()
        return text if self.traceback is None else f"{text}\n{self.traceback.rstrip()}"


def app_error(e: RemoteProtocolError, app: str, card: str) -> RemoteProtocolError:
    """``e`` as an :class:`AppError` if it is an app's failure (else ``e`` itself)."""
    text = str(e)
    if not text.startswith(f"app {app} failed on {card}: "):
        return e
    summary, mark, tb = text.partition(APP_FAILED_MARK)
    err = AppError(summary, app=app, card=card, traceback=tb if mark else None)
    err.args = (summary,)
    return err


@dataclass(frozen=True, slots=True)
class ResolvedApp:
    """An app found in the caller's environment: what to send to the daemon."""

    spec: str  #: as the caller wrote it
    app: str  #: ``module:function`` (the name on the card)
    code: AppCode | None  #: None: the card imports it from the installed environment


@dataclass(frozen=True, slots=True)
class _Found:
    name: str
    file: str | None  #: None: a namespace package
    package: bool
    search: tuple[str, ...]  #: where its submodules are (a package)


@functools.cache
def _installed_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    dirs = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    dirs.update(site.getsitepackages())
    user = site.getusersitepackages()
    if isinstance(user, str):
        dirs.add(user)
    return tuple(sorted({os.path.realpath(d) + os.sep for d in dirs}))


@functools.lru_cache(maxsize=4096)
def _installed(path: str) -> bool:
    real = os.path.realpath(path)
    return any(real.startswith(d) for d in _installed_dirs())


def _bad(spec: str, why: str) -> LocalProtocolError:
    return LocalProtocolError(f"app {spec!r}: {why}")


_installed_tops: set[tuple[tuple[str, ...], str]] = set()


class _Resolver:
    def __init__(self, spec: str, path: list[str]) -> None:
        self.spec = spec
        self.path = path
        self.found: dict[str, _Found | None] = {}

    def find(self, name: str) -> _Found | None:
        if name in self.found:
            return self.found[name]
        parent, _, _ = name.rpartition(".")
        search: list[str] | None = self.path
        if parent:
            p = self.find(parent)
            search = list(p.search) if p is not None and p.package else None
        found = None
        if search is not None:
            try:
                spec = importlib.machinery.PathFinder.find_spec(name, search)
            except (ImportError, ValueError, OSError):
                spec = None
            if spec is None and not parent:
                spec = _meta_path_spec(name)  # e.g. a project installed editable
            if spec is not None:
                found = _from_spec(name, spec)
        self.found[name] = found
        return found

    def shippable(self, f: _Found) -> bool:
        if f.name.partition(".")[0] in INSTALLED_PACKAGES:
            return False
        if f.file is None:
            return bool(f.search) and not all(_installed(d) for d in f.search)
        return f.file.endswith(".py") and not _installed(f.file)

    def installed_top(self, name: str) -> bool:
        """``name``'s top-level package is in the installed environment (remembered
        per search path for the life of the process: installations do not move)."""
        top = name.partition(".")[0]
        key = (tuple(self.path), top)
        if key in _installed_tops:
            return True
        f = self.find(top)
        if f is not None and not self.shippable(f):
            _installed_tops.add(key)
            return True
        return False

    def collect(self, main: _Found) -> list[_Found]:
        order: list[_Found] = []
        seen: set[str] = set()

        def add(f: _Found) -> None:
            if f.name in seen or not self.shippable(f):
                return
            seen.add(f.name)
            parent = f.name.rpartition(".")[0]
            if parent and (p := self.find(parent)) is not None:
                add(p)
            order.append(f)
            for name in _imports(f):
                if name in seen or self.installed_top(name):
                    continue
                found = self.find(name)
                if found is not None:
                    add(found)

        self.found[main.name] = main
        add(main)
        return order


def _meta_path_spec(name: str) -> importlib.machinery.ModuleSpec | None:
    """A top-level module found by the import system's other finders (not path entries)."""
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


def _from_spec(name: str, spec: importlib.machinery.ModuleSpec) -> _Found:
    locations = tuple(spec.submodule_search_locations or ())
    package = spec.submodule_search_locations is not None
    origin = spec.origin if spec.has_location else None
    return _Found(name, origin, package, locations)


def _module_found(name: str, file: str) -> _Found:
    package = os.path.basename(file) == "__init__.py"
    return _Found(name, file, package, (os.path.dirname(file),) if package else ())


@functools.lru_cache(maxsize=1024)
def _parse_imports(
    file: str, mtime_ns: int, size: int
) -> tuple[tuple[int, str | None, tuple[str, ...]], ...]:
    """The import statements of ``file``: ``(level, module, names)`` (cached by stat)."""
    try:
        tree = ast.parse(Path(file).read_bytes(), file)
    except (SyntaxError, ValueError, OSError):
        return ()  # the card reports the syntax error, naming the app
    out: list[tuple[int, str | None, tuple[str, ...]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((0, a.name, ()) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            out.append((node.level, node.module, tuple(a.name for a in node.names)))
    return tuple(out)


def _imports(f: _Found) -> list[str]:
    """Absolute names of the modules ``f`` may import (candidates: some are attributes)."""
    if f.file is None:
        return []
    try:
        st = os.stat(f.file)
    except OSError:
        return []
    names: list[str] = []
    for level, module, items in _parse_imports(f.file, st.st_mtime_ns, st.st_size):
        base = module or ""
        if level:
            package = f.name if f.package else f.name.rpartition(".")[0]
            try:
                base = importlib.util.resolve_name("." * level + base, package)
            except (ImportError, ValueError):
                continue
        if not base:
            continue
        names.append(base)
        names.extend(f"{base}.{item}" for item in items if item != "*")
    return names


def _read(f: _Found) -> str:
    if f.file is None:
        return ""
    return importlib.util.decode_source(Path(f.file).read_bytes())


def _root_of(f: _Found) -> str:
    """The folder the top-level package of ``f`` sits in."""
    assert f.file is not None
    up = f.name.count(".") + (1 if f.package else 0)
    return str(Path(f.file).resolve().parents[up])


def _search_path(cwd: str) -> list[str]:
    return [cwd, *(p or cwd for p in sys.path)]


def _from_file(spec: str, file_part: str, cwd: str) -> _Found:
    path = Path(cwd, file_part)
    if not path.is_file():
        raise _bad(spec, f"no file {path}")
    if path.suffix != ".py":
        raise _bad(spec, f"{path} is not a .py file")
    path = path.resolve()
    names = [path.stem]
    folder = path.parent
    while (folder / "__init__.py").is_file():
        names.insert(0, folder.name)
        folder = folder.parent
    name = ".".join(names)
    if not all(n.isidentifier() for n in names):
        raise _bad(spec, f"{path} is not importable as a module (name {name!r})")
    return _module_found(name, str(path))


def _from_module(spec: str, name: str, resolver: _Resolver) -> _Found:
    mod = sys.modules.get(name)
    file = getattr(mod, "__file__", None) if mod is not None else None
    if isinstance(file, str) and file.endswith(".py") and os.path.isfile(file):
        return _module_found(name, file)
    found = resolver.find(name)
    if found is None:
        where = ", ".join(resolver.path[:4]) + (", ..." if len(resolver.path) > 4 else "")
        raise _bad(spec, f"no module named {name!r} in the current folder or sys.path ({where})")
    return found


def resolve_app(spec: str, *, cwd: str | os.PathLike[str] | None = None) -> ResolvedApp:
    """Find ``spec`` (``module:function`` or ``path/to/file.py:function``) from ``cwd``
    (default: the current folder) and ``sys.path``; collect the code to send.

    Raises:
        LocalProtocolError: a malformed spec, no such module or file.
        AppCodeTooLarge: the code is over the size limit (the message names
            the app, the limit and the largest files).
        OSError: a source file cannot be read.
    """
    where = os.fspath(cwd) if cwd is not None else os.getcwd()
    target, sep, fn = spec.rpartition(":")
    if not sep or not target or not fn.isidentifier():
        raise _bad(spec, "expected module:function or path/to/file.py:function")
    resolver = _Resolver(spec, _search_path(where))
    if "/" in target or target.endswith(".py"):
        main = _from_file(spec, target, where)
    else:
        if not all(part.isidentifier() for part in target.split(".")):
            raise _bad(spec, "expected module:function or path/to/file.py:function")
        main = _from_module(spec, target, resolver)
    app = f"{main.name}:{fn}"
    if not resolver.shippable(main):
        return ResolvedApp(spec, app, None)
    if main.file is not None:
        resolver.path.insert(0, _root_of(main))
    found = resolver.collect(main)
    if len(found) > MAX_APP_MODULES:
        raise AppCodeTooLarge(
            f"app {spec!r} needs {len(found)} modules, over the {MAX_APP_MODULES} a run may send"
        )
    mods = tuple(AppModule(f.name, f.file or "", f.package, _read(f)) for f in found)
    code = AppCode(main.name, mods)
    if code.size > MAX_APP_CODE:
        big = sorted(mods, key=lambda m: len(m.source), reverse=True)[:3]
        biggest = ", ".join(f"{m.file} ({len(m.source.encode()) // 1024} KiB)" for m in big)
        raise AppCodeTooLarge(
            f"app {spec!r}: its code is {code.size // 1024} KiB in {len(mods)} modules, "
            f"over the {MAX_APP_CODE // 1024} KiB a run may send (largest: {biggest}); "
            "move what the app does not import out of its package, or install it"
        )
    return ResolvedApp(spec, app, code)
