# The two sacred commands: `make run` and `make test`. Both set everything up
# on a fresh clone (a .venv with the project and its test extra) and are quick
# when nothing changed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test run bench lint fmt clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest --cov --cov-report= $(PYTEST_ARGS)
	$(BIN)/coverage report --include='virtio/split/*,virtio/status.py' --fail-under=95 --show-missing

# The main job: the host daemon with the embedded default config (card mic0
# booted at start, with a console and a 64 MiB disk in the state directory).
MIC_STATE_DIR ?= $(CURDIR)/.mic-state
export MIC_STATE_DIR

run: install
	@echo "mic-host: state directory $(MIC_STATE_DIR); Ctrl-C stops the daemon and its cards."
	@echo "In another terminal:  MIC_STATE_DIR=$(MIC_STATE_DIR) $(BIN)/micctl status"
	@echo "                      MIC_STATE_DIR=$(MIC_STATE_DIR) $(BIN)/micctl run mic0 module:function"
	$(BIN)/mic-host --state-dir $(MIC_STATE_DIR)

bench: install
	$(BIN)/python -m bench.ring
	$(BIN)/python -m bench.transport_bench
	$(BIN)/python -m bench.boot
	$(BIN)/python -m bench.block
	$(BIN)/python -m bench.accel
	$(BIN)/python -m bench.net
	$(BIN)/python -m bench.isolation
	$(BIN)/python -m bench.latency --trace
	$(BIN)/python -m bench.report

fmt: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage build *.egg-info
