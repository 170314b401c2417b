"""``micctl help [TOPIC|COMMAND]`` and ``micctl completion bash``: no daemon needed.

``help`` prints a topic of :data:`mic_host.micctl.topics.TOPICS` (the
essentials, packaged, since ``docs/`` is not in a pip install) or a
subcommand's ``--help``. ``completion bash`` prints a bash completion script
generated from the parser itself (subcommands, their options, option and
positional choices, files for path options, card names asked of the daemon
through ``micctl completion --cards``), so it cannot drift from the commands.
Registered last, at import; imports the client library (for the card
names), the registry and the topics only.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
from collections.abc import Iterator

from mic_host.client.connection import connect
from mic_host.micctl.registry import (
    EXIT_OK,
    EXIT_USAGE,
    PROG,
    SUBCOMMANDS,
    local_subcommand,
    register_subcommand,
)
from mic_host.micctl.topics import TOPICS
from mic_host.paths import resolve_state_dir
from mic_host.version import package_version
from virtio.errors import MicError

__all__ = ["bash_completion"]

#: How long ``completion --cards`` may take to ask the daemon (a tab press waits for it).
CARDS_TIMEOUT = 2.0
_FILE_METAVARS = frozenset({"PATH", "SRC", "FILE"})
_DIR_METAVARS = frozenset({"DIR"})


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


# ------------------------------------------------------------------- help


def _conf_help(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "topic",
        nargs="?",
        choices=list(dict.fromkeys([*TOPICS, *SUBCOMMANDS])),
        metavar="TOPIC",
        help=f"a topic ({', '.join(TOPICS)}) or a command (a topic first: 'help exec' "
        "is the topic, 'exec --help' the options)",
    )


def _help(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args._parser
    if args.topic is None:
        width = max(len(t) for t in TOPICS)
        print(f"{PROG} {package_version()}: control a running mic-host daemon.\n")
        print("Topics (micctl help TOPIC):")
        for name, (summary, _) in TOPICS.items():
            print(f"  {name.ljust(width)}  {summary}")
        print(f"\nCommands ({PROG} help COMMAND, or {PROG} COMMAND --help):")
        subs = _subparsers(parser)
        width = max(len(n) for n in subs)
        for name in subs:
            print(f"  {name.ljust(width)}  {SUBCOMMANDS[name].help}")
        return EXIT_OK
    if args.topic in TOPICS:
        summary, text = TOPICS[args.topic]
        print(f"{args.topic}: {summary}\n\n{text}", end="")
        return EXIT_OK
    print(_subparsers(parser)[args.topic].format_help(), end="")
    return EXIT_OK


# ------------------------------------------------------------- completion


def _words(options: list[str]) -> str:
    return " ".join(shlex.quote(o) for o in options)


def _command_case(name: str, sp: argparse.ArgumentParser) -> Iterator[str]:
    """The ``case`` arm completing one subcommand's words."""
    options: list[str] = []
    values: list[str] = []  # case arms for "$prev" (an option that takes a value)
    positional_words: list[str] = []
    valued: list[str] = []
    cards = 0  # 1: one CARD (offered as the first positional), 2: CARD... (always)
    for a in sp._actions:
        if a.option_strings:
            options.extend(a.option_strings)
            if a.nargs == 0:
                continue
            valued.extend(a.option_strings)
            pattern = "|".join(a.option_strings)
            metavar = a.metavar if isinstance(a.metavar, str) else ""
            if a.choices is not None:
                words = _words([str(c) for c in a.choices])
                values.append(f'{pattern}) COMPREPLY=($(compgen -W "{words}" -- "$cur")); return;;')
            elif metavar in _DIR_METAVARS:
                values.append(f'{pattern}) COMPREPLY=($(compgen -d -- "$cur")); return;;')
            elif metavar in _FILE_METAVARS:
                values.append(f'{pattern}) COMPREPLY=($(compgen -f -- "$cur")); return;;')
            else:
                values.append(f"{pattern}) return;;")
        elif a.dest == "card":
            cards = 1
        elif a.dest == "cards":
            cards = 2
        elif a.choices is not None and a.nargs != argparse.REMAINDER:
            positional_words.extend(str(c) for c in a.choices)
    yield f"        {name})"
    if values:
        yield '            case "$prev" in'
        for v in values:
            yield f"                {v}"
        yield "            esac"
    yield f'            opts="{_words(options)}"'
    yield f'            words="{_words(positional_words)}"'
    yield f'            valued="{_words(valued)}"'
    yield f"            cards={cards}"
    yield "            ;;"


def bash_completion(parser: argparse.ArgumentParser) -> str:
    """A bash script defining ``_micctl`` and ``complete -F _micctl micctl``."""
    subs = _subparsers(parser)
    top_options: list[str] = []
    top_values: list[str] = []
    for a in parser._actions:
        if a.option_strings and not isinstance(a, argparse._SubParsersAction):
            top_options.extend(a.option_strings)
            if a.nargs != 0:
                top_values.extend(a.option_strings)
    lines = [
        f"# bash completion for {PROG} {package_version()}, generated by"
        f" '{PROG} completion bash' from its parser.",
        f"# Install: {PROG} completion bash > ~/.local/share/bash-completion/completions/{PROG}",
        f'#      or: eval "$({PROG} completion bash)" in ~/.bashrc',
        "",
        "_micctl_cards() {",
        "    local i args=()",
        "    for ((i = 1; i < ${#COMP_WORDS[@]} - 1; i++)); do",
        '        case "${COMP_WORDS[i]}" in',
        '            --state-dir) args+=(--state-dir "${COMP_WORDS[i+1]}");;',
        '            --state-dir=*) args+=("${COMP_WORDS[i]}");;',
        "        esac",
        "    done",
        '    "${COMP_WORDS[0]}" "${args[@]}" completion --cards 2>/dev/null',
        "}",
        "",
        "_micctl() {",
        '    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}"',
        '    local i j w cmd="" opts="" words="" valued="" cards=0 npos=0',
        "    COMPREPLY=()",
        "    for ((i = 1; i < COMP_CWORD; i++)); do",
        '        w="${COMP_WORDS[i]}"',
        '        case "$w" in',
        f"            {'|'.join(top_values or ['--'])}) ((i++));;",
        "            -*) ;;",
        '            *) cmd="$w"; break;;',
        "        esac",
        "    done",
        '    if [[ -z "$cmd" ]]; then',
        '        case "$prev" in',
        '            --state-dir) COMPREPLY=($(compgen -d -- "$cur")); return;;',
        "        esac",
        '        if [[ "$cur" == -* ]]; then',
        f'            COMPREPLY=($(compgen -W "{_words(top_options)}" -- "$cur"))',
        "        else",
        f'            COMPREPLY=($(compgen -W "{_words(list(subs))}" -- "$cur"))',
        "        fi",
        "        return",
        "    fi",
        '    case "$cmd" in',
    ]
    for name, sp in subs.items():
        lines.extend(_command_case(name, sp))
    lines += [
        "        *) return;;",
        "    esac",
        '    if [[ "$cur" == -* ]]; then',
        '        COMPREPLY=($(compgen -W "$opts" -- "$cur"))',
        "        return",
        "    fi",
        "    for ((j = i + 1; j < COMP_CWORD; j++)); do",
        '        w="${COMP_WORDS[j]}"',
        '        if [[ "$w" == -* ]]; then',
        '            if [[ " $valued " == *" $w "* ]]; then ((j++)); fi',
        "        else",
        "            ((npos++))",
        "        fi",
        "    done",
        "    if ((cards == 2 || (cards == 1 && npos == 0))); then",
        '        words="$words $(_micctl_cards)"',
        "    fi",
        '    COMPREPLY=($(compgen -W "$words" -- "$cur"))',
        "}",
        "",
        f"complete -F _micctl {PROG}",
        "",
    ]
    return "\n".join(lines)


async def _card_names(state_dir: str | None) -> list[str]:
    async with asyncio.timeout(CARDS_TIMEOUT), connect(resolve_state_dir(state_dir)) as client:
        cards = (await client.status()).get("cards") or []
    return [str(c["name"]) for c in cards if isinstance(c, dict) and "name" in c]


def _conf_completion(p: argparse.ArgumentParser) -> None:
    p.add_argument("shell", nargs="?", choices=("bash",), metavar="SHELL", help="bash")
    p.add_argument(
        "--cards",
        action="store_true",
        help="print the daemon's card names, one a line (what the script calls); "
        "nothing if no daemon answers",
    )
    p.epilog = (
        f"Install: {PROG} completion bash > ~/.local/share/bash-completion/completions/{PROG}"
        f' (or eval "$({PROG} completion bash)" in ~/.bashrc), then open a new shell.'
    )


def _completion(args: argparse.Namespace) -> int:
    if args.cards:
        try:
            names = asyncio.run(_card_names(args.state_dir))
        except (MicError, OSError, TimeoutError):
            return EXIT_OK  # a tab press with no daemon completes nothing, quietly
        print("\n".join(names))
        return EXIT_OK
    if args.shell is None:
        print(f"{PROG}: completion needs a shell: {PROG} completion bash", file=sys.stderr)
        return EXIT_USAGE
    sys.stdout.write(bash_completion(args._parser))
    return EXIT_OK


register_subcommand(
    local_subcommand(
        "help", "show a help topic or a command's usage (no daemon needed)", _conf_help, _help
    )
)
register_subcommand(
    local_subcommand(
        "completion",
        "print a bash completion script for micctl (no daemon needed)",
        _conf_completion,
        _completion,
    )
)
