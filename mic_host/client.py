"""The Python client library of the mic-host daemon.

Owns :func:`connect` (talk to a running daemon through ``STATE_DIR/control.sock``),
:func:`launch` (start a daemon as a child process, talk to it, stop it), and
the :class:`Client` / :class:`CardClient` API over :mod:`mic_host.protocol`.
Error responses are re-raised as the ``virtio.errors`` class they name.
Imports asyncio, ``mic_host.protocol`` and ``mic_host.config``; never the
daemon module itself (it is only ever run as ``python -m mic_host.daemon``).

::

    async with mic_host.launch(state_dir=tmp) as client:
        card = client.card("mic0")
        await card.wait("online", timeout=60)
        print(await card.stats())
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from mic_host.config import parse_config, resolve_state_dir
from mic_host.lifecycle import CardState
from mic_host.protocol import (
    MAX_MESSAGE,
    SOCKET_NAME,
    control_socket_path,
    decode_response,
    encode_request,
)
from virtio.errors import (
    BrokenResourceError,
    ClosedResourceError,
    ConfigError,
    LocalProtocolError,
    MicError,
    MicTimeoutError,
    RemoteProtocolError,
)

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager

    from mic_host.accel import OffloadPool, OffloadSession
    from mic_host.terminal import ConsoleStream, ExecResult

__all__ = ["CardClient", "Client", "connect", "launch", "DEFAULT_DAEMON_MODULE"]

log = logging.getLogger(__name__)

DEFAULT_DAEMON_MODULE = "mic_host.daemon"
_TAIL_LINES = 40


class Client:
    """One connection to a daemon. Requests may run concurrently; each gets its own id.

    Use :func:`connect` or :func:`launch` rather than the constructor.
    """

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state_dir: Path
    ) -> None:
        self.state_dir = state_dir
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._lost: MicError | None = None
        self._closed = False
        self._write_lock = asyncio.Lock()
        self._task = asyncio.get_running_loop().create_task(
            self._read_loop(), name="mic-host-client-reader"
        )

    # -- plumbing

    async def _read_loop(self) -> None:
        why: MicError = BrokenResourceError("connection to the mic-host daemon stopped")
        try:
            while True:
                try:
                    line = await self._reader.readuntil(b"\n")
                except asyncio.IncompleteReadError:
                    why = BrokenResourceError(
                        f"the mic-host daemon at {self.state_dir} closed the connection"
                    )
                    break
                except asyncio.LimitOverrunError:
                    why = RemoteProtocolError(
                        f"daemon sent a line over the {MAX_MESSAGE}-byte bound", reason="too-long"
                    )
                    break
                except OSError as e:
                    why = BrokenResourceError(f"connection to the mic-host daemon lost: {e}")
                    break
                try:
                    resp = decode_response(line)
                except RemoteProtocolError as e:
                    why = e
                    break
                fut = self._pending.pop(resp.id, None) if resp.id is not None else None
                if fut is None:
                    if not resp.ok:
                        log.warning("mic-host daemon: %s: %s", resp.error_type, resp.error_message)
                    continue
                if not fut.done():
                    try:
                        fut.set_result(resp.unwrap())
                    except MicError as e:
                        fut.set_exception(e)
        finally:
            if self._closed:
                why = ClosedResourceError("client closed")
            self._fail_pending(why)

    def _fail_pending(self, why: MicError) -> None:
        self._lost = why
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(why)

    async def request(self, op: str, card: str | None = None, **args: Any) -> dict[str, Any]:
        """Send one request and wait for its result.

        Raises:
            LocalProtocolError: a bad op or argument (checked before sending).
            MicError subclasses: the daemon's error, as the class it names.
            BrokenResourceError: the connection was lost.
            ClosedResourceError: the client was closed.
        """
        if self._closed:
            raise ClosedResourceError("client closed")
        if self._lost is not None:
            raise BrokenResourceError(f"connection to the mic-host daemon lost: {self._lost}")
        rid = next(self._ids)
        data = encode_request(rid, op, card, **args)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            async with self._write_lock:
                self._writer.write(data)
                await self._writer.drain()
        except OSError as e:
            self._pending.pop(rid, None)
            lost = BrokenResourceError(f"connection to the mic-host daemon lost: {e}")
            self._fail_pending(lost)
            raise lost from e
        try:
            return await fut
        finally:
            self._pending.pop(rid, None)

    async def aclose(self) -> None:
        """Close the connection; pending requests fail with ClosedResourceError."""
        if self._closed:
            return
        self._closed = True
        self._writer.close()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def lost(self) -> bool:
        """The connection is gone (daemon exited, or it broke the protocol)."""
        return self._lost is not None and not self._closed

    # -- daemon-wide operations

    async def ping(self) -> dict[str, Any]:
        """``{"pid": int, "version": int, ...}`` of the daemon."""
        return await self.request("ping")

    async def status(self, card: str | None = None) -> dict[str, Any]:
        """``{"cards": [card status, ...], ...}`` for every card, or only ``card``."""
        return await self.request("status", card)

    async def suspend(self) -> dict[str, Any]:
        """Host PM suspend: the daemon stops every card (COSM ``cosm_stop``)."""
        return await self.request("suspend")

    async def resume(self) -> dict[str, Any]:
        """Host PM resume: the daemon boots again the cards suspend stopped."""
        return await self.request("resume")

    def card(self, name: str) -> CardClient:
        """A handle on one card (no request is made)."""
        return CardClient(self, name)


class CardClient:
    """Operations on one card through a :class:`Client`."""

    __slots__ = ("client", "name")

    def __init__(self, client: Client, name: str) -> None:
        self.client = client
        self.name = name

    def __repr__(self) -> str:
        return f"<CardClient {self.name}>"

    async def status(self) -> dict[str, Any]:
        """This card's status: ``{"name", "state", "shutdown_status", "pid", "devices", ...}``."""
        res = await self.client.request("status", self.name)
        cards = res.get("cards")
        if isinstance(cards, list) and len(cards) == 1 and isinstance(cards[0], dict):
            return cards[0]
        return res

    async def state(self) -> CardState:
        """This card's lifecycle state."""
        return CardState((await self.status())["state"])

    async def boot(self, wait: bool = True, timeout: float | None = None) -> dict[str, Any]:
        """Boot (ready -> booting); with ``wait``, until online. ``timeout=None``: the card's."""
        return await self.client.request("boot", self.name, wait=wait, timeout=timeout)

    async def shutdown(self, wait: bool = True, timeout: float | None = None) -> dict[str, Any]:
        """Shut down (online -> shutting_down); with ``wait``, until ready."""
        return await self.client.request("shutdown", self.name, wait=wait, timeout=timeout)

    async def reset(self) -> dict[str, Any]:
        """Reset (any state but ready -> resetting -> ready or reset_failed)."""
        return await self.client.request("reset", self.name)

    async def wait(self, state: str | CardState, timeout: float | None = None) -> dict[str, Any]:
        """Wait until the card is in ``state``.

        Raises:
            LocalProtocolError: ``state`` is not a card state.
            MicTimeoutError: not reached within ``timeout`` (the daemon's bound if None).
        """
        try:
            wanted = CardState(state)
        except ValueError:
            states = ", ".join(s.value for s in CardState)
            raise LocalProtocolError(f"unknown card state {state!r} (states: {states})") from None
        return await self.client.request("wait", self.name, state=wanted.value, timeout=timeout)

    async def attach(self, type: str, **options: Any) -> dict[str, Any]:  # noqa: A002
        """Hot-add a device; returns ``{"device": "vdb", ...}``."""
        return await self.client.request("attach", self.name, type=type, options=options)

    async def attach_block(
        self,
        path: str | os.PathLike[str],
        *,
        size: int | str | None = None,
        create: bool = False,
        read_only: bool = False,
        serial: str | None = None,
        **options: Any,
    ) -> str | None:
        """Hot-add a virtio-blk disk backed by the raw image ``path``; returns the
        card's device name (``"vdb"``), or None if the card is not running (the
        disk is then kept for its next boot).

        ``size`` (bytes or ``"64M"``) is the size of an image ``create`` makes
        when ``path`` is missing; ``options`` are further block options
        (``num_queues``, ``queue_size``, ``blk_size``, ``discard``, ``name``).
        A relative ``path`` is taken from the daemon's state directory.

        Raises:
            ConfigError: bad options (missing image without ``create``, bad size...).
            LocalProtocolError: the name is taken or the device page is full.
            MicTimeoutError: the card did not bind the disk in time.
        """
        opts: dict[str, Any] = {"image": os.fspath(path), **options}
        if size is not None:
            opts["size"] = size
        if create:
            opts["create"] = True
        if read_only:
            opts["read_only"] = True
        if serial is not None:
            opts["serial"] = serial
        res = await self.attach("block", **opts)
        dev = res.get("device")
        return dev if isinstance(dev, str) else None

    async def detach(self, device: str) -> dict[str, Any]:
        """Hot-remove a device by its card device name or its label."""
        return await self.client.request("detach", self.name, device=device)

    async def stats(self) -> dict[str, Any]:
        """Per-device, per-queue counters (kicks, interrupts, buffers, bytes, errors)."""
        return await self.client.request("stats", self.name)

    async def net(self, device: str | None = None, *, link: bool | None = None) -> dict[str, Any]:
        """The card's net devices (``micctl net``): ``{"card", "devices": [...]}``, each
        with backend, host interface, host/card addresses, namespaces, link, counters.
        ``link=True/False`` first sets the link status (a config change the card sees).
        """
        args: dict[str, Any] = {"device": device}
        if link is not None:
            args["link"] = "up" if link else "down"
        return await self.client.request("net", self.name, **args)

    async def run(self, app: str, *args: Any) -> dict[str, Any]:
        """Run ``module:function`` on the card with JSON ``args``; returns its result."""
        return await self.client.request("run", self.name, app=app, args=list(args))

    @asynccontextmanager
    async def accel_session(self, alg: str, **spec: Any) -> AsyncIterator[OffloadSession]:
        """A channel to the card's accelerators: ``out = await s.do(data)``.

        The data travels through card RAM and the card's engine workers serve
        it in place (``mic_host.accel``, docs/accel.md). ``spec``: ``op``,
        ``level``, ``key``, ``iv``, ``out_size``, ``heap_size``, ``policy``.

        Raises:
            BrokenResourceError: the card is not online; ResourceError: its
            accelerator is busy; LocalProtocolError: a bad spec.
        """
        from mic_host.accel import open_session

        s = await open_session(self.client.state_dir, self.name, alg, **spec)
        try:
            yield s
        finally:
            await s.aclose()

    @asynccontextmanager
    async def accel_pool(
        self, alg: str, channels: int = 2, **spec: Any
    ) -> AsyncIterator[OffloadPool]:
        """``channels`` accelerator channels (one card engine each) used together:
        ``outs = await p.do_many(items)`` runs the shares in parallel. As
        :meth:`accel_session` otherwise."""
        from mic_host.accel import open_pool

        p = await open_pool(self.client.state_dir, self.name, alg, channels=channels, **spec)
        try:
            yield p
        finally:
            await p.aclose()

    async def exec(
        self,
        *argv: str,
        line: str | None = None,
        timeout: float | None = None,
        max_output: int | None = None,
        stdin: bytes | None = None,
    ) -> ExecResult:
        """Run a shell command on the card through its agent:
        ``out, err, status = await card.exec("sha256sum", "/dev/vda")``.

        ``argv`` or a command ``line`` (with ``>`` redirection); the card stops
        the command after ``timeout`` s (default 30; status 124).

        Raises:
            LocalProtocolError: card not online, or no agent port.
            MicTimeoutError: the agent did not answer.
        """
        from mic_host.terminal import exec_on

        return await exec_on(
            self,
            list(argv) if line is None else None,
            line=line,
            timeout=timeout,
            max_output=max_output,
            stdin=stdin,
        )

    def console(self, device: str | None = None) -> AbstractAsyncContextManager[ConsoleStream]:
        """``async with card.console() as con:`` a stream over the console's pty
        (``write``, ``read_until``, ``command``); see :class:`mic_host.terminal.ConsoleStream`.
        """
        from mic_host.terminal import open_console

        return open_console(self, device)

    async def console_resize(self, cols: int, rows: int, device: str | None = None) -> None:
        """Set the console's window size (the card gets VIRTIO_CONSOLE_RESIZE)."""
        await self.client.request("console_resize", self.name, cols=cols, rows=rows, device=device)


# ------------------------------------------------------------------ connect


async def _open(state_dir: Path) -> Client:
    path = control_socket_path(state_dir)
    if not path.exists():
        raise BrokenResourceError(f"no mic-host daemon at {state_dir} ({SOCKET_NAME} missing)")
    try:
        reader, writer = await asyncio.open_unix_connection(str(path), limit=MAX_MESSAGE + 1)
    except ConnectionRefusedError as e:
        raise BrokenResourceError(
            f"no mic-host daemon at {state_dir} ({SOCKET_NAME} refuses connections; "
            "a daemon that died?)"
        ) from e
    except FileNotFoundError as e:
        raise BrokenResourceError(
            f"no mic-host daemon at {state_dir} ({SOCKET_NAME} missing)"
        ) from e
    except OSError as e:
        raise BrokenResourceError(f"cannot connect to {path}: {e}") from e
    return Client(reader, writer, state_dir)


@asynccontextmanager
async def connect(
    state_dir: str | os.PathLike[str] | None = None,
) -> AsyncIterator[Client]:
    """Connect to the daemon serving ``state_dir`` (default: ``$MIC_STATE_DIR``, then the
    per-user default of :func:`mic_host.config.default_state_dir`).

    Raises:
        BrokenResourceError: no daemon there ("no mic-host daemon at DIR
            (control.sock missing)"), or it refuses connections.
        ConfigError: the socket path is too long.
    """
    client = await _open(resolve_state_dir(state_dir).absolute())
    try:
        yield client
    finally:
        await client.aclose()


# ------------------------------------------------------------------- launch


class _Output:
    """Drains the daemon's merged stdout/stderr, logs it, keeps the tail for errors."""

    def __init__(self, stream: asyncio.StreamReader | None) -> None:
        self.tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self._task = asyncio.get_running_loop().create_task(
            self._drain(stream), name="mic-host-daemon-output"
        )

    async def _drain(self, stream: asyncio.StreamReader | None) -> None:
        if stream is None:
            return
        out = logging.getLogger("mic_host.daemon.output")
        while line := await stream.readline():
            text = line.decode("utf-8", "replace").rstrip()
            self.tail.append(text)
            out.debug("%s", text)

    async def finish(self, timeout: float = 2.0) -> None:
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._task)
        except TimeoutError:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def text(self) -> str:
        if not self.tail:
            return "(no output)"
        return "\n".join(f"  | {line}" for line in self.tail)


def _config_file(state_dir: Path, config: str | os.PathLike[str] | None) -> Path | None:
    if config is None:
        return None
    if isinstance(config, str):
        # TOML text: check it here, so a bad config fails in the caller with
        # the key path rather than as a daemon that died.
        if "\n" not in config and config.strip().endswith(".toml") and "=" not in config:
            raise ConfigError(
                f"launch(config={config!r}): a str is TOML text; pass pathlib.Path for a file"
            )
        parse_config(config, "launch(config=...)", state_dir=state_dir)
        path = state_dir / "launch-config.toml"
        path.write_text(config, encoding="utf-8")
        return path
    return Path(config).expanduser().absolute()


def _prepare(
    state_dir: str | os.PathLike[str],
    config: str | os.PathLike[str] | None,
    env: dict[str, str] | None,
    python: str,
    module: str,
) -> tuple[Path, list[str], dict[str, str]]:
    """The daemon's state dir (created), argv and environment (sync file-system work)."""
    sd = Path(state_dir).expanduser().absolute()
    control_socket_path(sd)  # fail early on a path too long for a socket
    sd.mkdir(mode=0o700, parents=True, exist_ok=True)
    cfg = _config_file(sd, config)
    # The daemon is this script's: it stops if we die without closing it
    # (a test runner killed by CI, a Ctrl-C'd script), instead of lingering.
    argv = [python, "-m", module, "--state-dir", str(sd), "--exit-with-parent"]
    if cfg is not None:
        argv += ["--config", str(cfg)]
    child_env = dict(os.environ)
    child_env.pop("MIC_STATE_DIR", None)  # --state-dir says it
    child_env.update(env or {})
    # The child imports the same mic_host as we do, installed or not.
    src = str(Path(__file__).resolve().parent.parent)
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (src, child_env.get("PYTHONPATH", "")) if p
    )
    return sd, argv, child_env


async def _stop(proc: asyncio.subprocess.Process, grace: float) -> bool:
    """SIGTERM, then SIGKILL after ``grace`` seconds; reap. True if it had to be killed."""
    if proc.returncode is not None:
        return False
    # os.kill, not proc.send_signal: Popen.send_signal polls first, which would
    # reap a dead child behind the child watcher's back (it would then report
    # 255 instead of the real status). Until the watcher reaps it, the pid
    # cannot be reused, so signalling it is safe.
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        async with asyncio.timeout(grace):
            await proc.wait()
        return False
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        await proc.wait()
        return True


@asynccontextmanager
async def launch(
    state_dir: str | os.PathLike[str],
    config: str | os.PathLike[str] | None = None,
    *,
    startup_timeout: float = 30.0,
    stop_timeout: float = 10.0,
    env: dict[str, str] | None = None,
    python: str = sys.executable,
    module: str = DEFAULT_DAEMON_MODULE,
) -> AsyncIterator[Client]:
    """Start a daemon for ``state_dir``, yield a connected :class:`Client`, stop it.

    ``config``: None for the embedded default; a :class:`~pathlib.Path` (any
    ``os.PathLike``) to a TOML file; or a ``str`` of TOML text (validated
    here, written to ``STATE_DIR/launch-config.toml``). The daemon runs as
    ``python -m module --state-dir DIR [--config FILE]`` with ``env`` added to
    this process's environment; its output goes to the
    ``mic_host.daemon.output`` logger (DEBUG). On exit it gets SIGTERM, then
    SIGKILL after ``stop_timeout`` seconds, and is reaped.

    Raises:
        ConfigError: ``config`` text is invalid.
        BrokenResourceError: the daemon exited during startup, or exited on
            its own while in use (the message has its output's tail).
        MicTimeoutError: it did not answer ``ping`` within ``startup_timeout``.
    """
    sd, argv, child_env = _prepare(state_dir, config, env, python, module)
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=child_env,
        start_new_session=True,  # a ^C in the terminal reaches us, not the daemon
    )
    output = _Output(proc.stdout)
    client: Client | None = None
    try:
        client = await _wait_ready(proc, output, sd, startup_timeout)
        try:
            yield client
        finally:
            if proc.returncode is None and client.lost:
                # The connection broke: give the exit status a moment to arrive.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(2.0):
                        await proc.wait()
            died = proc.returncode
            await client.aclose()
        if died is not None:
            await output.finish()
            raise BrokenResourceError(
                f"mic-host daemon for {sd} exited with status {died} while in use:\n{output.text()}"
            )
    finally:
        killed = await _stop(proc, stop_timeout)
        await output.finish()
        if killed:
            log.warning(
                "mic-host daemon for %s ignored SIGTERM for %.1fs and was killed", sd, stop_timeout
            )


async def _wait_ready(
    proc: asyncio.subprocess.Process, output: _Output, state_dir: Path, bound: float
) -> Client:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + bound
    last: Exception | None = None
    delay = 0.02
    while True:
        if proc.returncode is not None:
            await output.finish()
            raise BrokenResourceError(
                f"mic-host daemon for {state_dir} exited with status {proc.returncode} "
                f"during startup:\n{output.text()}"
            )
        if loop.time() >= deadline:
            raise MicTimeoutError(
                f"mic-host daemon for {state_dir} did not answer ping within {bound:g}s "
                f"(last error: {last}):\n{output.text()}"
            )
        try:
            client = await _open(state_dir)
        except BrokenResourceError as e:
            last = e
        else:
            try:
                async with asyncio.timeout(max(0.1, deadline - loop.time())):
                    await client.ping()
                return client
            except (MicError, TimeoutError) as e:
                last = e
                await client.aclose()
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.2)
