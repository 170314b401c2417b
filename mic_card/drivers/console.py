"""virtio-console driver for the card (virtio 1.2 §5.3): ``hvc0`` and named ports.

Without ``VIRTIO_CONSOLE_F_MULTIPORT`` there is one port, port 0 (queues 0/1),
the console. With it (Linux ``drivers/char/virtio_console.c``): queues 2/3
carry control messages and 4+2k/5+2k port k+1. The driver sends DEVICE_READY;
the host announces ports with DEVICE_ADD, which we answer with PORT_READY; it
then says which port is the console (CONSOLE_PORT, answered with PORT_OPEN=1),
names the others (PORT_NAME) and tells whether its end is open (PORT_OPEN).
RESIZE carries the console's window size (``{le16 rows; le16 cols}`` after the
header, as Linux reads it); without MULTIPORT the size is the config space's
(VIRTIO_CONSOLE_F_SIZE), re-read on a config change.

Every control message is parsed defensively: a short buffer, an unknown event
or a port out of range is logged, counted and ignored; the driver carries on.

Each port is an async byte stream (:class:`ConsolePort`): ``read()``,
``readuntil()``, ``write()``, ``async for chunk in port``. Receive buffers
are posted per port and re-posted as soon as they complete; control messages
are sent from callbacks (no tasks of their own). :class:`ConsoleDevice` keeps
the old port-0 API (``read``/``write`` on the device are port 0's).

Must not import ``transport`` or ``mic_host``.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

from mic_card.endpoint import DriverEndpoint
from virtio.console import (
    CONTROL_RX,
    CONTROL_TX,
    ConsoleConfigValues,
    ControlError,
    max_ports,
    pack_control,
    parse_config,
    parse_control,
    parse_port_name,
    parse_resize,
    port_queues,
)
from virtio.constants import ConsoleEvent, ConsoleFeature
from virtio.errors import (
    BrokenResourceError,
    LocalProtocolError,
    MicError,
    RemoteProtocolError,
    WouldBlock,
)

if TYPE_CHECKING:
    from mic_card.bus import CardDevice

__all__ = ["ConsoleDevice", "ConsolePort", "SinglePortConsole"]

log = logging.getLogger(__name__)

RX_BUFFER = 512
TX_CHUNK = 4096
CONTROL_BUFFER = 256
_LOGGED_ERRORS = 20


class ConsolePort:
    """One port of a virtio console on the card: an async byte stream.

    ``id`` (0 is the console), ``name`` (PORT_NAME, None for the console),
    ``console`` (CONSOLE_PORT), ``host_connected`` (the host's PORT_OPEN),
    ``guest_connected`` (ours, see :meth:`open`), ``size`` ``(cols, rows)``.
    """

    def __init__(self, device: ConsoleDevice, port_id: int, rx_q: int, tx_q: int) -> None:
        self.device = device
        self.id = port_id
        self.name: str | None = None
        self.console = False
        self.host_connected = False
        self.guest_connected = False
        self.size: tuple[int, int] = (0, 0)
        self.rx: DriverEndpoint = device.dev.endpoints[rx_q]
        self.tx: DriverEndpoint = device.dev.endpoints[tx_q]
        self._data = bytearray()
        self._data_event = asyncio.Event()
        self._closed: BrokenResourceError | None = None
        self._tx_lock = asyncio.Lock()
        self.resize_listeners: list[Callable[[int, int], None]] = []
        #: called with the bytes of each receive buffer in the interrupt's
        #: callback, once they are buffered for :meth:`read` (a line discipline's
        #: hook: it may echo them at once with :meth:`write_nowait`)
        self.on_receive: Callable[[bytes], None] | None = None
        self._in_receive = False
        #: card RAM lent to the host: receive buffers and writes nobody waits for
        #: (freed on completion, or by _close once the queues failed)
        self._lent: set[int] = set()
        self.bytes_in = 0
        #: bytes written back from :attr:`on_receive` (echoed in the interrupt)
        self.irq_echoed = 0
        self.bytes_out = 0

    def __repr__(self) -> str:
        return f"<ConsolePort {self.id} {self.name or 'console'}>"

    @property
    def label(self) -> str:
        return self.name or (f"hvc{self.id}" if self.console or self.id == 0 else f"port{self.id}")

    # -- receive -------------------------------------------------------------------
    def _start(self, buffers: int) -> None:
        dev = self.device.dev
        for _ in range(min(buffers, self.rx.size)):
            try:
                addr = dev.alloc(RX_BUFFER, 64)
            except MicError as e:
                log.error("%s: no card RAM for receive buffers: %s", self.label, e)
                return
            self._post(addr)

    def _post(self, addr: int) -> None:
        dev = self.device.dev
        try:
            self.rx.submit_callback([], [(addr, RX_BUFFER)], functools.partial(self._on_rx, addr))
        except (WouldBlock, BrokenResourceError) as e:
            dev.free(addr)
            if isinstance(e, BrokenResourceError):
                self._close(e)
                self._reclaim_lent()
            return
        self._lent.add(addr)

    def _on_rx(self, addr: int, n: int) -> None:
        """A receive buffer came back with ``n`` bytes: in the interrupt itself, so a
        reader waiting for them is woken in the same loop iteration."""
        self._lent.discard(addr)
        dev = self.device.dev
        if n:
            data = bytes(dev.mem.view(addr, n))
            self._data += data
            self.bytes_in += n
            if self.on_receive is not None:  # first: it may echo (a person waits for that)
                self._in_receive = True
                try:
                    self.on_receive(data)
                finally:
                    self._in_receive = False
            self._data_event.set()
        if self._closed is None:
            self._post(addr)
        else:
            dev.free(addr)

    @property
    def buffered(self) -> int:
        """Bytes received and not read yet."""
        return len(self._data)

    async def read(self, max_bytes: int = -1) -> bytes:
        """Bytes the host sent (at least one; at most ``max_bytes`` if > 0).

        Raises:
            BrokenResourceError: the port went away and nothing is buffered.
        """
        while not self._data:
            if self._closed is not None:
                raise BrokenResourceError(str(self._closed))
            self._data_event.clear()
            await self._data_event.wait()
        n = len(self._data) if max_bytes < 0 else min(max_bytes, len(self._data))
        out = bytes(self._data[:n])
        del self._data[:n]
        return out

    async def readuntil(self, sep: bytes = b"\n") -> bytes:
        """Bytes up to and including ``sep``.

        Raises:
            BrokenResourceError: the port went away before ``sep`` arrived.
        """
        while sep not in self._data:
            if self._closed is not None:
                raise BrokenResourceError(str(self._closed))
            self._data_event.clear()
            await self._data_event.wait()
        i = self._data.index(sep) + len(sep)
        out = bytes(self._data[:i])
        del self._data[:i]
        return out

    def __aiter__(self) -> ConsolePort:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self.read()
        except BrokenResourceError:
            raise StopAsyncIteration from None

    # -- transmit -------------------------------------------------------------------
    async def write(self, data: bytes) -> None:
        """Send ``data`` to the host (in order; returns once the host consumed it).

        Raises:
            BrokenResourceError: the port went away.
            ResourceError: card RAM exhausted.
        """
        dev = self.device.dev
        async with self._tx_lock:
            for i in range(0, len(data), TX_CHUNK):
                chunk = data[i : i + TX_CHUNK]
                if self._closed is not None:
                    raise BrokenResourceError(str(self._closed))
                addr = dev.alloc(len(chunk), 64)
                dev.mem.view(addr, len(chunk), True)[:] = chunk
                if self.tx.interrupts_suppressed:
                    self.tx.allow_interrupts()  # this write waits for its completion
                try:
                    fut = self.tx.submit_nowait([(addr, len(chunk))], [], release=_freer(dev, addr))
                except WouldBlock:  # the ring is full (not from our writes: one at a time)
                    await self.tx.submit([(addr, len(chunk))], [], release=_freer(dev, addr))
                except BaseException:
                    dev.free(addr)
                    raise
                else:
                    # Writes are one at a time (the lock): nothing can join this
                    # one, so the host is told now rather than at the end of the
                    # loop iteration.
                    self.tx.flush()
                    await fut
                dev.free(addr)
                self.bytes_out += len(chunk)

    def write_nowait(self, data: bytes) -> bool:
        """Send ``data`` (at most :data:`TX_CHUNK` bytes) now, without waiting for the
        host, when nothing else is being written; False (nothing sent) otherwise.

        For a line discipline's echo from :attr:`on_receive`: the kick goes out
        in the same callback. It goes out after everything written before
        and before everything written after. The host does not interrupt for
        its completion (the next interrupt or write reaps it).
        """
        if self._closed is not None or self._tx_lock.locked() or not 0 < len(data) <= TX_CHUNK:
            return False
        dev = self.device.dev
        tx = self.tx
        # Nobody waits for these completions: they are reaped after the kick,
        # or by the next interrupt of the device (typed input); the host is
        # asked not to interrupt for them.
        if not tx.interrupts_suppressed:
            tx.suppress_interrupts()
        try:
            addr = dev.alloc(len(data), 64)
        except MicError:
            return False
        dev.mem.view(addr, len(data), True)[:] = data
        try:
            tx.submit_callback([(addr, len(data))], [], functools.partial(self._on_sent, addr))
        except (WouldBlock, BrokenResourceError, LocalProtocolError):
            dev.free(addr)
            tx.reclaim()  # a ring full of reaped-later echoes: room for the next one
            return False
        self._lent.add(addr)
        tx.flush()
        tx.reclaim()
        self.bytes_out += len(data)
        if self._in_receive:
            self.irq_echoed += len(data)
        return True

    def _on_sent(self, addr: int, _n: int) -> None:
        self._lent.discard(addr)
        self.device.dev.free(addr)

    # -- open / close ----------------------------------------------------------------
    def open(self) -> None:
        """Tell the host we have the port open (PORT_OPEN 1; a no-op without MULTIPORT)."""
        self.guest_connected = True
        self.device._control(self.id, ConsoleEvent.PORT_OPEN, 1)

    def close(self) -> None:
        """Tell the host we closed the port (PORT_OPEN 0)."""
        self.guest_connected = False
        self.device._control(self.id, ConsoleEvent.PORT_OPEN, 0)

    def _resize(self, cols: int, rows: int) -> None:
        self.size = (cols, rows)
        for cb in list(self.resize_listeners):
            cb(cols, rows)

    def _close(self, exc: BrokenResourceError) -> None:
        if self._closed is None:
            self._closed = exc
        self._data_event.set()

    def _reclaim_lent(self) -> None:
        """The port's queues failed (the bus fails them before it detaches the
        driver): the host no longer touches the buffers lent to it."""
        dev = self.device.dev
        for addr in self._lent:
            dev.free(addr)
        self._lent.clear()


def _freer(dev: CardDevice, addr: int) -> Callable[[], None]:
    def release() -> None:
        dev.free(addr)

    return release


class ConsoleDevice:
    """A virtio console on the card: port 0 (``hvc0``) and, with MULTIPORT, named ports."""

    FEATURES: ClassVar[int] = int(ConsoleFeature.MULTIPORT | ConsoleFeature.SIZE)

    def __init__(self, dev: CardDevice, *, rx_buffers: int = 16) -> None:
        self.dev = dev
        self.name = dev.name
        self.multiport = bool(dev.features & ConsoleFeature.MULTIPORT) and dev.num_vq >= 4
        self._rx_buffers = rx_buffers
        self.ports: dict[int, ConsolePort] = {}
        self._removed: list[ConsolePort] = []  # ports the host removed (DEVICE_REMOVE)
        self.max_nr_ports = 1
        self.control_errors = 0
        self._closed: BrokenResourceError | None = None
        self._changed = asyncio.Event()
        self._ctrl_backlog: collections.deque[bytes] = collections.deque()
        cols, rows = self._config_size()
        if self.multiport:
            self.max_nr_ports = max(1, min(self._config_ports(), max_ports(dev.num_vq)))
            self._ctrl_rx = dev.endpoints[CONTROL_RX]
            self._ctrl_tx = dev.endpoints[CONTROL_TX]
            for _ in range(min(16, self._ctrl_rx.size)):
                try:
                    addr = dev.alloc(CONTROL_BUFFER, 64)
                except MicError as e:
                    log.error("%s: no card RAM for control buffers: %s", self.name, e)
                    break
                self._post_control(addr)
            self._control(0, ConsoleEvent.DEVICE_READY, 1)
        else:
            port = self._add_port(0)
            port.console = True
            port.host_connected = True
            port.size = (cols, rows)

    # -- config ----------------------------------------------------------------------
    def _config(self) -> ConsoleConfigValues | None:
        try:
            return parse_config(self.dev.read_config())
        except RemoteProtocolError as e:
            log.error("%s: console config does not parse: %s", self.name, e)
            return None

    def _config_size(self) -> tuple[int, int]:
        cfg = self._config()
        if cfg is None or not self.dev.features & ConsoleFeature.SIZE:
            return (0, 0)
        return (cfg.cols, cfg.rows)

    def _config_ports(self) -> int:
        cfg = self._config()
        return 1 if cfg is None else cfg.max_nr_ports

    # -- ports -----------------------------------------------------------------------
    def _add_port(self, port_id: int) -> ConsolePort:
        rx, tx = port_queues(port_id)
        port = ConsolePort(self, port_id, rx, tx)
        self.ports[port_id] = port
        port._start(self._rx_buffers)
        self._signal()
        return port

    def _signal(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def port(self, key: str | int) -> ConsolePort:
        """A port by id, by PORT_NAME, or ``hvcN`` / the device name for the console.

        Raises:
            LocalProtocolError: no such port (yet).
        """
        for p in self.ports.values():
            if key in (p.id, p.name) or (p.console and key in ("hvc0", self.name)):
                return p
        raise LocalProtocolError(f"{self.name}: no port {key!r}")

    async def wait_port(self, key: str | int) -> ConsolePort:
        """Wait until the port exists (and, for a name, is named). Bound it with a timeout.

        Raises:
            BrokenResourceError: the device went away.
        """
        while True:
            try:
                return self.port(key)
            except LocalProtocolError:
                if self._closed is not None:
                    raise BrokenResourceError(str(self._closed)) from None
                await self._changed.wait()

    async def console_port(self) -> ConsolePort:
        """Port 0 once it exists (with MULTIPORT it appears after DEVICE_ADD)."""
        return await self.wait_port(0)

    # -- port 0 compatibility API ------------------------------------------------------
    async def read(self, max_bytes: int = -1) -> bytes:
        return await (await self.console_port()).read(max_bytes)

    async def readuntil(self, sep: bytes = b"\n") -> bytes:
        return await (await self.console_port()).readuntil(sep)

    async def write(self, data: bytes) -> None:
        await (await self.console_port()).write(data)

    def __aiter__(self) -> ConsoleDevice:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self.read()
        except BrokenResourceError:
            raise StopAsyncIteration from None

    # -- control queue -----------------------------------------------------------------
    def _control(self, port_id: int, event: ConsoleEvent, value: int) -> None:
        if self.multiport and self._closed is None:
            self._send_control(pack_control(port_id, event, value))

    def send_control_raw(self, data: bytes) -> None:
        """Fault injection: put ``data`` on the control transmitq as one buffer.

        Raises:
            LocalProtocolError: MULTIPORT was not negotiated (no control queue).
        """
        if not self.multiport:
            raise LocalProtocolError(f"{self.name}: no control queue without MULTIPORT")
        self._send_control(bytes(data))

    def _send_control(self, data: bytes) -> None:
        self._ctrl_backlog.append(data)
        self._pump_control()

    def _pump_control(self) -> None:
        while self._ctrl_backlog and self._closed is None:
            data = self._ctrl_backlog[0]
            try:
                addr = self.dev.alloc(max(len(data), 1), 64)
            except MicError as e:
                log.error("%s: no card RAM for a control message: %s", self.name, e)
                return
            self.dev.mem.view(addr, len(data), True)[:] = data
            try:
                fut = self._ctrl_tx.submit_nowait([(addr, len(data))], [])
            except WouldBlock:
                self.dev.free(addr)
                return  # retried when a control message completes
            except (BrokenResourceError, LocalProtocolError) as e:
                self.dev.free(addr)
                log.error("%s: control message not sent: %s", self.name, e)
                self._ctrl_backlog.clear()
                return
            self._ctrl_backlog.popleft()
            fut.add_done_callback(functools.partial(self._on_control_sent, addr))

    def _on_control_sent(self, addr: int, fut: asyncio.Future[int]) -> None:
        self.dev.free(addr)
        if not fut.cancelled() and fut.exception() is None:
            self._pump_control()

    def _post_control(self, addr: int) -> None:
        try:
            fut = self._ctrl_rx.submit_nowait([], [(addr, CONTROL_BUFFER)])
        except (WouldBlock, BrokenResourceError):
            self.dev.free(addr)
            return
        fut.add_done_callback(lambda f: self._on_control_rx(addr, f))

    def _on_control_rx(self, addr: int, fut: asyncio.Future[int]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            self.dev.free(addr)
            return
        n = fut.result()
        data = bytes(self.dev.mem.view(addr, n)) if n else b""
        if self._closed is None:
            self._post_control(addr)
        else:
            self.dev.free(addr)
        self._on_control(data)

    def _reject(self, why: str) -> None:
        self.control_errors += 1
        if self.control_errors <= _LOGGED_ERRORS:
            log.warning("%s: rejected control message from the host: %s", self.name, why)

    def _on_control(self, data: bytes) -> None:
        """One control message from the host (untrusted)."""
        try:
            msg = parse_control(data, from_driver=False)
        except ControlError as e:
            self._reject(str(e))
            return
        pid, event, value = msg.port, msg.event, msg.value
        if pid >= self.max_nr_ports:
            self._reject(f"event {event} for port {pid}, max_nr_ports is {self.max_nr_ports}")
            return
        port = self.ports.get(pid)
        if event == ConsoleEvent.DEVICE_ADD:
            if port is None:
                port = self._add_port(pid)
            # Linux answers a repeated DEVICE_ADD with PORT_READY again.
            self._control(pid, ConsoleEvent.PORT_READY, 1)
            return
        if port is None:
            self._reject(f"event {event} for port {pid}, which was never added")
            return
        if event == ConsoleEvent.DEVICE_REMOVE:
            del self.ports[pid]
            # Its buffers stay lent until they complete (or the device fails).
            self._removed = [p for p in self._removed if p._lent]
            self._removed.append(port)
            port._close(BrokenResourceError(f"{self.name}: port {pid} removed by the host"))
            self._signal()
        elif event == ConsoleEvent.CONSOLE_PORT:
            if value:
                port.console = True
                port.open()  # virtio 1.2 §5.3.6.2: a console port is always open
                self._signal()
        elif event == ConsoleEvent.RESIZE:
            try:
                cols, rows = parse_resize(msg.payload)
            except ControlError as e:
                self._reject(f"port {pid}: {e}")
                return
            port._resize(cols, rows)
        elif event == ConsoleEvent.PORT_OPEN:
            port.host_connected = bool(value)
            self._signal()
        elif event == ConsoleEvent.PORT_NAME:
            try:
                name = parse_port_name(msg.payload)
            except ControlError as e:
                self._reject(f"port {pid}: {e}")
                return
            if any(p.name == name for p in self.ports.values() if p is not port):
                self._reject(f"PORT_NAME {name!r} for port {pid} is taken")
                return
            port.name = name
            self._signal()
        else:
            self._reject(f"event {event} (value {value}) for port {pid} is not a device event")

    # -- Driver --------------------------------------------------------------------
    def config_changed(self) -> None:
        if not self.multiport and 0 in self.ports:
            cols, rows = self._config_size()
            if cols and rows:
                self.ports[0]._resize(cols, rows)

    def detach(self, exc: BrokenResourceError) -> None:
        if self._closed is None:
            self._closed = exc
        for p in (*self.ports.values(), *self._removed):
            p._close(exc)
            p._reclaim_lent()
        self._signal()

    def info(self) -> dict[str, object]:
        return {
            "multiport": self.multiport,
            "max_nr_ports": self.max_nr_ports,
            "control_errors": self.control_errors,
            "ports": [
                {
                    "id": p.id,
                    "name": p.label,
                    "console": p.console,
                    "host_open": p.host_connected,
                    "bytes_in": p.bytes_in,
                    "bytes_out": p.bytes_out,
                    "irq_echoed": p.irq_echoed,
                }
                for p in sorted(self.ports.values(), key=lambda p: p.id)
            ],
        }


class SinglePortConsole(ConsoleDevice):
    """The console driver with MULTIPORT left unacked (port 0 only), e.g. for a card
    booted with ``MIC_CARD_CONSOLE_MULTIPORT=0``."""

    FEATURES: ClassVar[int] = int(ConsoleFeature.SIZE)
