# Two commands: `make run` and `make test`. Both create .venv and install the project first.
PYTHON ?= python3.11
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Test processes (pytest-xdist): the suite waits on jobs, stacks and timers more than it computes, so more
# processes than cores; each uses one thread (tests/conftest.py). TEST_PROCESSES=0 runs it in one process.
TEST_PROCESSES ?= 4

.PHONY: run test lint install docs bench clean chromium sandbox compiler pte-runner

$(VPY):
	$(PYTHON) -m venv $(VENV)

# Reinstall when pyproject.toml changes. scripts/install.py installs with uv (with pip's indexes and
# constraints; a third of pip's time) and falls back to pip.
$(STAMP): pyproject.toml scripts/install.py | $(VPY)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) scripts/install.py '.[test,docs]'
	touch $(STAMP)

install: $(STAMP)

# Jobs run confined by bubblewrap (workers/sandbox.py). Install it when missing and we can (root with
# apt-get); otherwise stop and say how. MODELPRESS_SANDBOX=off (jobs unconfined) needs no bubblewrap.
sandbox:
	@if [ "$$MODELPRESS_SANDBOX" != "off" ] && ! command -v "$${MODELPRESS_BWRAP:-bwrap}" >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing bubblewrap (the job sandbox) with apt-get"; \
	    (apt-get install -y -qq bubblewrap || (apt-get update -qq && apt-get install -y -qq bubblewrap)) >/dev/null; \
	  else \
	    echo "bubblewrap (bwrap) is missing and cannot be installed here: run 'sudo apt-get install bubblewrap'" \
	         "(or your distribution's package), or set MODELPRESS_SANDBOX=off to run jobs unconfined" >&2; \
	    exit 1; \
	  fi; \
	fi

run: $(STAMP) sandbox
	$(VPY) -m modelpress.stack

# The browser tests drive Debian's chromium: installed here when missing and possible, else a clear failure.
chromium:
	sh scripts/ensure-chromium.sh

# The .pt2 runtimes `compile` and `aoti` (inductor) compile C++ kernels: the tests of them need g++.
compiler:
	@if ! command -v "$${CXX:-g++}" >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing g++ (inductor's C++ kernels for the .pt2 runtimes) with apt-get"; \
	    (apt-get install -y -qq g++ || (apt-get update -qq && apt-get install -y -qq g++)) >/dev/null; \
	  else \
	    echo "g++ is missing and cannot be installed here: run 'sudo apt-get install g++' (the tests of" \
	         "evaluation.runtime compile/aoti need it)" >&2; \
	    exit 1; \
	  fi; \
	fi

# pte_run: ExecuTorch's C++ runtime as a command (deploy/executorch/pte_run.cpp), built against the
# executorch wheel's own headers and libraries, none of which links libtorch: a .pte artifact run
# torch-free, as on a phone or board. Into var/bin/pte_run; rebuilt when the source or executorch changes.
pte-runner: $(STAMP) compiler
	PY=$(VPY) sh scripts/build-pte-runner.sh

# The documentation site (mkdocs.yml, docs/) into site/. --strict: a broken link or anchor, or a page
# missing from the nav, fails the build. The spec and API reference pages are generated from the code
# as it builds (scripts/reference_pages.py). Nothing is fetched: no web fonts, no analytics.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VPY) -m mkdocs build --strict --site-dir site

# ruff check, then ruff format --check ([tool.ruff] and [tool.ruff.format] in pyproject.toml): a
# finding or a file that `ruff format .` would change fails. Run `ruff format .` to fix the latter.
lint: $(STAMP)
	$(VPY) -m ruff check .
	$(VPY) -m ruff format --check .

# lint first: a finding fails the run in seconds, before the browser, compiler and docs steps.
# --no-loadscope-reorder: files start in collection order, longest first (tests/scheduling.py).
test: $(STAMP) lint sandbox chromium compiler pte-runner docs
	$(VPY) -m pytest -n $(TEST_PROCESSES) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

bench: $(STAMP)
	$(VPY) scripts/install.py '.[test,docs,bench]'  # the baselines the benchmarks compare with
	$(VPY) bench/quantize.py
	$(VPY) bench/prune.py
	$(VPY) bench/distill.py
	$(VPY) bench/auto.py
	$(VPY) bench/targets.py
	$(VPY) bench/transformers.py
	$(VPY) bench/training.py

clean:
	rm -rf $(VENV) var .pytest_cache site
