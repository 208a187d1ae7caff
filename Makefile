# `make demo` and `make test` each set everything up on a fresh machine, then run.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.growlm-installed

.PHONY: setup demo test test-fast bench lint clean

$(STAMP): pyproject.toml requirements.lock scripts/setup.sh
	bash scripts/setup.sh
	touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/growlm demo $(ARGS)

# Every test but those marked slow, on three pytest-xdist workers (on two cores: a third keeps both busy
# while the others wait on their child processes), the 25 slowest listed at the end.
XDIST := -n 3 --dist worksteal
test: $(STAMP)
	$(PY) -m pytest -q $(XDIST) --durations=25

# The edit loop: unit tests and in-process commands, without the end-to-end jobs and real processes.
test-fast: $(STAMP)
	$(PY) -m pytest -q $(XDIST) -m "not slow and not e2e and not process"

bench: $(STAMP)
	$(PY) bench/run_all.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench

clean:
	rm -rf $(VENV) build *.egg-info
