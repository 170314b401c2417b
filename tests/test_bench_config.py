"""The benches' daemon configs (:mod:`bench.config`) are configs the daemon accepts."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import config
from mic_host.config import parse_config


def test_card_with_devices_parses_as_the_daemon_reads_it(tmp_path: Path) -> None:
    image = tmp_path / 'a "quoted" dir' / "disk.img"  # a path TOML must escape
    text = config.card(
        config.device("console"),
        config.block(image, name="disk", num_queues=2),
        config.device("block", name="qsd", backend="vhost-user", socket=str(tmp_path / "s")),
        card_ram="64M",
        heartbeat_interval=0.5,
        card_command=["env", 'X="quoted"'],  # a list is a TOML array
    )
    cfg = parse_config(text, "bench", state_dir=tmp_path)
    (card,) = cfg.cards
    assert (card.name, card.boot_at_start, card.card_ram) == ("mic0", True, 64 << 20)
    assert card.card_command == ("env", 'X="quoted"')
    assert (card.heartbeat_interval, card.heartbeat_timeout) == (0.5, 30.0)
    types = [(d.type, d.name) for d in card.devices]
    assert types == [("console", None), ("block", "disk"), ("block", "qsd")]
    assert card.devices[1].options["image"] == str(image)
    assert card.devices[1].options["num_queues"] == 2


def test_none_leaves_a_setting_to_the_daemon_and_odd_values_are_refused(tmp_path: Path) -> None:
    text = config.card(config.block(tmp_path / "d.img"), boot_at_start=None, name="mic3")
    assert "boot_at_start" not in text
    (card,) = parse_config(text, "bench", state_dir=tmp_path).cards
    assert (card.name, card.boot_at_start) == ("mic3", False)
    with pytest.raises(TypeError, match="no TOML form for dict"):
        config.device("block", image={"a": 1})
    with pytest.raises(TypeError, match="no TOML form for NoneType"):
        config.card(card_command=["sh", None])  # None is left out as a setting, not in an array
