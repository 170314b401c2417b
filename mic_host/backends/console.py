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

Port 0 output is appended to ``log_path`` (a
:class:`~mic_host.backends.console_log.ConsoleLog`: written off the loop,
0600, rotated at a cap) and to an in-memory history, and
written to a :class:`~mic_host.backends.console_pty.ConsolePty` (re-exported
here) when one is given. The pty belongs to the
card (the daemon's ``CardManager``), not to this backend: a backend lives for
one boot, the pty for the daemon's life, so ``/dev/pts/N`` keeps working
across reboots. Named-port output goes to a per-port callback (the agent).

What the card can make this backend do is bounded (issue 14): a transmit chain
is read in pieces of :data:`TX_STEP` bytes, yielding to the loop between them,
and one over :data:`MAX_TX_CHAIN` is not read at all (returned used, counted:
the card's fault); a control chain is never read past the one header a card's
message is (:data:`virtio.console.MAX_DRIVER_CONTROL`); host -> card control
messages the card does not take are capped; the pty backlog and the log's
pending bytes are bounded; every daemon-log line the card can trigger goes
through one :class:`~mic_host.backends.loglimit.LogLimiter` per device.

Must not import ``transport`` or ``mic_card``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from mic_host.agent import AgentClient
from mic_host.backends import BackendContext
from mic_host.backends.console_log import LOG_MAX_BYTES, ConsoleLog
from mic_host.backends.console_port import CHAIN_COST, MAX_TX_CHAIN, TX_STEP, HostPort
from mic_host.backends.console_pty import ConsolePty
from mic_host.backends.loglimit import LogLimiter
from mic_host.endpoint import QueueEndpoint
from virtio.agent import AGENT_PORT
from virtio.console import (
    CONTROL_RX,
    CONTROL_SIZE,
    CONTROL_TX,
    MAX_DRIVER_CONTROL,
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
from virtio.split.chain import Chain

__all__ = [
    "AGENT_PORT",
    "CONSOLE_QUEUE_SIZE",
    "MAX_TX_CHAIN",
    "TX_STEP",
    "ConsoleBackend",
    "ConsolePty",
    "HostPort",
]

log = logging.getLogger(__name__)

CONSOLE_QUEUE_SIZE = 64
#: Ports one device can have: a VOP device has at most 8 queues (port 0, the
#: control pair, then a pair per named port).
_MAX_PORTS = max_ports(MAX_NUM_VQ)
#: Host -> card control messages queued at most (the card posts no buffers for
#: them, yet keeps asking: DEVICE_READY, PORT_READY...). A driver takes a
#: handful per port; past this the new ones are dropped.
_MAX_CTRL_OUT = 256


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
    owned by the caller), ``log_max_bytes`` (rotate the log at this size,
    default 8 MiB), ``max_chain`` (largest transmit chain read, default
    :data:`MAX_TX_CHAIN`).
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
        log_max_bytes: int = LOG_MAX_BYTES,
        max_chain: int = MAX_TX_CHAIN,
    ) -> None:
        if history <= 0 or max_pending <= 0 or max_chain <= 0:
            raise ConfigError(
                f"console {name}: history, max_pending and max_chain must be positive"
            )
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
        self.max_chain = max_chain
        self._limiter = LogLimiter(log, name)
        self.log_path = Path(log_path) if log_path is not None else None
        self._log: ConsoleLog | None = None
        if self.log_path is not None:
            self._log = ConsoleLog(self.log_path, label=name, max_bytes=log_max_bytes)
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
        self.dropped_output = 0  # bytes of named ports nobody reads
        self._ctrl_out: collections.deque[bytes] = collections.deque()
        self._ctrl_event = asyncio.Event()
        self._ctx: BackendContext | None = None
        self._ctrl_q: QueueEndpoint | None = None  # the control transmitq, while served
        self._ctrl_parked = False  # _control_in waits for a chain (the callback may serve)
        self.driver_ready = False
        self.control_errors = 0
        self.control_messages = 0
        self.control_dropped = 0  # host -> card messages over _MAX_CTRL_OUT

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
                if self._log is not None:
                    tg.create_task(self._log.run())
        finally:
            if self.pty is not None:
                self.pty.detach()

    async def aclose(self) -> None:
        if self.agent is not None:
            self.agent.close(BrokenResourceError(f"{self.name}: the card's console went away"))
        if self.pty is not None:
            self.pty.detach()
        self._limiter.close()
        if self._log is not None:
            await self._log.aclose()  # writes what is pending; later output is ignored

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
            self.dropped_output += len(data)  # no reader for that port: counted only

        return drop

    def card_fault(self, msg: str, *args: object) -> None:
        """A line the card caused: through this device's limiter."""
        self._limiter.warning(msg, *args)

    async def pause(self) -> None:
        """Between pieces of card work: let the loop run, wait while the log is behind."""
        await asyncio.sleep(0)
        if self._log is not None:
            await self._log.room()

    def held_back(self) -> bool:
        """The log is behind (:meth:`pause` would wait)."""
        return self._log is not None and self._log.behind

    async def flush_log(self) -> None:
        """Wait until the console log file has everything output so far."""
        if self._log is not None:
            await self._log.flush()

    # -- port 0 output ---------------------------------------------------------------
    def _output(self, data: bytes) -> None:
        if self.pty is not None:
            self.pty.write(data)  # first: someone may be waiting for it (an echo)
        if self._log is not None:
            self._log.append(data)
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
        if len(self._ctrl_out) >= _MAX_CTRL_OUT:
            # The card keeps asking (DEVICE_READY, PORT_READY) but posts no
            # buffers for the answers: do not let the queue grow with it.
            self.control_dropped += 1
            self.card_fault(
                "%s: %d control messages wait for buffers the card does not post; "
                "dropped %s for port %d", self.name, len(self._ctrl_out), event.name, port_id,
            )  # fmt: skip
            return
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
        """Card -> host control messages: served in the doorbell callback while
        this loop is parked (:meth:`_on_control_kick`), here otherwise."""
        budget = 0
        self._ctrl_q = q
        q.on_kick = self._on_control_kick
        self._ctrl_parked = True
        try:
            async for chain in q.chains():
                self._ctrl_parked = False
                self._control_chain(q, chain)
                budget += CHAIN_COST
                if budget >= TX_STEP:
                    budget = 0
                    await asyncio.sleep(0)
                self._ctrl_parked = True
        finally:
            q.on_kick = None
            self._ctrl_q = None

    def _on_control_kick(self) -> bool:
        """A doorbell: take the card's control messages right here (at most
        :data:`TX_STEP` worth); True when the queue was drained."""
        q = self._ctrl_q
        if q is None or not self._ctrl_parked:
            return False
        budget = 0
        served = drained = False
        try:
            while budget < TX_STEP:
                chain = q.poll()
                if chain is None:
                    drained = True
                    break
                served = True
                self._control_chain(q, chain)
                budget += CHAIN_COST
        except MicError:  # not live, or the ring broke: the loop finds out
            drained = False
        if served:
            q.flush()
        return drained

    def _control_chain(self, q: QueueEndpoint, chain: Chain) -> None:
        n = chain.readable_len
        data = b""
        if n > MAX_DRIVER_CONTROL:
            # Every message a driver sends is one 8-byte header (§5.3.6.2):
            # a longer buffer is malformed, and is not read at all.
            self._reject(f"buffer of {n} bytes, a driver's message is {CONTROL_SIZE} (not read)")
        else:
            try:
                data = chain.read()
            except MicError as e:  # a chain the card botched: reject, keep serving
                self._reject(f"unreadable control buffer: {e}")
        q.put(chain, 0)
        if data:
            self.control_messages += 1
            self._on_control(data)

    def _reject(self, why: str) -> None:
        self.control_errors += 1
        self.card_fault("%s: rejected control message from the card: %s", self.name, why)

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
                self._limiter.log(logging.ERROR,
                                  "%s: the card's driver failed to initialise (DEVICE_READY 0)",
                                  self.name)  # fmt: skip
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
                self._limiter.log(logging.ERROR, "%s: the card could not add port %d",
                                  self.name, pid)  # fmt: skip
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
            self._limiter.log(logging.INFO, "%s: port %d (%s) %s by the card", self.name, pid,
                              port.name or "console", "opened" if value else "closed")  # fmt: skip
        else:
            self._reject(f"event {event} (value {value}) for port {pid} is not a driver event")

    def stats(self) -> dict[str, int]:
        return {
            "bytes_from_card": self.ports[0].bytes_from_card,
            "bytes_to_card": self.ports[0].bytes_to_card,
            "pending_input": self.ports[0].pending,
            "control_messages": self.control_messages,
            "control_errors": self.control_errors,
            "control_dropped": self.control_dropped,
            "oversized_chains": sum(p.oversized for p in self.ports),
            "dropped_output": self.dropped_output,
            "pty_dropped": self.pty.dropped if self.pty is not None else 0,
            "log_suppressed": self._limiter.total_suppressed,
            **(self._log.stats() if self._log is not None else {}),
        }
