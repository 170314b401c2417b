"""``micctl``: the command-line control of a running mic-host daemon (after Linux ``micctrl``).

A thin CLI over the client library (:mod:`mic_host.client`): it never imports
the daemon side. The reference is ``docs/cli.md``. Its modules, lowest first:

- :mod:`~mic_host.micctl.registry`: the subcommand registry (:data:`SUBCOMMANDS`,
  :func:`register_subcommand`), exit codes, usage errors, shared argument types;
- :mod:`~mic_host.micctl.output`: tables, JSON, the progress report;
- :mod:`~mic_host.micctl.images`: block images made locally (``--copy-from``, ``--preallocate``);
- :mod:`~mic_host.micctl.commands` and :mod:`~mic_host.micctl.console`: the subcommands;
- :mod:`~mic_host.micctl.main`: :func:`build_parser` and :func:`main`.

Exit codes: 0 success, 1 the operation failed (or no daemon), 2 usage error,
130 interrupted, 141 stdout closed (``micctl stats mic0 | head``). Every
failure prints exactly one line ``micctl: <reason>`` on stderr. Run as
``micctl`` or ``python -m mic_host.micctl``.
"""

from mic_host.micctl.commands import attach_options
from mic_host.micctl.main import build_parser, main
from mic_host.micctl.output import (
    Progress,
    format_net,
    format_stats,
    format_status,
    format_table,
)
from mic_host.micctl.registry import SUBCOMMANDS, Subcommand, UsageError, register_subcommand

__all__ = [
    "SUBCOMMANDS",
    "Progress",
    "Subcommand",
    "UsageError",
    "attach_options",
    "build_parser",
    "format_net",
    "format_stats",
    "format_status",
    "format_table",
    "main",
    "register_subcommand",
]
