"""The card's driver table: every driver the card OS knows, by name, and the one
that serves each device type.

Owns :class:`DriverSpec` (one driver: its name, the virtio device ID it
claims, its priority, where it came from) and :class:`DriverTable` with the
priority rule: for each device type the driver with the highest ``PRIORITY``
serves; on a tie a built-in beats a plug-in, and plug-ins tie-break by name
(alphabetically first wins). The table is a ``Mapping[int, DriverFactory]``
(device type -> the serving driver's factory), which is all the bus needs to
probe; the names let a caller pick a driver other than the default
(:meth:`DriverTable.named`).

Filling the table (built-ins, ``mic_vop.drivers`` entry points) is
:mod:`mic_card.drivers.plugins`; this module is pure data and rules. Must not
import the drivers, ``transport`` or ``mic_host``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from mic_card.bus.device import DriverFactory
from virtio.errors import LocalProtocolError

__all__ = ["DriverSpec", "DriverTable"]


@dataclass(frozen=True, slots=True)
class DriverSpec:
    """One card driver: ``factory(device) -> driver`` for devices of ``device_type``.

    ``name`` is unique in a table (built-ins: ``virtio-blk``, ``virtio-console``,
    ``virtio-net``; a plug-in: its entry-point name). ``origin`` says where it
    came from (``built-in`` or ``entry point mod:attr (dist 1.0)``), for logs.
    """

    name: str
    device_type: int
    factory: DriverFactory
    priority: int = 0
    builtin: bool = False
    origin: str = "built-in"

    def rank(self) -> tuple[int, bool, str]:
        """Sort key of the priority rule: lower sorts first, and first serves."""
        return (-self.priority, not self.builtin, self.name)

    def describe(self) -> str:
        """``'virtio-blk' (priority 0, built-in)``: for log lines."""
        return f"{self.name!r} (priority {self.priority}, {self.origin})"


class DriverTable(Mapping[int, DriverFactory]):
    """Drivers by name, and by device type the one that serves (the priority rule).

    ``table[device_type]`` is the serving driver's factory (what the bus
    probes with); :meth:`serving` its spec, :meth:`candidates` every driver of
    a type in rule order, :meth:`named` any driver by name.

    Raises (constructor):
        LocalProtocolError: two drivers with one name.
    """

    def __init__(self, specs: Iterable[DriverSpec]) -> None:
        self._by_name: dict[str, DriverSpec] = {}
        for spec in specs:
            if spec.name in self._by_name:
                raise LocalProtocolError(f"two card drivers named {spec.name!r}")
            self._by_name[spec.name] = spec
        by_type: dict[int, list[DriverSpec]] = {}
        for spec in self._by_name.values():
            by_type.setdefault(spec.device_type, []).append(spec)
        self._by_type = {t: sorted(c, key=DriverSpec.rank) for t, c in by_type.items()}

    @classmethod
    def from_mapping(cls, drivers: Mapping[int, DriverFactory]) -> DriverTable:
        """A table of built-ins from a plain ``{device type: factory}`` mapping
        (named ``type<N>``; the card OS names its own, this is for test rigs)."""
        if isinstance(drivers, DriverTable):
            return drivers
        return cls(DriverSpec(f"type{t}", t, f, builtin=True) for t, f in sorted(drivers.items()))

    # -- Mapping[int, DriverFactory]: device type -> serving factory ---------------
    def __getitem__(self, device_type: int) -> DriverFactory:
        return self._by_type[device_type][0].factory

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self._by_type))

    def __len__(self) -> int:
        return len(self._by_type)

    # -- by name and by rule ------------------------------------------------------
    def serving(self, device_type: int) -> DriverSpec | None:
        """The driver that serves ``device_type`` by default (None: no driver)."""
        found = self._by_type.get(device_type)
        return found[0] if found else None

    def candidates(self, device_type: int) -> list[DriverSpec]:
        """Every driver claiming ``device_type``, the serving one first."""
        return list(self._by_type.get(device_type, ()))

    def named(self, name: str) -> DriverSpec:
        """The driver called ``name``.

        Raises:
            LocalProtocolError: no such driver (the message lists the known ones).
        """
        spec = self._by_name.get(name)
        if spec is None:
            known = ", ".join(sorted(self._by_name)) or "none"
            raise LocalProtocolError(f"unknown card driver {name!r} (known: {known})")
        return spec

    def specs(self) -> list[DriverSpec]:
        """Every driver, by device type then in rule order."""
        return [s for t in sorted(self._by_type) for s in self._by_type[t]]

    def info(self) -> list[dict[str, object]]:
        """Every driver as a plain dict (JSON-ready): name, type, priority, origin, serving."""
        return [
            {
                "name": s.name,
                "type": s.device_type,
                "priority": s.priority,
                "builtin": s.builtin,
                "origin": s.origin,
                "serving": self.serving(s.device_type) is s,
            }
            for s in self.specs()
        ]
