"""The state directory and every path in it: one place for the daemon and the client.

A daemon and the ``micctl``/client side that talks to it must agree on where
things are without talking first, so the rules live here and nowhere else:

| path | what |
|---|---|
| ``STATE_DIR/control.sock`` | the daemon's control socket |
| ``STATE_DIR/mic-host.lock`` / ``mic-host.log`` | the daemon's lock and log |
| ``STATE_DIR/CARD-accel.sock`` | the card OS's accelerator offload endpoint |
| ``STATE_DIR/CARD-card.log`` | the card OS's log (its dmesg, persisted) |
| ``STATE_DIR/CARD-SUFFIX.log`` | per-card logs (``console``...) |
| ``STATE_DIR/CARD-DEVICE.netns`` | the record of a NIC's network namespace |
| ``STATE_DIR/launch-config.toml`` | the config a client ``launch()`` wrote |

The state directory is 0700 and everything in it 0600: it holds the control
socket (whoever can connect can boot cards and run commands on them), the
card link sockets, logs and disk images (:func:`secure_state_dir`).

Imports only the standard library and ``virtio.errors``: both the daemon side
and the client library sit above it.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from virtio.errors import ConfigError

__all__ = [
    "STATE_DIR_ENV",
    "SOCKET_NAME",
    "default_state_dir",
    "resolve_state_dir",
    "control_socket_path",
    "daemon_lock_path",
    "daemon_log_path",
    "accel_socket_path",
    "card_log_path",
    "netns_record_path",
    "launch_config_path",
    "secure_state_dir",
]

log = logging.getLogger(__name__)

#: Environment variable naming the state directory (daemon, micctl, client).
STATE_DIR_ENV = "MIC_STATE_DIR"
SOCKET_NAME = "control.sock"
#: sockaddr_un.sun_path is 108 bytes including the NUL (unix(7)).
_SUN_PATH_MAX = 107


def default_state_dir() -> Path:
    """The state directory when neither ``--state-dir`` nor ``$MIC_STATE_DIR`` says one.

    ``$XDG_STATE_HOME/mic-vop`` (``~/.local/state/mic-vop``): per user, the same
    from any working directory (so ``micctl`` finds the daemon wherever it is
    run), persistent (block images live there), and short enough for the
    108-byte limit of a Unix socket path.
    """
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "mic-vop"


def resolve_state_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """``explicit`` if given, else ``$MIC_STATE_DIR`` if set, else :func:`default_state_dir`."""
    if explicit is not None and str(explicit) != "":
        return Path(explicit).expanduser()
    env = os.environ.get(STATE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return default_state_dir()


def control_socket_path(state_dir: str | os.PathLike[str]) -> Path:
    """``STATE_DIR/control.sock``.

    Raises:
        ConfigError: the path is too long for a Unix socket (108 bytes).
    """
    path = Path(state_dir).expanduser().absolute() / SOCKET_NAME
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise ConfigError(
            f"{path}: control socket path is longer than {_SUN_PATH_MAX} bytes "
            "(a Unix socket limit); choose a shorter state directory"
        )
    return path


def daemon_lock_path(state_dir: Path) -> Path:
    return state_dir / "mic-host.lock"


def daemon_log_path(state_dir: Path) -> Path:
    return state_dir / "mic-host.log"


def accel_socket_path(state_dir: str | os.PathLike[str], card: str) -> Path:
    """Where card ``card`` of the daemon in ``state_dir`` listens for offload channels."""
    return Path(state_dir) / f"{card}-accel.sock"


def card_log_path(state_dir: Path, card: str, suffix: str) -> Path:
    """``STATE_DIR/CARD-SUFFIX.log`` (``card`` for the card OS, ``console``...)."""
    return state_dir / f"{card}-{suffix}.log"


def netns_record_path(state_dir: Path, card: str, device: str) -> Path:
    """The file recording the network namespace a NIC of ``card`` made."""
    return state_dir / f"{card}-{device}.netns"


def launch_config_path(state_dir: Path) -> Path:
    return state_dir / "launch-config.toml"


def secure_state_dir(state_dir: Path) -> None:
    """Create ``state_dir`` 0700, or tighten an existing one this user owns to 0700.

    The directory holds the control socket, the card link sockets, logs and
    disk images: nobody else has business in it. A directory owned by another
    user is left alone with a warning (the files in it are still 0600).

    Raises:
        OSError: it cannot be created.
    """
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.stat(state_dir)
    mode = stat.S_IMODE(st.st_mode)
    if not mode & 0o077:
        return
    if st.st_uid != os.geteuid():
        log.warning(
            "state directory %s is mode %04o and not ours (uid %d): others may reach it",
            state_dir,
            mode,
            st.st_uid,
        )
        return
    log.warning("state directory %s was mode %04o: tightening it to 0700", state_dir, mode)
    os.chmod(state_dir, mode & 0o700)
