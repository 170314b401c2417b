"""The card shell: a command registry, a tiny file namespace, the commands, the interactive shell.

Split by concept, lowest first:

- :mod:`~mic_card.shell.base`: errors (:class:`ShellError`, :class:`FsError`),
  exit statuses, the system's identity;
- :mod:`~mic_card.shell.fs`: the RAM file system (:class:`CardFS`);
- :mod:`~mic_card.shell.registry`: the command registry (:data:`COMMANDS`,
  :func:`command`, :func:`lazy_command`), :class:`ShellContext` and how a
  line runs (:func:`run_line`, :func:`run_argv`);
- the commands, registered on import: :mod:`~mic_card.shell.core`,
  :mod:`~mic_card.shell.files` (files and block devices),
  :mod:`~mic_card.shell.net` (imports the net driver, never the reverse);
- :mod:`~mic_card.shell.interactive`: the line editor on ``hvc0``
  (:class:`InteractiveShell`).

Importing the package registers every built-in command. Card code depends on
:class:`mic_card.services.CardServices`, never on the card OS. Must not
import ``transport``, ``mic_host`` or ``mic_card.card``.
"""

from mic_card.shell import core, files, net
from mic_card.shell.base import (
    MACHINE,
    STATUS_INTERRUPTED,
    STATUS_NOT_FOUND,
    STATUS_PIPE,
    STATUS_TIMEOUT,
    SYSNAME,
    VERSION,
    FsError,
    OutputFull,
    ShellError,
)
from mic_card.shell.files import parse_number
from mic_card.shell.fs import CardFS, File
from mic_card.shell.interactive import InteractiveShell
from mic_card.shell.registry import (
    COMMANDS,
    CaptureOutput,
    Command,
    FileOutput,
    Output,
    PortOutput,
    ShellContext,
    command,
    lazy_command,
    run_argv,
    run_line,
    split_line,
)

__all__ = [
    "COMMANDS",
    "MACHINE",
    "STATUS_INTERRUPTED",
    "STATUS_NOT_FOUND",
    "STATUS_PIPE",
    "STATUS_TIMEOUT",
    "SYSNAME",
    "VERSION",
    "CaptureOutput",
    "CardFS",
    "Command",
    "File",
    "FileOutput",
    "FsError",
    "InteractiveShell",
    "Output",
    "OutputFull",
    "PortOutput",
    "ShellContext",
    "ShellError",
    "command",
    "core",
    "files",
    "lazy_command",
    "net",
    "parse_number",
    "run_argv",
    "run_line",
    "split_line",
]
