"""virtio-console backend (virtio 1.2 §5.3): the card's ``hvc0`` on a host pty, plus named ports.

Queues (§5.3.2, :func:`virtio.console.port_queues`): 0/1 are port 0's
receiveq/transmitq (receiveq: host -> card, the card posts empty buffers the
host fills; transmitq: card -> host), and, with ``VIRTIO_CONSOLE_F_MULTIPORT``,
2/3 are the control receiveq/transmitq and 4+2k/5+2k the queues of port k+1.
VOP allows 8 queues per device, so at most two named ports.

Control protocol (§5.3.6.2, Linux ``drivers/char/virtio_console.c``, QEMU
``hw/char/virtio-serial-bus.c``): the driver sends DEVICE_READY; we answer
DEVICE_ADD for every port; on PORT_READY we send CONSOLE_PORT (port 0),
PORT_NAME (named ports), PORT_OPEN=1 (the host side is always open) and, for
the console, RESIZE. The driver answers CONSOLE_PORT with PORT_OPEN=1 and
opens/closes named ports with PORT_OPEN. The message formats (header,
PORT_NAME, RESIZE in Linux's order) are :mod:`virtio.console`'s. Anything else
the card sends on the control queue is rejected: logged, counted, and ignored.

Port 0 output is appended to ``log_path`` and to an in-memory history, and
written to a :class:`~mic_host.backends.console_pty.ConsolePty` (re-exported
here) when one is given. The pty belongs to the
card (the daemon's ``CardManager``), not to this backend: a backend lives for
one boot, the pty for the daemon's life, so ``/dev/pts/N`` keeps working
across reboots. Named-port output goes to a per-port callback (the agent).

Must not import ``transport`` or ``mic_card``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

from mic_host.agent import AgentClient
from mic_host.backends import BackendContext
from mic_host.backends.console_pty import ConsolePty
from mic_host.endpoint import QueueEndpoint
from virtio.agent import AGENT_PORT
from virtio.console import (
    CONTROL_RX,
    CONTROL_TX,
    ControlError,
    build_config,
    max_ports,
    num_queues,
    pack_control,
    pack_resize,
    parse_control,
    port_name_problem,
    port_queues,
)
from virtio.constants import ConsoleEvent, ConsoleFeature, DeviceType
from virtio.errors import (
    BrokenResourceError,
    ClosedResourceError,
    ConfigError,
    LocalProtocolError,
    MicError,
)
from virtio.layouts import MAX_NUM_VQ

__all__ = [
    "AGENT_PORT",
    "CONSOLE_QUEUE_SIZE",
    "ConsoleBackend",
    "ConsolePty",
    "HostPort",
]

log = logging.getLogger(__name__)

CONSOLE_QUEUE_SIZE = 64
#: Ports one device can have: a VOP device has at most 8 queues (port 0, the
#: control pair, then a pair per named port).
_MAX_PORTS = max_ports(MAX_NUM_VQ)
_LOGGED_ERRORS = 20  # control errors logged per backend (then only counted)


# --------------------------------------------------------------------------
# ports


class HostPort:
    """The host end of one console port: input queued for the card, output handed on."""

    def __init__(
        self,
        backend: ConsoleBackend,
        port_id: int,
        name: str | None,
        on_output: Callable[[bytes], None],
        *,
        max_pending: int,
    ) -> None:
        self.backend = backend
        self.id = port_id
        self.name = name
        self.console = port_id == 0
        self.on_output = on_output
        self.ready = False  # the card added it (PORT_READY 1)
        self.guest_open = False  # the card has it open (PORT_OPEN from the driver)
        self._open_changed = asyncio.Event()
        self._pending = bytearray()
        self._max_pending = max_pending
        self._in_event = asyncio.Event()
        self._room_event = asyncio.Event()
        self._room_event.set()
        self.on_room: Callable[[], None] | None = None
        self.bytes_from_card = 0
        self.bytes_to_card = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    def set_guest_open(self, value: bool) -> None:
        self.guest_open = value
        self._open_changed.set()
        self._open_changed = asyncio.Event()

    async def wait_open(self) -> None:
        """Wait until the card has the port open (bound it with ``asyncio.timeout``)."""
        while not self.guest_open:
            await self._open_changed.wait()

    def write_nowait(self, data: bytes) -> bool:
        """Queue ``data`` for the card; False when the queue is over its bound (data kept)."""
        self._pending += data
        self._in_event.set()
        return len(self._pending) < self._max_pending

    async def write(self, data: bytes) -> None:
        """Queue ``data`` for the card (waits while too much is queued)."""
        while len(self._pending) >= self._max_pending:
            self._room_event.clear()
            await self._room_event.wait()
        self.write_nowait(data)

    async def rx_loop(self, q: QueueEndpoint) -> None:
        """Host -> card: fill the buffers the card posts on the port's receiveq."""
        while True:
            while not self._pending:
                self._in_event.clear()
                await self._in_event.wait()
            try:
                chain = await q.get()
            except BrokenResourceError:
                try:
                    await q.wait_live()  # input stays queued across a reset
                except ClosedResourceError:
                    return
                continue
            except ClosedResourceError:
                return
            n = chain.write(self._pending)
            del self._pending[:n]
            self.bytes_to_card += n
            q.put(chain, n)
            if len(self._pending) < self._max_pending:
                self._room_event.set()
                if self.on_room is not None:
                    self.on_room()

    async def tx_loop(self, q: QueueEndpoint) -> None:
        """Card -> host: every chain on the port's transmitq is output."""
        async for chain in q.chains():
            data = chain.read()
            q.put(chain, 0)
            if data:
                self.bytes_from_card += len(data)
                self.on_output(data)


# --------------------------------------------------------------------------
# the backend


class ConsoleBackend:
    """A virtio console: port 0 on a pty + log, named ports (the agent) with MULTIPORT.

    Options: ``name`` (default ``"console"``), ``log_path`` (append port 0
    output there), ``history`` (bytes kept in memory, default 64 KiB),
    ``cols``/``rows`` (initial window size), ``max_pending`` (input bytes
    queued per port before writers wait), ``multiport`` (offer
    VIRTIO_CONSOLE_F_MULTIPORT, default true), ``ports`` (names of the named
    ports, default the agent's; at most 2), ``pty`` (a :class:`ConsolePty`
    owned by the caller).
    """

    device_type = int(DeviceType.CONSOLE)

    def __init__(
        self,
        *,
        name: str = "console",
        log_path: str | os.PathLike[str] | None = None,
        history: int = 64 * 1024,
        cols: int = 80,
        rows: int = 25,
        max_pending: int = 1 << 20,
        queue_size: int = CONSOLE_QUEUE_SIZE,
        multiport: bool = True,
        ports: Sequence[str] = (AGENT_PORT,),
        pty: ConsolePty | None = None,
    ) -> None:
        if history <= 0 or max_pending <= 0:
            raise ConfigError(f"console {name}: history and max_pending must be positive")
        if isinstance(ports, str):
            ports = [ports]
        ports = list(ports) if multiport else []
        if len(ports) > _MAX_PORTS - 1:
            raise ConfigError(
                f"console {name}: at most {_MAX_PORTS - 1} named ports ({MAX_NUM_VQ} queues)"
            )
        for p in ports:
            # Names go on micctl command lines: no spaces, on top of the wire rule.
            if port_name_problem(p) is not None or " " in p:
                raise ConfigError(f"console {name}: bad port name {p!r}")
        if len(set(ports)) != len(ports):
            raise ConfigError(f"console {name}: duplicate port names {ports}")
        self.name = name
        self.pty = pty
        if pty is not None and pty.cols and pty.rows:
            cols, rows = pty.cols, pty.rows
        self.cols = cols
        self.rows = rows
        self.queue_size = queue_size
        self.multiport = multiport
        self.log_path = Path(log_path) if log_path is not None else None
        self._log: BinaryIO | None = None
        if self.log_path is not None:
            try:
                self._log = self.log_path.open("ab")
            except OSError as e:
                raise ConfigError(f"console {name}: cannot open log {self.log_path}: {e}") from e
        self._history = bytearray()
        self._history_max = history
        self._out_event = asyncio.Event()
        self.ports: list[HostPort] = [
            HostPort(self, 0, None, self._output, max_pending=max_pending)
        ]
        self.agent: AgentClient | None = None
        for i, pname in enumerate(ports, start=1):
            port = HostPort(self, i, pname, self._drop(i), max_pending=max_pending)
            if pname == AGENT_PORT:
                self.agent = AgentClient(port, name)
                port.on_output = self.agent.feed
            self.ports.append(port)
        self._ctrl_out: collections.deque[bytes] = collections.deque()
        self._ctrl_event = asyncio.Event()
        self._ctx: BackendContext | None = None
        self.driver_ready = False
        self.control_errors = 0
        self.control_messages = 0

    # -- Backend -----------------------------------------------------------------
    def features(self) -> int:
        f = ConsoleFeature.SIZE
        if self.multiport:
            f |= ConsoleFeature.MULTIPORT
        return int(f)

    def config_bytes(self) -> bytes:
        return build_config(self.cols, self.rows, len(self.ports))

    def queue_sizes(self) -> Sequence[int]:
        return (self.queue_size,) * num_queues(len(self.ports), self.multiport)

    async def run(self, ctx: BackendContext) -> None:
        self._ctx = ctx
        port0 = self.ports[0]
        if self.pty is not None:
            pty = self.pty
            port0.on_room = pty.resume
            pty.attach(port0.write_nowait)
        try:
            async with asyncio.TaskGroup() as tg:
                for p in self.ports:
                    rx, tx = port_queues(p.id)
                    tg.create_task(p.tx_loop(ctx.queues[tx]))
                    tg.create_task(p.rx_loop(ctx.queues[rx]))
                if self.multiport:
                    tg.create_task(self._control_in(ctx.queues[CONTROL_TX]))
                    tg.create_task(self._control_out(ctx.queues[CONTROL_RX]))
        finally:
            if self.pty is not None:
                self.pty.detach()

    async def aclose(self) -> None:
        if self.agent is not None:
            self.agent.close(BrokenResourceError(f"{self.name}: the card's console went away"))
        if self.pty is not None:
            self.pty.detach()
        if self._log is not None:
            self._log.close()
            self._log = None

    @property
    def negotiated(self) -> bool:
        """The card finished feature negotiation (the device is or was live)."""
        return self._ctx is not None and self._ctx.features != 0

    @property
    def multiport_active(self) -> bool:
        """The card acked MULTIPORT (so the control queue and named ports are in use)."""
        return self._ctx is not None and bool(self._ctx.features & ConsoleFeature.MULTIPORT)

    def port(self, name: str) -> HostPort:
        """The named port ``name``.

        Raises:
            LocalProtocolError: no such port.
        """
        for p in self.ports:
            if p.name == name:
                return p
        raise LocalProtocolError(f"{self.name}: no port named {name!r}")

    def _drop(self, port_id: int) -> Callable[[bytes], None]:
        def drop(data: bytes) -> None:
            log.debug("%s: port %d: %d bytes with no reader dropped", self.name, port_id, len(data))

        return drop

    # -- port 0 output ---------------------------------------------------------------
    def _output(self, data: bytes) -> None:
        if self._log is not None:
            try:
                self._log.write(data)
                self._log.flush()
            except OSError as e:
                log.error("%s: console log write failed: %s", self.name, e)
        if self.pty is not None:
            self.pty.write(data)
        self._history += data
        if len(self._history) > self._history_max:
            del self._history[: len(self._history) - self._history_max]
        self._out_event.set()

    def output(self) -> bytes:
        """The last ``history`` bytes the card wrote on port 0."""
        return bytes(self._history)

    async def wait_output(self, needle: bytes) -> bytes:
        """Wait until ``needle`` appears in the history; return the history.

        Bound it with ``asyncio.timeout`` (the history keeps the last
        ``history`` bytes, so a needle longer than that never matches).
        """
        while needle not in self._history:
            self._out_event.clear()
            await self._out_event.wait()
        return bytes(self._history)

    async def write(self, data: bytes) -> None:
        """Queue ``data`` as console (port 0) input for the card."""
        await self.ports[0].write(data)

    # -- window size -----------------------------------------------------------------
    async def resize(self, cols: int, rows: int) -> None:
        """Tell the card the console's window size: RESIZE on the control queue
        with MULTIPORT, else the config space (cols/rows, VIRTIO_CONSOLE_F_SIZE).

        Raises:
            LocalProtocolError: bad size.
            MicTimeoutError: the card did not acknowledge the config change.
        """
        if not (0 < cols < 65536 and 0 < rows < 65536):
            raise LocalProtocolError(f"bad window size {cols}x{rows}")
        self.cols, self.rows = cols, rows
        if self.pty is not None:
            self.pty.resize(cols, rows)
        ctx = self._ctx
        if ctx is None or not ctx.features:
            return  # not live yet: the config space is read at probe
        if self.multiport_active:
            if self.ports[0].ready:
                self._send_resize()
        else:
            await ctx.update_config(self.config_bytes())

    def _send_resize(self) -> None:
        self._send(0, ConsoleEvent.RESIZE, 0, pack_resize(self.cols, self.rows))

    # -- control queue -----------------------------------------------------------------
    def _send(self, port_id: int, event: ConsoleEvent, value: int, extra: bytes = b"") -> None:
        self._ctrl_out.append(pack_control(port_id, event, value, extra))
        self._ctrl_event.set()

    def _send_raw(self, data: bytes) -> None:
        """Fault injection (tests): put ``data`` on the card's control receiveq as is."""
        self._ctrl_out.append(bytes(data))
        self._ctrl_event.set()

    async def _control_out(self, q: QueueEndpoint) -> None:
        """Host -> card control messages, one per buffer (the driver parses one per buffer)."""
        while True:
            while not self._ctrl_out:
                self._ctrl_event.clear()
                await self._ctrl_event.wait()
            try:
                chain = await q.get()
            except BrokenResourceError:
                try:
                    await q.wait_live()
                except ClosedResourceError:
                    return
                continue
            except ClosedResourceError:
                return
            msg = self._ctrl_out.popleft()
            if chain.writable_len < len(msg):
                self._reject(f"card's control buffer of {chain.writable_len} B < {len(msg)} B")
                q.put(chain, 0)
                continue
            q.put(chain, chain.write(msg))

    async def _control_in(self, q: QueueEndpoint) -> None:
        async for chain in q.chains():
            try:
                data = chain.read()
            except MicError as e:  # a chain the card botched: reject, keep serving
                self._reject(f"unreadable control buffer: {e}")
                data = b""
            q.put(chain, 0)
            if data:
                self.control_messages += 1
                self._on_control(data)

    def _reject(self, why: str) -> None:
        self.control_errors += 1
        if self.control_errors <= _LOGGED_ERRORS:
            log.warning("%s: rejected control message from the card: %s", self.name, why)

    def _on_control(self, data: bytes) -> None:
        """One message from the card (untrusted): act on it or reject it."""
        try:
            msg = parse_control(data, from_driver=True)
        except ControlError as e:
            self._reject(str(e))
            return
        pid, event, value = msg.port, msg.event, msg.value
        if event == ConsoleEvent.DEVICE_READY:
            if value != 1:
                log.error("%s: the card's driver failed to initialise (DEVICE_READY 0)", self.name)
                return
            self.driver_ready = True
            for p in self.ports:
                p.ready = False
                p.set_guest_open(False)
                self._send(p.id, ConsoleEvent.DEVICE_ADD, 1)
            return
        if pid >= len(self.ports):
            self._reject(f"event {event} for port {pid}, max_nr_ports is {len(self.ports)}")
            return
        port = self.ports[pid]
        if event == ConsoleEvent.PORT_READY:
            if value != 1:
                log.error("%s: the card could not add port %d", self.name, pid)
                return
            port.ready = True
            if port.console:
                self._send(pid, ConsoleEvent.CONSOLE_PORT, 1)
                self._send_resize()
            if port.name is not None:
                self._send(pid, ConsoleEvent.PORT_NAME, 1, port.name.encode())
            self._send(pid, ConsoleEvent.PORT_OPEN, 1)  # the host end is always open
        elif event == ConsoleEvent.PORT_OPEN:
            if value > 1:
                self._reject(f"PORT_OPEN value {value} for port {pid}")
                return
            port.set_guest_open(bool(value))
            log.info("%s: port %d (%s) %s by the card", self.name, pid, port.name or "console",
                     "opened" if value else "closed")  # fmt: skip
        else:
            self._reject(f"event {event} (value {value}) for port {pid} is not a driver event")

    def stats(self) -> dict[str, int]:
        return {
            "bytes_from_card": self.ports[0].bytes_from_card,
            "bytes_to_card": self.ports[0].bytes_to_card,
            "pending_input": self.ports[0].pending,
            "control_messages": self.control_messages,
            "control_errors": self.control_errors,
        }
