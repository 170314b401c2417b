"""``mic-host``'s options that answer and exit without running a daemon.

``--version`` (from the package metadata), ``--print-default-config`` (the
embedded default TOML, :data:`mic_host.config.DEFAULT_CONFIG_TOML`) and
``--check-config FILE`` (load and check a config as the daemon would, print
a summary; exit 0 valid, 1 not). None of them creates the state directory,
takes its lock or writes a log. :func:`add_arguments` adds them to the
daemon's parser and :func:`run_offline` answers them. Imports the config,
the backend registry (the device types a config may name) and the paths;
never the daemon.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from typing import Any

from mic_host.backends import available_backends
from mic_host.config import (
    DEFAULT_CONFIG_TOML,
    DaemonConfig,
    check_device_types,
    format_size,
    load_config,
)
from mic_host.paths import control_socket_path, resolve_state_dir
from mic_host.version import package_version
from virtio.errors import ConfigError

__all__ = ["add_arguments", "check_config", "format_summary", "run_offline"]

EXIT_OK = 0
EXIT_INVALID = 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = (
        "Without --config the daemon runs the embedded default: card mic0, booted at "
        "start, with a console and a 64 MiB disk in the state directory "
        "(--print-default-config shows it). 'micctl help config' describes the file; "
        "'micctl help' the rest."
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    p.add_argument(
        "--check-config",
        metavar="FILE",
        help="check FILE as the daemon would load it, print a summary and exit "
        "(0 valid, 1 not); starts nothing",
    )
    p.add_argument(
        "--print-default-config",
        action="store_true",
        help="print the embedded default config (TOML) and exit: a starting point for --config",
    )


def check_config(path: str, state_dir: str | None) -> DaemonConfig:
    """Load ``path`` for the state directory the daemon would use, and check it fully.

    Raises:
        ConfigError: unreadable, invalid, an unknown device type, or a state
            directory whose control socket path is too long.
    """
    resolved = resolve_state_dir(state_dir)
    control_socket_path(resolved)
    cfg = load_config(path, state_dir=resolved)
    check_device_types(cfg, set(available_backends()))
    return cfg


def _option(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _device_line(type_: str, name: str | None, options: Mapping[str, Any]) -> str:
    opts = []
    for key, value in options.items():
        shown = format_size(value) if key == "size" and isinstance(value, int) else _option(value)
        opts.append(f"{key}={shown}")
    label = f" ({name})" if name else ""
    return f"    {type_}{label}" + (f": {' '.join(opts)}" if opts else "")


def format_summary(cfg: DaemonConfig) -> str:
    """What the daemon would run: its state directory, then each card and its devices."""
    lines = [f"{cfg.source}: valid", f"state directory: {cfg.state_dir}"]
    for card in cfg.cards:
        boot = "boots at start" if card.boot_at_start else "boots on request"
        lines.append(
            f"{card.name}: {boot}, card RAM {format_size(card.card_ram)}, "
            f"host RAM {format_size(card.host_ram)}, {len(card.devices)} device(s)"
        )
        lines.extend(_device_line(d.type, d.name, d.options) for d in card.devices)
    return "\n".join(lines)


def run_offline(args: argparse.Namespace) -> int | None:
    """Answer ``--print-default-config`` or ``--check-config``; None when neither was given."""
    if args.print_default_config:
        sys.stdout.write(DEFAULT_CONFIG_TOML)
        return EXIT_OK
    if args.check_config is None:
        return None
    try:
        cfg = check_config(args.check_config, args.state_dir)
    except (ConfigError, OSError) as e:
        print(f"mic-host: {e}", file=sys.stderr)
        return EXIT_INVALID
    print(format_summary(cfg))
    return EXIT_OK
