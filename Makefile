# Two commands on a fresh clone:
#   make demo   Hive end to end on this machine (embedded Redis, built-in demo model, CPU)
#   make test   the test suite (needs redis-server on PATH; .ci/run installs it)
VENV ?= .venv
PYTHON ?= python3
# The CPU build of torch; on a GPU machine: make TORCH=torch==2.13.0 INDEX=--index-url=https://download.pytorch.org/whl/cu128
TORCH ?= torch==2.13.0
INDEX ?=
PROMPT ?= The quick brown fox

.PHONY: demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q $(INDEX) $(TORCH)
	$(VENV)/bin/python -m pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/hive up --run "$(PROMPT)"

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest

bench: $(VENV)/.installed
	$(VENV)/bin/python -m bench.relay

clean:
	rm -rf $(VENV)
