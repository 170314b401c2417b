"""The provider (multiplexing) layer: pick an implementation per algorithm at run time.

Owns the :class:`Provider` protocol, the registry, and the selection rule:
among the providers that offer an algorithm, the highest ``priority`` wins;
when it cannot serve (no device, all queues busy, device isolated) the next
one is tried, down to the software fallback (UADK ``wd_alg_driver`` priority +
fallback; QATzip ``sw_backup``).

Providers are registered by entry point in the group ``mic_vop.accel_providers``;
each entry point names a factory ``factory(framework) -> Provider | None``
(None: not available here). The built-ins, ``mic`` (the card's accelerators,
priority 100) and ``soft`` (in-process, priority 0), are always registered.
Importing a provider module directly (``mic_card.accel.providers.mic``) gives
its extensions beyond this common API, as the provider-interface notes
describe ("directly linking to a provider").
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from mic_card.accel.errors import AccelError, NoProvider
from mic_card.accel.session import SessionLike, SessionSpec
from virtio.errors import ResourceError

if TYPE_CHECKING:
    from mic_card.accel.api import Accelerators

__all__ = ["ENTRY_POINT_GROUP", "Provider", "ProviderFactory", "ProviderRegistry"]

ENTRY_POINT_GROUP = "mic_vop.accel_providers"
log = logging.getLogger("mic_card.accel")


@runtime_checkable
class Provider(Protocol):
    """An implementation of some algorithms."""

    name: str
    priority: int

    def supports(self, alg: str) -> bool: ...

    async def open_session(self, spec: SessionSpec) -> SessionLike: ...

    async def aclose(self) -> None: ...


ProviderFactory = Callable[["Accelerators | None"], Provider | None]


class ProviderRegistry:
    """Providers by name; ``open_session(alg, ...)`` picks by priority with fallback."""

    def __init__(self, framework: Accelerators | None = None) -> None:
        self.framework = framework
        self._providers: dict[str, Provider] = {}

    @classmethod
    def default(cls, framework: Accelerators | None) -> ProviderRegistry:
        """The built-ins plus every entry point of :data:`ENTRY_POINT_GROUP`."""
        from mic_card.accel.providers.mic import MicProvider
        from mic_card.accel.providers.soft import SoftProvider

        reg = cls(framework)
        if framework is not None:
            reg.register(MicProvider(framework))
        reg.register(SoftProvider())
        reg.load_entry_points()
        return reg

    def register(self, provider: Provider, *, replace: bool = False) -> None:
        """Add ``provider`` (LookupError-free: an existing name is kept unless ``replace``)."""
        if provider.name in self._providers and not replace:
            return
        self._providers[provider.name] = provider

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> list[str]:
        """Load and register the providers of ``group``; returns the names added.

        A factory that fails to import or raises is logged and skipped: one
        broken plug-in must not take the card's accelerators down.
        """
        added = []
        for ep in importlib.metadata.entry_points(group=group):
            if ep.name in self._providers:
                continue
            try:
                factory: ProviderFactory = ep.load()
                p = factory(self.framework)
            except Exception as e:  # a plug-in's failure is reported, not fatal
                log.warning("accel provider %s (%s) failed to load: %s", ep.name, ep.value, e)
                continue
            if p is not None:
                self.register(p)
                added.append(p.name)
        return added

    def get(self, name: str) -> Provider:
        try:
            return self._providers[name]
        except KeyError:
            raise NoProvider(f"no provider {name!r}; have {', '.join(self._providers)}") from None

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.candidates(None)]

    def candidates(self, alg: str | None) -> list[Provider]:
        """Providers offering ``alg`` (all if None), highest priority first."""
        ps = [p for p in self._providers.values() if alg is None or p.supports(alg)]
        return sorted(ps, key=lambda p: -p.priority)

    def select(self, alg: str) -> Provider:
        """The highest-priority provider offering ``alg``.

        Raises:
            NoProvider: nobody offers it.
        """
        c = self.candidates(alg)
        if not c:
            raise NoProvider(f"no provider offers {alg!r}")
        return c[0]

    async def open_session(
        self, alg: str, *, provider: str | None = None, **kw: Any
    ) -> SessionLike:
        """A session for ``alg`` (``SessionSpec`` fields as keywords).

        Tries providers by priority; a provider that cannot serve right now
        (``ResourceError``: busy or isolated device) passes to the next.

        Raises:
            NoProvider: no provider offers ``alg`` or all of them failed.
            LocalProtocolError: bad spec (unknown op, bad level...).
        """
        spec = SessionSpec(alg, **kw)
        spec.resolved()
        cands = [self.get(provider)] if provider else self.candidates(alg)
        if not cands:
            raise NoProvider(f"no provider offers {alg!r}")
        errors = []
        for p in cands:
            try:
                return await p.open_session(spec)
            except (ResourceError, AccelError) as e:
                errors.append(f"{p.name}: {e}")
        raise NoProvider(f"no provider could open {alg!r}: {'; '.join(errors)}")

    async def aclose(self) -> None:
        for p in self._providers.values():
            await p.aclose()
