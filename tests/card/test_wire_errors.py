"""Errors the card sends to the host travel in the one wire form (``virtio.errors.WireError``)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mic_card.accel.errors import QueueBusy
from mic_card.accel.offload import _wire_error
from mic_card.agent import Agent, BadRequest, _error_reply
from virtio.errors import RemoteProtocolError, ResourceError, WireError


def test_offload_error_is_the_wire_form_and_parses_back() -> None:
    wire = _wire_error(QueueBusy("mic-zip is busy"))
    assert wire == {"type": "QueueBusy", "base": "ResourceError", "message": "mic-zip is busy"}
    exc = WireError.from_wire(wire).exception()
    assert type(exc) is ResourceError
    assert str(exc) == "mic-zip is busy"


def test_agent_bad_request_is_a_remote_protocol_error_in_the_wire_form() -> None:
    with pytest.raises(BadRequest) as ei:
        Agent._parse(b'{"id": 7, "op": 3}\n')
    e = ei.value
    assert isinstance(e, RemoteProtocolError)
    reply = _error_reply(e)
    assert reply["id"] == 7
    assert reply["ok"] is False
    # the host agent client reads "type" and "message": unchanged for it
    assert reply["error"] == {
        "type": "BadRequest",
        "base": "RemoteProtocolError",
        "message": "'op' must be a string",
    }
    assert type(WireError.from_wire(reply["error"]).exception()) is RemoteProtocolError


def test_lazy_accel_command_help_matches_the_real_command() -> None:
    # The card OS registers `accel` lazily with literal text; in a fresh process
    # (before the accel stack loads) it must say what mic_card.accel.commands says.
    code = (
        "import sys, mic_card.card, mic_card.shell as s\n"
        "assert 'mic_card.accel' not in sys.modules, 'the accel stack loaded at boot'\n"
        "c = s.COMMANDS['accel']\n"
        "print(c.help); print(c.usage)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.splitlines()
    from mic_card.accel.commands import ACCEL_HELP, ACCEL_USAGE

    assert out == [ACCEL_HELP, ACCEL_USAGE]
