# Two commands: `make run` and `make test`. Both create .venv and install the project first.
PYTHON ?= python3.11
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test install bench clean chromium

$(VPY):
	$(PYTHON) -m venv $(VENV)

# Reinstall when pyproject.toml changes.
$(STAMP): pyproject.toml | $(VPY)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VPY) -m modelpress.stack

# The browser tests drive Debian's chromium: installed here when missing and possible, else a clear failure.
chromium:
	sh scripts/ensure-chromium.sh

test: $(STAMP) chromium
	$(VPY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(VPY) bench/quantize.py
	$(VPY) bench/prune.py
	$(VPY) bench/distill.py

clean:
	rm -rf $(VENV) var .pytest_cache
