"""The code of a card app as it travels from the caller to the card: :class:`AppCode`.

A card app (``async def main(card, *args)``) lives in the *caller's* project.
The client (:mod:`mic_host.client.apps`) resolves it there, collects the
Python sources it needs and sends them with the ``run`` request; the daemon
forwards them in the :class:`transport.messages.Run` link message; the card
(:mod:`mic_card.apps`) loads them fresh for that one run. This module owns
only the wire form both ends agree on, and its bounds::

    {"module": "tests.apps",                 # the module holding the function
     "modules": [{"name": "tests", "file": "/home/me/proj/tests/__init__.py",
                  "package": true, "source": "..."},
                 {"name": "tests.apps", "file": ".../tests/apps.py",
                  "package": false, "source": "..."}]}

``file`` is where the source came from on the caller's machine (what a card
traceback shows); ``package`` says whether the module is a package (its
submodules may be in the list too). A namespace package (a folder without
``__init__.py``) travels with an empty source. Imports ``virtio.errors`` only.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from virtio.errors import RemoteProtocolError

__all__ = ["APP_FAILED_MARK", "MAX_APP_CODE", "MAX_APP_MODULES", "AppCode", "AppModule"]

#: Bytes of source (UTF-8) one app may send. The control socket and the control
#: link carry at most 1 MiB per message, and JSON escaping grows source text;
#: 512 KiB leaves room for both (a typical app with its helpers is a few KiB).
MAX_APP_CODE = 512 * 1024
#: Modules one app may send.
MAX_APP_MODULES = 256
#: Separates an app failure's summary from its card-side traceback in the error
#: message the daemon sends (the client splits there into ``AppError.traceback``).
APP_FAILED_MARK = "\n--- card traceback ---\n"

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


@dataclass(frozen=True, slots=True)
class AppModule:
    """One module's source, as the caller had it."""

    name: str
    file: str
    package: bool
    source: str

    @property
    def digest(self) -> str:
        """A content hash (what the card caches compiled code by)."""
        return hashlib.sha256(f"{self.file}\0{self.source}".encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class AppCode:
    """The sources of one app: ``module`` and every module it needs, parents first."""

    module: str
    modules: tuple[AppModule, ...]

    @property
    def size(self) -> int:
        """Bytes of source, UTF-8."""
        return sum(len(m.source.encode()) for m in self.modules)

    def to_wire(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "modules": [
                {"name": m.name, "file": m.file, "package": m.package, "source": m.source}
                for m in self.modules
            ],
        }

    @classmethod
    def from_wire(cls, obj: object) -> AppCode:
        """Parse the ``code`` of a ``run`` request or message.

        Raises:
            RemoteProtocolError: not an object of the shape above, a bad module
                name, a duplicate module, ``module`` not among ``modules``, or
                more than :data:`MAX_APP_MODULES` modules / :data:`MAX_APP_CODE` bytes.
        """
        if not isinstance(obj, dict) or set(obj) != {"module", "modules"}:
            raise RemoteProtocolError("app code must be an object with 'module' and 'modules'")
        module, raw = obj["module"], obj["modules"]
        if not isinstance(module, str) or not _NAME.match(module):
            raise RemoteProtocolError(f"app code: bad module name {module!r:.80}")
        if not isinstance(raw, list) or len(raw) > MAX_APP_MODULES:
            raise RemoteProtocolError(f"app code: 'modules' must be a list of <= {MAX_APP_MODULES}")
        mods: list[AppModule] = []
        seen: set[str] = set()
        for m in raw:
            if not isinstance(m, dict) or set(m) != {"name", "file", "package", "source"}:
                raise RemoteProtocolError(
                    "app code: each module needs exactly name, file, package, source"
                )
            name, file, package, source = m["name"], m["file"], m["package"], m["source"]
            if not (isinstance(name, str) and _NAME.match(name)) or name in seen:
                raise RemoteProtocolError(f"app code: bad or duplicate module name {name!r:.80}")
            if not (
                isinstance(file, str) and isinstance(package, bool) and isinstance(source, str)
            ):
                raise RemoteProtocolError(f"app code: module {name}: mistyped field")
            seen.add(name)
            mods.append(AppModule(name, file, package, source))
        if module not in seen:
            raise RemoteProtocolError(f"app code: module {module} is not among the modules sent")
        code = cls(module, tuple(mods))
        if code.size > MAX_APP_CODE:
            raise RemoteProtocolError(
                f"app code: {code.size} bytes of source over the {MAX_APP_CODE}-byte limit"
            )
        return code
