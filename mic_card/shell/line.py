"""The card shell's command-line grammar: words, quotes, redirections, pipes and lists.

Pure parsing, no I/O: :func:`parse` turns a line into a :class:`CommandList`,
which :func:`mic_card.shell.registry.run_line` runs. The grammar is a small
subset of POSIX sh (XCU 2.9)::

    list     := pipeline ((";" | "&&" | "||") pipeline)* [";"]
    pipeline := command ("|" command)*
    command  := (WORD | "<" WORD | ">" WORD | ">>" WORD)+

Words are quoted as in sh: ``'...'`` literally, ``"..."`` with ``\\`` escaping
``"``, ``\\``, ``$`` and `````, ``\\`` outside quotes escaping the next
character; ``#`` at the start of a word begins a comment. A quoted operator
is a word (``echo '|'`` prints a bar). ``&&`` and ``||`` have equal
precedence and bind left to right, as in sh. No variables, globs,
subshells or background jobs (``&`` is a syntax error, status 2).

Imports only :mod:`mic_card.shell.base`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mic_card.shell.base import ShellError

__all__ = ["Command", "CommandList", "Pipeline", "parse", "tokenize"]

_OPS = (">>", "&&", "||", ">", "<", "|", ";", "&")
_OP_CHARS = frozenset("<>|&;")
_DQ_ESCAPES = frozenset('"\\$`')


@dataclass(frozen=True, slots=True)
class Op:
    """An unquoted operator token."""

    text: str


@dataclass(slots=True)
class Command:
    """One simple command: its words and its redirections."""

    argv: list[str] = field(default_factory=list)
    #: ``> FILE`` / ``>> FILE``: (path, append); the last one wins, as in sh
    stdout: tuple[str, bool] | None = None
    #: ``< FILE``
    stdin: str | None = None


@dataclass(slots=True)
class Pipeline:
    commands: list[Command]


@dataclass(slots=True)
class CommandList:
    """``first``, then ``(connector, pipeline)`` pairs; a connector is ``;``, ``&&`` or ``||``."""

    first: Pipeline | None
    rest: list[tuple[str, Pipeline]] = field(default_factory=list)


def _syntax(near: str) -> ShellError:
    return ShellError(f"syntax error near unexpected token '{near}'", 2)


def tokenize(line: str) -> list[str | Op]:
    """Words (``str``) and operators (:class:`Op`) of ``line``.

    Raises:
        ShellError: an unterminated quote or a trailing backslash (status 2).
    """
    tokens: list[str | Op] = []
    word: list[str] = []
    in_word = False
    i, n = 0, len(line)

    def end_word() -> None:
        nonlocal in_word
        if in_word:
            tokens.append("".join(word))
            word.clear()
            in_word = False

    while i < n:
        c = line[i]
        if c in " \t\r\n":
            end_word()
            i += 1
        elif c == "#" and not in_word:
            break
        elif c in _OP_CHARS:
            end_word()
            op = next(o for o in _OPS if line.startswith(o, i))
            tokens.append(Op(op))
            i += len(op)
        elif c == "\\":
            if i + 1 >= n:
                raise ShellError("syntax error: a backslash ends the line", 2)
            word.append(line[i + 1])
            in_word = True
            i += 2
        elif c == "'":
            j = line.find("'", i + 1)
            if j < 0:
                raise ShellError("syntax error: unterminated quote (')", 2)
            word.append(line[i + 1 : j])
            in_word = True
            i = j + 1
        elif c == '"':
            i += 1
            while True:
                if i >= n:
                    raise ShellError('syntax error: unterminated quote (")', 2)
                c = line[i]
                if c == '"':
                    i += 1
                    break
                if c == "\\" and i + 1 < n and line[i + 1] in _DQ_ESCAPES:
                    word.append(line[i + 1])
                    i += 2
                else:
                    word.append(c)
                    i += 1
            in_word = True
        else:
            word.append(c)
            in_word = True
            i += 1
    end_word()
    return tokens


def parse(line: str) -> CommandList:
    """The :class:`CommandList` of ``line`` (``first`` is None for a blank line).

    Raises:
        ShellError: a syntax error (status 2), e.g. ``|`` without a command,
            ``>`` without a file, or ``&``.
    """
    tokens = tokenize(line)
    pipelines: list[tuple[str, Pipeline]] = []
    connector = ";"
    cmd = Command()
    pipe: list[Command] = []
    i = 0

    def cmd_empty(c: Command) -> bool:
        return not c.argv and c.stdout is None and c.stdin is None

    while i < len(tokens):
        t = tokens[i]
        i += 1
        if isinstance(t, str):
            cmd.argv.append(t)
            continue
        if t.text in (">", ">>", "<"):
            if i >= len(tokens) or not isinstance(tokens[i], str):
                nxt = tokens[i] if i < len(tokens) else None
                raise _syntax(nxt.text if isinstance(nxt, Op) else "newline")
            target = tokens[i]
            assert isinstance(target, str)
            i += 1
            if t.text == "<":
                cmd.stdin = target
            else:
                cmd.stdout = (target, t.text == ">>")
            continue
        if t.text == "&":
            raise ShellError("syntax error: background jobs ('&') are not supported", 2)
        if cmd_empty(cmd):
            raise _syntax(t.text)
        pipe.append(cmd)
        cmd = Command()
        if t.text == "|":
            continue
        pipelines.append((connector, Pipeline(pipe)))
        pipe = []
        connector = t.text
    if cmd_empty(cmd):
        if pipe:  # "a |" at the end
            raise _syntax("newline")
        if connector in ("&&", "||"):  # "a &&" at the end
            raise _syntax("newline")
    else:
        pipe.append(cmd)
        pipelines.append((connector, Pipeline(pipe)))
    if not pipelines:
        return CommandList(None)
    return CommandList(pipelines[0][1], pipelines[1:])
