# The two sacred commands: `make run` and `make test`. Both set everything up
# on a fresh clone and are quick when nothing changed: `make run` installs what
# running needs (the project, its runtime dependencies and mypyc to compile the
# ring core) into .venv and compiles the ring core (a no-op when up to date, so
# an edited ring module is rebuilt, never run stale), `make
# test` adds the test extra (pytest, hypothesis, ruff, mypy...) on top, so a
# `make run` first and a `make test` later installs only the tools.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUN_STAMP := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test

.PHONY: install install-run ringcore pure test run bench lint fmt clean

# `make install` also compiles the ring core with mypyc (tools/mypyc_build.py:
# C extension modules next to their sources, used by every process that
# imports this tree; a no-op when up to date). No C compiler or Python
# headers: it says so and the tree stays pure Python. MIC_PURE_PYTHON=1
# (`MIC_PURE_PYTHON=1 make install`, `... make test`) or `make pure`: no
# compiled modules, everything runs the Python sources.
install: $(TEST_STAMP) ringcore
install-run: $(RUN_STAMP)

ringcore: $(RUN_STAMP)
	$(BIN)/python -m tools.mypyc_build

pure:
	$(BIN)/python -m tools.mypyc_build --clean

$(RUN_STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[build]'
	@touch $@

# After the runtime install (so a changed pyproject.toml redoes both).
$(TEST_STAMP): $(RUN_STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $@

# The suite runs the ring core as built (compiled, see ringcore); then the ring
# tests run again on the Python sources (tools/pure_python.py), where the ring
# core's branch-coverage gate is measured (compiled code is not traced).
test: $(TEST_STAMP) ringcore
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/mypy --strict examples/virtio-rng/src
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	MIC_PURE_PYTHON=1 $(BIN)/python -m pytest -p tools.pure_python --cov --cov-report= -q tests/virtio
	$(BIN)/coverage report --include='virtio/split/*,virtio/packed/*,virtio/status.py' --fail-under=95 --show-missing

# The main job: the host daemon with the embedded default config (card mic0
# booted at start, with a console and a 64 MiB disk in the state directory).
# The state directory is the one micctl and the client library find on their
# own: $MIC_STATE_DIR if set, else ~/.local/state/mic-vop (mic_host/paths.py).
run: $(RUN_STAMP) ringcore
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
	find virtio -name '*.so' -delete
