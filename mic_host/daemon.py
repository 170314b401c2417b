"""``mic-host``: the host daemon (Linux: the MIC host driver + ``mpssd``).

Owns the cards of its config (:class:`mic_host.card.CardManager` each), the
control socket (``STATE_DIR/control.sock``, :mod:`mic_host.control`) that
``micctl`` and the client library speak, the state-directory lock, logging
(stderr and ``STATE_DIR/mic-host.log``) and host suspend/resume. It is the
:class:`~mic_host.control.server.ControlHandler`: each control op lands in one of
the methods below, and every card fault stays inside that card.

Run: ``mic-host [--state-dir DIR] [--config FILE]`` or ``python -m mic_host.daemon``.
Exit codes: 0 stopped by SIGTERM/SIGINT, 2 bad config or state directory busy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from mic_host import host_cli
from mic_host.backends import available_backends
from mic_host.backends.net import create_net_backend
from mic_host.card import CardManager
from mic_host.card.devlist import devices_report
from mic_host.config import DaemonConfig, check_device_types, default_config, load_config
from mic_host.control.server import ControlServer, Stream
from mic_host.control.wire import PROTOCOL_VERSION
from mic_host.events import CURRENT_CARD, EventBus, card_context, emit, installed
from mic_host.hostlog import HostLog
from mic_host.lifecycle import CardState
from mic_host.paths import (
    control_socket_path,
    daemon_lock_path,
    daemon_log_path,
    resolve_state_dir,
    secure_state_dir,
)
from mic_host.streams import serve_events, serve_logs, track_app, watch_card
from mic_host.vhost_user.export import VhostUserExports, configured_switches
from transport import eventloop
from transport.tracing import install_from_env as install_trace
from virtio.agent import exec_problem
from virtio.errors import ConfigError, LocalProtocolError, MicError, ResourceError

__all__ = ["Daemon", "main"]

log = logging.getLogger("mic_host")


class Daemon:
    """The running daemon: cards by name, plus the control-socket handler methods."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.state_dir = config.state_dir
        self.cards = {
            c.name: CardManager(c, state_dir=self.state_dir, node_id=i + 1)
            for i, c in enumerate(config.cards)
        }
        self.suspended = False
        self._resume: list[str] = []
        #: the event stream (``micctl events``); the recent log lines per card (``serve``)
        self.bus = EventBus()
        self.hostlog: HostLog | None = None
        for m in self.cards.values():
            watch_card(self.bus, m)
        #: vhost-user net sockets on the cards' switches (``micctl vhost-user``)
        self.vhost_user = VhostUserExports(
            create_net_backend.switches, lambda: configured_switches(self.config)
        )

    def _card(self, name: str | None) -> CardManager:
        if name is None or name not in self.cards:
            raise LocalProtocolError(
                f"unknown card {name!r} (cards: {', '.join(self.cards) or 'none'})"
            )
        CURRENT_CARD.set(name)  # this request's log lines and events are about this card
        return self.cards[name]

    async def serve(self, stop: asyncio.Event) -> None:
        """Listen on the control socket, boot the cards marked ``boot_at_start``,
        and run until ``stop`` is set; then shut the cards down in order.

        Raises:
            ResourceError: another daemon owns the state directory.
        """
        self.hostlog = HostLog(self.cards, events=self.bus)
        try:
            with installed(self.bus), self.hostlog.installed():
                await self._serve(stop)
        finally:
            self.hostlog = None

    async def _serve(self, stop: asyncio.Event) -> None:
        try:
            async with ControlServer(self.state_dir, self):
                log.info(
                    "mic-host %d ready: state %s, control socket %s, cards %s",
                    os.getpid(),
                    self.state_dir,
                    control_socket_path(self.state_dir),
                    ", ".join(self.cards) or "none",
                )
                for m in self.cards.values():
                    if m.cfg.boot_at_start:
                        try:
                            with card_context(m.name):
                                await m.boot()
                        except MicError as e:
                            log.error("%s: boot at start failed: %s", m.name, e)
                await stop.wait()
                log.info("stopping: shutting the cards down")
        finally:
            await self.vhost_user.aclose()
            await asyncio.gather(*(m.aclose() for m in self.cards.values()))

    # -- ControlHandler ----------------------------------------------------
    async def ping(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "version": PROTOCOL_VERSION, "state_dir": str(self.state_dir)}

    async def status(self, card: str | None) -> dict[str, Any]:
        cards = [self._card(card)] if card is not None else list(self.cards.values())
        return {"cards": [m.status() for m in cards], "suspended": self.suspended}

    async def boot(self, card: str, wait: bool, timeout: float | None) -> dict[str, Any]:
        if self.suspended:
            raise LocalProtocolError("the host is suspended: resume first")
        m = self._card(card)
        await m.boot(wait=wait, timeout=timeout)
        return {"card": m.name, "state": str(m.state)}

    async def shutdown(self, card: str, wait: bool, timeout: float | None) -> dict[str, Any]:
        m = self._card(card)
        await m.shutdown(wait=wait, timeout=timeout)
        return {"card": m.name, "state": str(m.state)}

    async def reset(self, card: str) -> dict[str, Any]:
        m = self._card(card)
        await m.reset()
        return {"card": m.name, "state": str(m.state)}

    async def wait(self, card: str, state: str, timeout: float | None) -> dict[str, Any]:
        m = self._card(card)
        bound = timeout if timeout is not None else m.cfg.boot_timeout + m.cfg.shutdown_timeout
        await m.wait_state(CardState(state), timeout=bound)
        return {"card": m.name, "state": str(m.state)}

    async def attach(self, card: str, type: str, options: dict[str, Any]) -> dict[str, Any]:  # noqa: A002
        res = await self._card(card).attach(type, options)
        emit(
            "device_added", card, name=res["name"], device=res.get("device"), type=type, boot=False
        )
        return res

    async def detach(self, card: str, device: str) -> dict[str, Any]:
        res = await self._card(card).detach(device)
        emit("device_removed", card, name=res["removed"])
        return res

    async def stats(self, card: str) -> dict[str, Any]:
        return self._card(card).stats()

    async def run(
        self,
        card: str,
        app: str,
        args: list[Any],
        code: dict[str, Any] | None,
        tag: str | None,
        timeout: float | None,
    ) -> dict[str, Any]:
        m = self._card(card)
        return await track_app(m, app, m.run(app, args, timeout, code=code, tag=tag))

    async def exec(
        self,
        card: str,
        argv: list[Any] | None,
        line: str | None,
        timeout: float | None,
        max_output: float,
        stdin: str | None,
    ) -> dict[str, Any]:
        """Run a shell command on the card through its agent (stdout/stderr base64)."""
        problem = exec_problem(argv, line, timeout, max_output)
        if problem is not None:
            raise LocalProtocolError(f"exec: {problem}")
        return await self._card(card).exec(
            argv, line, timeout=timeout, max_output=int(max_output), stdin=stdin
        )

    async def console_resize(
        self, card: str, cols: float, rows: float, device: str | None
    ) -> dict[str, Any]:
        if cols != int(cols) or rows != int(rows):
            raise LocalProtocolError("console_resize: cols and rows must be integers")
        return await self._card(card).console_resize(int(cols), int(rows), device)

    async def net(self, card: str, device: str | None, link: str | None) -> dict[str, Any]:
        return await self._card(card).net(device, None if link is None else link == "up")

    async def devices(self, card: str) -> dict[str, Any]:
        return await devices_report(self._card(card))

    async def suspend(self) -> dict[str, Any]:
        """Host PM suspend (``cosm_stop``): stop every card, remember the running ones."""
        if self.suspended:
            return {"suspended": True, "resume": self._resume}
        self.suspended = True
        self._resume = []
        for m in self.cards.values():
            if m.state in (CardState.ONLINE, CardState.BOOTING):
                self._resume.append(m.name)
                with contextlib.suppress(MicError):
                    await m.shutdown(wait=True) if m.state is CardState.ONLINE else await m.reset()
            if m.state not in (CardState.READY,):
                with contextlib.suppress(MicError):
                    await m.reset()
        log.info("suspended; cards to boot on resume: %s", self._resume or "none")
        return {"suspended": True, "resume": self._resume}

    async def resume(self) -> dict[str, Any]:
        """Host PM resume: boot the cards that were running at suspend."""
        self.suspended = False
        booted = []
        for name in self._resume:
            m = self.cards[name]
            try:
                with card_context(name):
                    await m.boot(wait=True)
                booted.append(name)
            except MicError as e:
                log.error("%s: boot on resume failed: %s", name, e)
        self._resume = []
        return {"suspended": False, "booted": booted}

    async def events(
        self, card: str | None, kinds: list[Any], buffer: float, stream: Stream
    ) -> dict[str, Any]:
        """Stream events (:mod:`mic_host.streams`) of ``card`` or of every card."""
        if card is not None:
            self._card(card)
        return await serve_events(self.bus, stream, card, kinds, buffer)

    async def logs(
        self,
        card: str,
        source: str,
        lines: float,
        follow: bool,
        device: str | None,
        stream: Stream,
    ) -> dict[str, Any]:
        """Stream a card's console log and the daemon's lines about it (``micctl logs``)."""
        m = self._card(card)
        if self.hostlog is None:
            raise LocalProtocolError("the daemon is not serving")
        return await serve_logs(
            m, self.hostlog, stream, source=source, lines=lines, follow=follow, device=device
        )

    async def apps(self, card: str) -> dict[str, Any]:
        return await self._card(card).apps()

    async def kill(self, card: str, app_id: float | None, tag: str | None) -> dict[str, Any]:
        if app_id is not None and app_id != int(app_id):
            raise LocalProtocolError(f"kill: app id must be an integer, got {app_id}")
        return await self._card(card).kill(None if app_id is None else int(app_id), tag)

    async def vhost_user_export(self, socket: str, switch: str, mtu: float) -> dict[str, Any]:
        if mtu != int(mtu):
            raise LocalProtocolError(f"vhost-user export: mtu must be an integer, got {mtu}")
        return await self.vhost_user.export(switch, socket, int(mtu))

    async def vhost_user_unexport(self, socket: str) -> dict[str, Any]:
        return await self.vhost_user.unexport(socket)

    async def vhost_user_exports(self) -> dict[str, Any]:
        return self.vhost_user.list()


class _StateLock:
    """An flock on ``STATE_DIR/mic-host.lock``: one daemon per state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.path = daemon_lock_path(state_dir)
        self.fd = -1

    def __enter__(self) -> _StateLock:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            pid = self.path.read_text().strip() or "?"
            raise ResourceError(
                f"{self.path.parent}: another mic-host (pid {pid}) owns this state directory"
            ) from None
        os.fchmod(self.fd, 0o600)  # a lock file from an older daemon may be 0644
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


#: What ``--log-level`` takes (any case).
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _setup_logging(state_dir: Path, level: str) -> None:
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(level.upper())
    err = logging.StreamHandler(sys.stderr)
    err.setFormatter(fmt)
    path = daemon_log_path(state_dir)
    filelog = logging.FileHandler(path)
    filelog.setFormatter(fmt)
    with contextlib.suppress(OSError):
        os.chmod(path, 0o600)  # a log from an older daemon may be 0644
    root.addHandler(err)
    root.addHandler(filelog)


def load(args: argparse.Namespace) -> DaemonConfig:
    """The config the daemon runs: ``--config FILE`` or the embedded default.

    Raises:
        ConfigError: the file is unreadable or invalid (names file, key, problem).
    """
    state_dir = resolve_state_dir(args.state_dir)
    cfg = (
        load_config(args.config, state_dir=state_dir) if args.config else default_config(state_dir)
    )
    check_device_types(cfg, set(available_backends()))
    return cfg


async def _watch_parent(stop: asyncio.Event, parent: int) -> None:
    """``--exit-with-parent``: stop (in order) when the process that started us is gone."""
    while not stop.is_set():
        if os.getppid() != parent:
            log.warning("parent process %d exited: stopping", parent)
            stop.set()
            return
        await asyncio.sleep(0.5)


async def _amain(cfg: DaemonConfig, *, exit_with_parent: bool = False) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with asyncio.TaskGroup() as tg:
        watcher = tg.create_task(_watch_parent(stop, os.getppid())) if exit_with_parent else None
        await Daemon(cfg).serve(stop)
        if watcher is not None:
            watcher.cancel()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mic-host", description="The MIC-VOP host daemon.")
    p.add_argument(
        "--state-dir",
        default=None,
        help="state directory (default: $MIC_STATE_DIR, else ~/.local/state/mic-vop)",
    )
    p.add_argument("--config", default=None, help="TOML config (default: the embedded one)")
    p.add_argument(
        "--log-level",
        default="INFO",
        metavar="LEVEL",
        help="debug, info, warning, error or critical (default info)",
    )
    p.add_argument(
        "--exit-with-parent",
        action="store_true",
        help="stop when the process that started the daemon exits (used by mic_host.launch)",
    )
    p.add_argument(
        "--event-loop",
        choices=eventloop.LOOPS,
        default=None,
        help="event loop of the daemon and its cards (default: $MIC_EVENT_LOOP, else spin; "
        'uvloop needs pip install "mic-vop[uvloop]"; see docs/throughput.md)',
    )
    host_cli.add_arguments(p)  # --version, --check-config, --print-default-config
    args = p.parse_args(argv)
    if args.event_loop is not None:
        if (why := eventloop.unavailable(args.event_loop)) is not None:
            print(f"mic-host: --event-loop {args.event_loop}: {why}", file=sys.stderr)
            return 2
        os.environ[eventloop.ENV] = args.event_loop  # the cards inherit it
    if (answered := host_cli.run_offline(args)) is not None:
        return answered
    if args.log_level.upper() not in _LOG_LEVELS:
        # before the state directory, its lock or its log are touched: nothing is left
        print(
            f"mic-host: --log-level {args.log_level!r}: expected one of "
            f"{', '.join(lv.lower() for lv in _LOG_LEVELS)}",
            file=sys.stderr,
        )
        return 2
    # Everything the daemon creates is its user's alone: the state directory
    # 0700, files 0600 (logs, the lock, console logs, disk images, netns
    # records, sockets) and so is everything its card processes create, as
    # they inherit the umask. Sockets are bound this way from their first
    # moment; a chmod after bind() would leave a window.
    os.umask(0o077)
    try:
        cfg = load(args)
        control_socket_path(cfg.state_dir)  # a path too long for a socket: refuse up front
        cfg.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except (ConfigError, OSError) as e:
        print(f"mic-host: {e}", file=sys.stderr)
        return 2
    try:
        with _StateLock(cfg.state_dir):
            _setup_logging(cfg.state_dir, args.log_level)
            secure_state_dir(cfg.state_dir)  # after logging: a tightened mode is logged
            log.info("config: %s", cfg.source)
            install_trace("host")
            return eventloop.run(_amain(cfg, exit_with_parent=args.exit_with_parent))
    except ResourceError as e:
        print(f"mic-host: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
