# The two sacred commands: `make run` and `make test`. Both set everything up
# on a fresh clone and are quick when nothing changed: `make run` installs what
# running needs (the project and its runtime dependencies) into .venv, `make
# test` adds the test extra (pytest, hypothesis, ruff, mypy...) on top, so a
# `make run` first and a `make test` later installs only the tools.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUN_STAMP := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test

.PHONY: install install-run test run bench lint fmt clean

install: $(TEST_STAMP)
install-run: $(RUN_STAMP)

$(RUN_STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	@touch $@

# After the runtime install (so a changed pyproject.toml redoes both).
$(TEST_STAMP): $(RUN_STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $@

test: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/mypy --strict examples/virtio-rng/src
	$(BIN)/python -m pytest --cov --cov-report= $(PYTEST_ARGS)
	$(BIN)/coverage report --include='virtio/split/*,virtio/packed/*,virtio/status.py' --fail-under=95 --show-missing

# The main job: the host daemon with the embedded default config (card mic0
# booted at start, with a console and a 64 MiB disk in the state directory).
# The state directory is the one micctl and the client library find on their
# own: $MIC_STATE_DIR if set, else ~/.local/state/mic-vop (mic_host/paths.py).
run: $(RUN_STAMP)
	@echo "mic-host: state directory $${MIC_STATE_DIR:-$${XDG_STATE_HOME:-$$HOME/.local/state}/mic-vop}; Ctrl-C stops the daemon and its cards."
	@echo "In another terminal:  $(BIN)/micctl status"
	@echo "                      $(BIN)/micctl console mic0"
	$(BIN)/mic-host

bench: install
	$(BIN)/python -m bench.ring
	$(BIN)/python -m bench.transport_bench
	$(BIN)/python -m bench.boot
	$(BIN)/python -m bench.block
	$(BIN)/python -m bench.datapath
	$(BIN)/python -m bench.accel
	$(BIN)/python -m bench.net
	$(BIN)/python -m bench.isolation
	$(BIN)/python -m bench.latency --trace
	$(BIN)/python -m bench.vhost_user
	$(BIN)/python -m bench.scaling
	$(BIN)/python -m bench.profile
	$(BIN)/python -m bench.report

fmt: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage build *.egg-info
