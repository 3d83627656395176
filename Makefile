# One command sets up and runs the tests (`make test`); one sets up and runs the main job (`make demo`).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The web chat's browser test drives Debian's chromium with selenium; `make test` installs it when it is missing.
BROWSER := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup test demo bench clean browser

$(STAMP): setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[torch,dev]'
	@touch $(STAMP)

setup: $(STAMP)

browser: $(BROWSER)

$(BROWSER):
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver

test: $(STAMP) $(BROWSER)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) -m telechat_ms.demo

bench: $(STAMP)
	for b in benchmarks/*_bench.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) demo_out runs output rank_0 msrun_log
