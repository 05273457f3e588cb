# bigtrain: `make train` sets up .venv and runs the default job; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
# Where a CPU-only machine gets the CPU build of torch when no local wheel is configured for pip.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
GPUS := $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU')
RUN_DIR ?= runs/train-$(shell date +%Y%m%d-%H%M%S)
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup system-packages train test test-fast clean

setup: $(VENV)/.bigtrain-setup

$(VENV)/.torch:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@# A plain `torch` requirement pulls the multi-GB CUDA build; CPU-only machines take the CPU
	@# build: from a local wheelhouse pip already knows, else from PyTorch's CPU index.
	if [ "$(GPUS)" != "0" ]; then \
		$(PIP) install "torch==$(TORCH_VERSION)"; \
	elif $(PIP) install -q --no-index --no-deps "torch==$(TORCH_VERSION)" 2>/dev/null; then \
		$(PIP) install -q "torch==$(TORCH_VERSION)"; \
	else \
		$(PIP) install "torch==$(TORCH_VERSION)" --index-url $(TORCH_CPU_INDEX) --extra-index-url https://pypi.org/simple; \
	fi
	touch $@

# Debian packages some features need: libaio-dev for NVMe offload (DeepSpeed's async_io op);
# openssh-server, openssh-client and pdsh for multi-node launches over ssh (the two-node tests run
# sshd in network namespaces; iproute2 gives them `ip` and `tc`).
# Installed only where setup runs as root with apt and they are missing; elsewhere NVMe offload
# says what to install when it is used, and the multi-node tests skip saying what is missing.
SYSTEM_PACKAGES := libaio-dev openssh-server openssh-client pdsh iproute2

system-packages:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing $$missing"; apt-get update -qq && apt-get install -y -qq $$missing; \
	fi

$(VENV)/.bigtrain-setup: $(VENV)/.torch pyproject.toml | system-packages
	$(PIP) install -q -e ".[test]"
	$(PY) -m bigtrain.tools.prebuild
	touch $@

# The default job: every visible GPU (CUDA_VISIBLE_DEVICES respected), or 2 CPU ranks; NPROC=N to choose.
train: setup
	$(if $(NPROC),NPROC=$(NPROC)) VENV=$(VENV) launchers/local.sh run_dir=$(RUN_DIR) $(ARGS)

# Test files run in TEST_WORKERS processes side by side (pytest-xdist), a file's tests in one of them: their
# launches spend much of their time starting interpreters and waiting on one another, which the other
# worker fills. Files that share a rank pool or the monitored run go to one worker, which builds it once
# (tests/conftest.py schedules them). TEST_WORKERS=0 runs them in this one process.
TEST_WORKERS ?= 2

test: setup
	$(PY) -m pytest $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS)) $(PYTEST_ARGS)

# The tests that start no process: config, validation, planning, parsing, data shaping, the GPU
# checks against stand-ins (under a minute). `make test` adds rank and command tests.
test-fast: setup
	$(PY) -m pytest -m "not multiprocess and not commands" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs
