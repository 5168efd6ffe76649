# Every target starts with .ci/setup, which installs only what is missing, so
# each one works from a fresh clone (as root the first time, for apt-get).

VENV := .venv
BIN := $(VENV)/bin
DEMO ?= /tmp/dfs-peer-demo
PYTEST_ARGS ?=

.PHONY: setup test lint fmt demo node bench

setup:
	@bash .ci/setup

# The tests run on several workers (pytest-xdist): most of them wait on real
# processes, mounts and sockets, so one more worker than cores (at most 8)
# pays; more only adds contention, and tests that wait with deadlines time out.
# --dist loadgroup uses the scheduler in tests/conftest.py (modules with a
# module-scoped fixture stay on one worker). PYTEST_WORKERS=0: one process.
PYTEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); n=$$((n + 1)); echo $$((n > 8 ? 8 : n)))

# pytest exits 5 when it collected nothing: a failure here, but worth saying so.
test: setup
	@$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadgroup $(PYTEST_ARGS); status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; \
	exit $$status

# All three run even if one fails, so one pass shows everything to fix. mypy
# checks the packages listed under [tool.mypy] files in pyproject.toml.
lint: setup
	@status=0; \
	echo "ruff check ."; $(BIN)/ruff check . || status=1; \
	echo "ruff format --check ."; $(BIN)/ruff format --check . || status=1; \
	echo "mypy"; $(BIN)/mypy || status=1; \
	exit $$status

fmt: setup
	$(BIN)/ruff check --select I --fix .
	$(BIN)/ruff format .

# Three nodes of one new volume, each with its own mount (as root each in its
# own network namespace, found by mDNS); Ctrl-C stops them and removes it all.
demo: setup
	$(BIN)/python -m scenarios.demo

# A single node on this machine. The secret is made once and kept in $(DEMO),
# so running it again reopens the same volume.
node: setup
	@if grep -qs " $(DEMO)/mnt fuse" /proc/mounts && ! stat $(DEMO)/mnt >/dev/null 2>&1; then \
		echo "demo: unmounting the dead mount a killed node left at $(DEMO)/mnt"; \
		fusermount3 -u -z $(DEMO)/mnt; \
	fi
	@mkdir -p $(DEMO)/mnt
	@test -s $(DEMO)/secret || (umask 077 && $(BIN)/dfs-peer init > $(DEMO)/secret)
	@echo
	@echo "  Mounting the volume at $(DEMO)/mnt: browse it from another terminal."
	@echo "  Secret in $(DEMO)/secret, node data in $(DEMO)/data."
	@echo "  Ctrl-C here unmounts and stops the node."
	@echo
	$(BIN)/dfs-peer join --secret-file $(DEMO)/secret --data-dir $(DEMO)/data $(DEMO)/mnt

# Beside gocryptfs (single node) and Syncthing (sync, memory), then the network
# figures; `make bench QUICK=1` runs smaller sizes once, for iteration.
bench: setup
	$(BIN)/python -m benchmarks.single_node $(if $(QUICK),--quick)
	$(BIN)/python -m benchmarks.sync $(if $(QUICK),--quick)
	$(if $(QUICK),,$(BIN)/python -m benchmarks.network)
