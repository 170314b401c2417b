"""Card apps: loading an app's code fresh for each run, and the registry of running apps.

A card app is ``async def main(card, *args)`` in the caller's project. The
host sends its sources with the run (:class:`transport.appcode.AppCode`);
:class:`AppLoader` turns them into modules private to that one run:

- every run gets its own module objects, so two apps whose modules share a
  name (two projects' ``apps.py``) never see each other, and an app edited
  between two runs runs its new code;
- nothing is left in the card's ``sys.modules``: the app's modules import one
  another through an ``__import__`` of their own (``import x``, ``from pkg
  import mod``, ``from . import y`` and imports inside functions all go
  through it); everything else (the standard library, installed packages,
  ``mic_card`` itself) is imported the ordinary way. While a module's body
  runs, the run's modules are visible in ``sys.modules`` (``dataclasses`` and
  ``typing`` look classes up there) and taken out again before the event loop
  can run anything else, so concurrent runs cannot observe each other (the
  price: code that looks an app module up in ``sys.modules`` *later*, such
  as pickling an app's class, does not find it);
- compiling is cached by content hash (:data:`CODE_CACHE` entries), so a
  test suite running the same helpers hundreds of times compiles them once.

An app run without code (``mic-card --app``, or a module the caller has from
the installed environment the card shares) is imported by name the ordinary
way (:func:`load_app`).

:class:`AppRunner` is the registry: ``start`` (one task per run, in the card
OS's task group), ``list`` (``micctl apps``), ``kill`` (``micctl kill``, a
cancelled client, a timeout). A run reports exactly once: its JSON result, or
its error with the card-side traceback; a result that is not JSON is an error,
as is a cancelled run.

Sits below the card OS (:mod:`mic_card.card`), which owns the link: it gets
the card services object to hand to apps and a ``reply`` coroutine. Imports
``transport`` (the messages and the code's wire form) and ``virtio.errors``.
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import contextlib
import importlib
import importlib.machinery
import importlib.util
import inspect
import itertools
import linecache
import logging
import math
import sys
import time
import traceback
import types
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from transport.appcode import AppCode, AppModule
from transport.messages import RunResult
from virtio.errors import LocalProtocolError, MicError, WireError

__all__ = [
    "CODE_CACHE",
    "MAX_TRACEBACK",
    "AppCancelled",
    "AppLoadError",
    "AppLoader",
    "AppRunner",
    "RunningApp",
    "jsonable",
    "load_app",
]

log = logging.getLogger("mic_card")

#: Compiled modules kept (by content hash); older ones are compiled again.
CODE_CACHE = 256
#: Characters of a card-side traceback sent back (the end is kept).
MAX_TRACEBACK = 16 * 1024
#: Tags of runs killed before they started, remembered to refuse them on arrival.
_EARLY_KILLS = 64

AppFn = Callable[..., Awaitable[Any]]


class AppCancelled(MicError):
    """The app was cancelled on the card (``micctl kill``, a timeout, a cancelled client)."""


_compiled: collections.OrderedDict[str, types.CodeType] = collections.OrderedDict()


def _compile(m: AppModule) -> types.CodeType:
    key = m.digest
    code = _compiled.get(key)
    if code is None:
        code = compile(m.source, m.file, "exec", dont_inherit=True)
        _compiled[key] = code
        if len(_compiled) > CODE_CACHE:
            _compiled.popitem(last=False)
    else:
        _compiled.move_to_end(key)
    return code


class AppLoader:
    """The modules of one run, loaded from the sources the caller sent."""

    def __init__(self, code: AppCode, spec: str) -> None:
        self.spec = spec
        self.code = code
        self.sources: dict[str, AppModule] = {m.name: m for m in code.modules}
        self.roots = {name.partition(".")[0] for name in self.sources}
        self.modules: dict[str, types.ModuleType] = {}
        self.builtins: dict[str, Any] = dict(builtins.__dict__)
        self.builtins["__import__"] = self._import

    def function(self, name: str) -> AppFn:
        """The app's ``async def`` ``name`` in its module (loaded now).

        Raises:
            LocalProtocolError: no such async function.
            Exception: whatever the module raises while it loads (SyntaxError...).
        """
        mod = self.load(self.code.module)
        return _async_fn(self.spec, mod, name)

    def load(self, name: str) -> types.ModuleType:
        with self._visible():
            return self._load(name)

    @contextlib.contextmanager
    def _visible(self) -> Iterator[None]:
        """Show this run's modules in ``sys.modules`` while module code runs (no await
        happens meanwhile, so no other app sees them), then put back what was there."""
        saved = {name: sys.modules.get(name) for name in self.sources}
        sys.modules.update(self.modules)
        try:
            yield
        finally:
            for name, old in saved.items():
                if old is None:
                    sys.modules.pop(name, None)
                else:
                    sys.modules[name] = old

    def _load(self, name: str) -> types.ModuleType:
        mod = self.modules.get(name)
        if mod is not None:
            return mod
        src = self.sources.get(name)
        if src is None:
            raise ModuleNotFoundError(
                f"No module named {name!r} in the code sent for app {self.spec} "
                "(only modules the app imports with import statements are sent)",
                name=name,
            )
        parent, _, short = name.rpartition(".")
        if parent:
            self._load(parent)
        mod = types.ModuleType(name)
        spec = importlib.machinery.ModuleSpec(name, None, origin=src.file, is_package=src.package)
        if src.package:
            spec.submodule_search_locations = []
            mod.__path__ = []
        mod.__spec__ = spec
        mod.__file__ = src.file
        mod.__package__ = name if src.package else parent
        mod.__dict__["__builtins__"] = self.builtins
        self.modules[name] = mod
        sys.modules[name] = mod
        try:
            exec(_compile(src), mod.__dict__)
        except BaseException:
            del self.modules[name]
            sys.modules.pop(name, None)
            raise
        if parent:
            setattr(self.modules[parent], short, mod)
        return mod

    def _import(
        self,
        name: str,
        globals: Mapping[str, Any] | None = None,  # noqa: A002
        locals: Mapping[str, Any] | None = None,  # noqa: A002
        fromlist: tuple[str, ...] | list[str] | None = (),
        level: int = 0,
    ) -> types.ModuleType:
        """``__import__`` for the run's modules: their names from the sources sent,
        everything else from the card's environment."""
        if level > 0:
            package = (globals or {}).get("__package__")
            if not package:
                raise ImportError("attempted relative import with no known parent package")
            name = importlib.util.resolve_name("." * level + name, package)
        if name.partition(".")[0] not in self.roots:
            return builtins.__import__(name, globals, locals, fromlist or (), 0)
        with self._visible():
            mod = self._load(name)
            if not fromlist:
                return self.modules[name.partition(".")[0]]
            items = list(fromlist)
            if "*" in items:  # ``from pkg import *`` loads the submodules its __all__ names
                items = [str(x) for x in getattr(mod, "__all__", ())]
            for item in items:
                sub = f"{name}.{item}"
                if not hasattr(mod, item) and sub in self.sources:
                    self._load(sub)
        return mod

    @contextlib.contextmanager
    def lines(self) -> Iterator[None]:
        """Make the sent sources what ``linecache`` (tracebacks) shows for their files."""
        saved = {m.file: linecache.cache.get(m.file) for m in self.code.modules}
        for m in self.code.modules:
            lines = m.source.splitlines(keepends=True)
            linecache.cache[m.file] = (len(m.source), None, lines, m.file)
        try:
            yield
        finally:
            for file, old in saved.items():
                if old is None:
                    linecache.cache.pop(file, None)
                else:
                    linecache.cache[file] = old


def _async_fn(spec: str, mod: types.ModuleType, fn_name: str) -> AppFn:
    fn = getattr(mod, fn_name, None)
    if fn is None:
        raise LocalProtocolError(f"app {spec}: module {mod.__name__} has no {fn_name}")
    if not inspect.iscoroutinefunction(fn):
        raise LocalProtocolError(f"app {spec}: {fn_name} is not an async function")
    return fn  # type: ignore[no-any-return]


def _split(spec: str) -> tuple[str, str]:
    mod_name, sep, fn_name = spec.partition(":")
    if not sep or not mod_name or not fn_name:
        raise LocalProtocolError(f"app {spec!r}: expected module:function")
    return mod_name, fn_name


def load_app(spec: str) -> AppFn:
    """Resolve ``module:function`` from the card's own environment (``import``, cached).

    Raises:
        LocalProtocolError: malformed spec, missing module or function, not async.
    """
    mod_name, fn_name = _split(spec)
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise LocalProtocolError(f"app {spec!r}: cannot import {mod_name}: {e}") from e
    return _async_fn(spec, mod, fn_name)


def jsonable(value: Any, spec: str, where: str = "result") -> Any:
    """``value`` as JSON: bytes become hex, tuples lists, dict keys strings.

    Raises:
        LocalProtocolError: something else (an object, a set, NaN...), naming where.
    """
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
    elif isinstance(value, list | tuple):
        return [jsonable(v, spec, f"{where}[{i}]") for i, v in enumerate(value)]
    elif isinstance(value, dict):
        return {str(k): jsonable(v, spec, f"{where}[{k!r}]") for k, v in value.items()}
    elif isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    raise LocalProtocolError(
        f"app {spec} returned a value that is not JSON: {where} is "
        f"{type(value).__name__} {_short_repr(value)} (return None, bool, int, finite "
        "float, str, bytes, or lists, tuples and dicts of them)"
    )


def _short_repr(value: object) -> str:
    try:
        text = repr(value)
    except Exception:  # a broken __repr__ of user code
        return "(no repr)"
    return text if len(text) <= 80 else text[:77] + "..."


# ------------------------------------------------------------------ registry


@dataclass(slots=True, eq=False)
class RunningApp:
    """One app running on the card."""

    id: int
    app: str
    tag: str | None
    rid: int | None
    started: float
    task: asyncio.Task[None] | None = None
    killed: bool = field(default=False)

    def info(self, now: float, uptime: float) -> dict[str, Any]:
        elapsed = now - self.started
        return {
            "id": self.id,
            "app": self.app,
            "tag": self.tag,
            "started": round(uptime - elapsed, 3),
            "elapsed": round(elapsed, 3),
        }


Reply = Callable[[RunResult], Awaitable[None]]


class AppRunner:
    """The card's running apps: start, list, kill; each run answers once."""

    def __init__(
        self, card: object, *, name: str, uptime: Callable[[], float], reply: Reply
    ) -> None:
        self.card = card
        self.name = name
        self._uptime = uptime
        self._reply = reply
        self._ids = itertools.count(1)
        self.running: dict[int, RunningApp] = {}
        self._early: collections.deque[str] = collections.deque(maxlen=_EARLY_KILLS)

    @property
    def tasks(self) -> list[asyncio.Task[None]]:
        return [a.task for a in self.running.values() if a.task is not None]

    def start(
        self,
        tg: asyncio.TaskGroup,
        rid: int | None,
        spec: str,
        args: list[Any],
        code: dict[str, Any] | None = None,
        tag: str | None = None,
    ) -> RunningApp:
        """Start one run in ``tg`` (its result goes to ``reply`` if ``rid`` is set)."""
        app = RunningApp(next(self._ids), spec, tag, rid, time.monotonic())
        if tag is not None and tag in self._early:
            self._early.remove(tag)
            app.killed = True
        self.running[app.id] = app
        app.task = tg.create_task(self._run(app, args, code), name=f"app {app.id} {spec}")
        return app

    def listing(self) -> list[dict[str, Any]]:
        """``[{"id", "app", "tag", "started", "elapsed"}]``, oldest first."""
        now, up = time.monotonic(), self._uptime()
        return [a.info(now, up) for a in self.running.values()]

    def kill(self, app_id: int | None = None, tag: str | None = None) -> list[dict[str, Any]]:
        """Cancel the app with ``app_id`` (or started with ``tag``); return what was
        cancelled (empty: no such app running; a ``tag`` not seen yet is remembered,
        so a run that arrives after its kill is refused)."""
        now, up = time.monotonic(), self._uptime()
        hits = [
            a
            for a in self.running.values()
            if (app_id is not None and a.id == app_id) or (tag is not None and a.tag == tag)
        ]
        for a in hits:
            a.killed = True
            if a.task is not None:
                a.task.cancel()
        if not hits and tag is not None:
            self._early.append(tag)
        return [a.info(now, up) for a in hits]

    def cancel_all(self) -> None:
        for a in self.running.values():
            if a.task is not None:
                a.task.cancel()

    async def _run(self, app: RunningApp, args: list[Any], code: dict[str, Any] | None) -> None:
        """Run one app; its failure is reported, never fatal to the card OS."""
        spec = app.app
        loader: AppLoader | None = None
        tb: str | None = None
        try:
            try:
                if app.killed:
                    raise asyncio.CancelledError
                if code is None:
                    fn = load_app(spec)
                else:
                    loader = AppLoader(AppCode.from_wire(code), spec)
                    fn = self._function(loader, spec)
                log.info("app %d %s started", app.id, spec)
                value = jsonable(await fn(self.card, *args), spec)
            except asyncio.CancelledError:
                if not app.killed:
                    raise  # the card OS is shutting down
                err = AppCancelled(f"app {spec} (id {app.id}) was cancelled on {self.name}")
                log.info("%s", err)
                reply = RunResult(app.rid or 0, spec, ok=False, error=WireError.from_exception(err))
            except (Exception, SystemExit, KeyboardInterrupt) as e:  # user code: report it all
                tb = _traceback(e, loader)
                log.error("app %s failed: %s: %s", spec, type(e).__name__, e)
                reply = RunResult(
                    app.rid or 0, spec, ok=False, error=WireError.from_exception(e), traceback=tb
                )
            else:
                log.info("app %d %s finished", app.id, spec)
                reply = RunResult(app.rid or 0, spec, ok=True, result=value)
        finally:
            self.running.pop(app.id, None)
        if app.rid is not None:
            await self._reply(reply)

    def _function(self, loader: AppLoader, spec: str) -> AppFn:
        """The app's function; a module that fails to load is an error naming the app."""
        _, fn_name = _split(spec)
        try:
            return loader.function(fn_name)
        except LocalProtocolError:
            raise
        except Exception as e:
            raise AppLoadError(spec, e, loader) from e


class AppLoadError(Exception):
    """The app's code did not load: its message names the app; ``__cause__`` is why."""

    def __init__(self, spec: str, cause: BaseException, loader: AppLoader) -> None:
        super().__init__(f"app {spec} failed to load: {type(cause).__name__}: {cause}")
        self.loader = loader


def _traceback(e: BaseException, loader: AppLoader | None) -> str | None:
    """The card-side traceback of ``e``, from the app's first frame, with the sources
    sent; None for an error of this module's own (nothing of the app to show)."""
    if isinstance(e, AppLoadError):
        loader, e = e.loader, e.__cause__ or e
    here = __file__
    with loader.lines() if loader is not None else contextlib.nullcontext():
        te = traceback.TracebackException.from_exception(e)
        frames = [f for f in te.stack if f.filename != here]
        if not frames and not isinstance(e, SyntaxError):
            return None
        te.stack = traceback.StackSummary.from_list(frames)
        text = "".join(te.format())
    if len(text) > MAX_TRACEBACK:
        text = "[...]\n" + text[-MAX_TRACEBACK:]
    return text
