"""virtio-console, the sans-IO part both sides share (virtio 1.2 §5.3).

Owns the wire rules used by the host backend (``mic_host.backends.console``)
and the card driver (``mic_card.drivers.console``):

- which queues belong to which port (§5.3.2): port 0 on 0/1, with
  MULTIPORT the control receiveq/transmitq on 2/3 and port ``k`` on
  ``2+2k``/``3+2k`` (:func:`port_queues`, :func:`num_queues`,
  :func:`max_ports`);
- the control message ``{le32 id; le16 event; le16 value}`` (§5.3.6.2):
  :data:`CONTROL`, the precompiled twin of :data:`virtio.layouts.ConsoleControl`;
  what the driver sends is exactly one header (so a device reads at most
  :data:`MAX_DRIVER_CONTROL` bytes of a driver's buffer), what the device
  sends may carry a payload after it (:func:`parse_control`);
- the payloads: RESIZE ``{le16 rows; le16 cols}`` in Linux's order
  (:data:`RESIZE`, twin of :data:`virtio.layouts.ConsoleResize`) and
  PORT_NAME (:func:`parse_port_name`, :func:`port_name_problem`);
- the config space ``struct virtio_console_config`` (:func:`build_config`,
  :func:`parse_config`).

Bytes from the peer either parse or raise :class:`ControlError` (a
:class:`~virtio.errors.RemoteProtocolError`); the callers log, count and
ignore what was rejected and carry on. Which events each side acts on is the
callers' state (ports, open/ready); the format is here. The construct
declarations in :mod:`virtio.layouts` are the one source of truth; the
``struct`` twins are tested against them. Must not import asyncio,
``transport`` or ``mic_*``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from construct import ConstructError

from virtio.errors import LocalProtocolError, RemoteProtocolError
from virtio.layouts import ConsoleConfig

__all__ = [
    "CONTROL",
    "CONTROL_RX",
    "CONTROL_SIZE",
    "CONTROL_TX",
    "MAX_DRIVER_CONTROL",
    "MAX_PORT_NAME",
    "RESIZE",
    "ConsoleConfigValues",
    "ControlError",
    "ControlMessage",
    "build_config",
    "max_ports",
    "num_queues",
    "pack_control",
    "pack_resize",
    "parse_config",
    "parse_control",
    "parse_port_name",
    "parse_resize",
    "port_name_problem",
    "port_queues",
]

#: ``struct virtio_console_control``: id (the port), event, value. Twin of
#: ``layouts.ConsoleControl``.
CONTROL = struct.Struct("<IHH")
CONTROL_SIZE = CONTROL.size  # 8
#: RESIZE payload: rows, then cols (Linux's order). Twin of ``layouts.ConsoleResize``.
RESIZE = struct.Struct("<HH")
#: The most a driver's (card's) control buffer may carry: every message a
#: driver sends (DEVICE_READY, PORT_READY, PORT_OPEN) is exactly one header
#: (§5.3.6.2). A device reads no more than this of a control transmitq buffer:
#: a longer one is malformed and is rejected unread.
MAX_DRIVER_CONTROL = CONTROL_SIZE
#: The control receiveq (device -> driver) and transmitq (driver -> device), with MULTIPORT.
CONTROL_RX, CONTROL_TX = 2, 3
#: Longest PORT_NAME, in UTF-8 bytes.
MAX_PORT_NAME = 120


class ControlError(RemoteProtocolError):
    """A control message (or its payload) the peer sent does not parse."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="control")


@dataclass(frozen=True, slots=True)
class ControlMessage:
    """One control message: the port it is about, the event, its value, and the
    payload after the header (PORT_NAME's name, RESIZE's size; empty otherwise)."""

    port: int
    event: int
    value: int
    payload: bytes = b""


# --- ports and queues -----------------------------------------------------------


def port_queues(port: int) -> tuple[int, int]:
    """``(receiveq, transmitq)`` queue indices of ``port`` (§5.3.2)."""
    return (0, 1) if port == 0 else (2 + 2 * port, 3 + 2 * port)


def num_queues(nr_ports: int, multiport: bool) -> int:
    """Queues a device with ``nr_ports`` ports needs: 2 without MULTIPORT
    (port 0 only), else port 0, the control pair and a pair per other port."""
    return 2 + 2 * nr_ports if multiport else 2


def max_ports(num_vq: int) -> int:
    """Most ports ``num_vq`` queues can carry with MULTIPORT (at least port 0)."""
    return max(1, (num_vq - 2) // 2)


# --- control messages -------------------------------------------------------------


def pack_control(port: int, event: int, value: int, payload: bytes = b"") -> bytes:
    """One control message: the 8-byte header, then ``payload``."""
    return CONTROL.pack(port, int(event), value) + payload


def parse_control(data: bytes | bytearray | memoryview, *, from_driver: bool) -> ControlMessage:
    """Parse one control message (one buffer) the peer sent.

    ``from_driver``: the driver's messages (DEVICE_READY, PORT_READY,
    PORT_OPEN) are exactly one header; the device's may carry a payload.

    Raises:
        ControlError: too short, or a driver message with trailing bytes.
    """
    n = len(data)
    if n < CONTROL_SIZE or (from_driver and n != CONTROL_SIZE):
        want = "want" if from_driver else "need"
        raise ControlError(f"{n} bytes, {want} {CONTROL_SIZE}: {bytes(data[:16]).hex()}")
    port, event, value = CONTROL.unpack_from(data)
    return ControlMessage(port, event, value, bytes(data[CONTROL_SIZE:]))


def pack_resize(cols: int, rows: int) -> bytes:
    """RESIZE's payload (rows first)."""
    return RESIZE.pack(rows, cols)


def parse_resize(payload: bytes) -> tuple[int, int]:
    """``(cols, rows)`` from RESIZE's payload.

    Raises:
        ControlError: fewer than 4 bytes.
    """
    if len(payload) < RESIZE.size:
        raise ControlError(f"RESIZE with {len(payload)} bytes of size")
    rows, cols = RESIZE.unpack_from(payload)
    return cols, rows


def port_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a port name (empty, over 120 UTF-8 bytes,
    unprintable), or None."""
    if not name:
        return "empty port name"
    if len(name.encode("utf-8", "replace")) > MAX_PORT_NAME:
        return f"port name over {MAX_PORT_NAME} bytes"
    if not name.isprintable():
        return "unprintable port name"
    return None


def parse_port_name(payload: bytes) -> str:
    """The name carried by PORT_NAME (trailing NULs dropped).

    Raises:
        ControlError: the name breaks :func:`port_name_problem`.
    """
    name = payload.rstrip(b"\0").decode("utf-8", "replace")
    if port_name_problem(name) is not None:
        raise ControlError(f"bad PORT_NAME: {payload[:40]!r}")
    return name


# --- config space ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConsoleConfigValues:
    """The fields of ``struct virtio_console_config`` we use."""

    cols: int
    rows: int
    max_nr_ports: int


def build_config(cols: int, rows: int, max_nr_ports: int) -> bytes:
    """The 12-byte config space (``emerg_wr`` 0).

    Raises:
        LocalProtocolError: a value does not fit its field.
    """
    try:
        data: bytes = ConsoleConfig.build(
            {"cols": cols, "rows": rows, "max_nr_ports": max_nr_ports, "emerg_wr": 0}
        )
    except ConstructError as e:
        raise LocalProtocolError(f"cannot build the console config: {e}") from e
    return data


def parse_config(raw: bytes | bytearray | memoryview) -> ConsoleConfigValues:
    """Parse the config space the host wrote.

    Raises:
        RemoteProtocolError: shorter than 12 bytes (``reason="config"``).
    """
    try:
        c = ConsoleConfig.parse(bytes(raw))
    except ConstructError as e:
        raise RemoteProtocolError(
            f"console config of {len(raw)} B does not parse: {e}", reason="config"
        ) from e
    return ConsoleConfigValues(int(c.cols), int(c.rows), int(c.max_nr_ports))
