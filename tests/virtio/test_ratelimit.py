"""virtio.ratelimit: a budget of log lines per source and window, time driven by hand."""

from __future__ import annotations

import logging

import pytest

from virtio.ratelimit import LogBudget


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _budget(clock: Clock, **kw: float) -> LogBudget:
    return LogBudget("mic0", logging.getLogger("test.ratelimit.summary"), clock, **kw)  # type: ignore[arg-type]


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records]


def test_at_most_lines_per_window_then_one_summary(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    budget = _budget(clock, lines=3, period=1.0)
    log = budget.logger(logging.getLogger("test.ratelimit.card"))
    with caplog.at_level(logging.INFO):
        for i in range(20_000):
            log.warning("bad message %d", i)
        assert _lines(caplog) == ["bad message 0", "bad message 1", "bad message 2"]
        clock.now += 0.5
        log.warning("still inside the window")
        budget.flush()  # the window has not ended: nothing yet
        assert len(caplog.records) == 3
        clock.now += 0.5
        budget.flush()
    assert _lines(caplog)[3:] == ["mic0: suppressed 19998 similar log lines in 1.0 s"]
    assert caplog.records[3].levelno == logging.WARNING  # the worst level suppressed
    assert budget.suppressed_total == 19_998


def test_a_new_window_writes_the_summary_first(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    budget = _budget(clock, lines=1, period=1.0)
    log = budget.logger(logging.getLogger("test.ratelimit.card"))
    with caplog.at_level(logging.INFO):
        log.info("a")
        log.error("b")
        log.info("c")
        clock.now += 1.0
        log.info("d")
        log.info("e")
    assert _lines(caplog) == ["a", "mic0: suppressed 2 similar log lines in 1.0 s", "d"]
    assert caplog.records[1].levelno == logging.ERROR


def test_loggers_of_one_source_share_the_budget(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    budget = _budget(clock, lines=2)
    a = budget.logger(logging.getLogger("test.ratelimit.a"))
    b = budget.logger(logging.getLogger("test.ratelimit.b"))
    with caplog.at_level(logging.INFO):
        a.info("1")
        b.warning("2")
        a.exception("3")
        b.error("4")
        budget.flush(final=True)
    assert _lines(caplog) == ["1", "2", "mic0: suppressed 2 similar log lines in 0.0 s"]
    assert [r.name for r in caplog.records[:2]] == ["test.ratelimit.a", "test.ratelimit.b"]
    budget.flush(final=True)  # nothing more to say
    assert len(caplog.records) == 3


def test_disabled_levels_cost_no_budget(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    budget = _budget(clock, lines=1)
    log = budget.logger(logging.getLogger("test.ratelimit.quiet"))
    with caplog.at_level(logging.WARNING):
        for _ in range(5):
            log.info("not written anyway")
        log.warning("written")
    assert _lines(caplog) == ["written"]
    assert budget.suppressed_total == 0


def test_origin_is_the_caller(caplog: pytest.LogCaptureFixture) -> None:
    budget = _budget(Clock())
    with caplog.at_level(logging.INFO):
        budget.logger(logging.getLogger("test.ratelimit.o")).warning("here")
    assert caplog.records[0].funcName == "test_origin_is_the_caller"


def test_bad_parameters() -> None:
    with pytest.raises(ValueError, match="lines >= 1"):
        _budget(Clock(), lines=0)
