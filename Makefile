# smallshot — set-up, demo, tests and benchmarks. Every target installs what it needs first.
# The set-up is idempotent: a stamp file records the finished install, so a second run installs nothing.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP  := $(VENV)/.smallshot-installed
export PYTHONUNBUFFERED := 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast bench bench-quick clean

setup: $(STAMP)

# Order matters here: torch from the local wheel store first, then Ray and HF against it,
# then DeepSpeed built against the installed torch (it needs torch at build time).
$(STAMP): requirements.txt requirements-test.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install "torch==2.14.1" "torchvision==0.29.1"
	$(PIP) install -r requirements.txt -r requirements-test.txt
	$(PIP) install --no-build-isolation "deepspeed==0.19.*"
	$(PIP) install --no-deps --no-build-isolation -e .
	touch $@

demo: setup
	$(PY) launch.py demo

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) -m pip --disable-pip-version-check -q install -r requirements-bench.txt
	$(PY) -m benchmarks.run_all

bench-quick: setup
	$(PY) -m benchmarks.run_all --quick

clean:
	rm -rf $(VENV) runs .pytest_cache
