"""Start a mic-host daemon for a script: :func:`launch`.

Owns the daemon as a child process of the script: its state directory and
command line (``python -m mic_host.daemon --state-dir DIR --exit-with-parent``),
the config it starts with (TOML text is checked here first and written to
``STATE_DIR/launch-config.toml``), waiting until it answers ``ping``, draining
its output, and stopping it (SIGTERM, then SIGKILL) and reaping it. The daemon
is only ever *run* (by module name), never imported: this module imports the
client's connection, ``mic_host.config`` (to check config text) and
``mic_host.paths``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from mic_host.client.connection import Client, open_connection
from mic_host.config import parse_config
from mic_host.paths import STATE_DIR_ENV, control_socket_path, launch_config_path
from virtio.errors import BrokenResourceError, ConfigError, MicError, MicTimeoutError

__all__ = ["DEFAULT_DAEMON_MODULE", "launch"]

log = logging.getLogger(__name__)

DEFAULT_DAEMON_MODULE = "mic_host.daemon"
_TAIL_LINES = 40


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
        path = launch_config_path(state_dir)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(fd, 0o600)  # state-directory files are 0600, an old one too
            f.write(config)
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
    child_env.pop(STATE_DIR_ENV, None)  # --state-dir says it
    child_env.update(env or {})
    # The child imports the same mic_host as we do, installed or not
    # (this file is SRC/mic_host/client/launch.py).
    src = str(Path(__file__).resolve().parents[2])
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
            client = await open_connection(state_dir)
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
