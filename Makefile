# Two commands are the whole set-up on a fresh machine: `make demo` and `make test`.
# Each creates .venv when it is missing and installs what it needs: Python packages
# into .venv, and the Debian packages the tests use with apt-get: a PostgreSQL server,
# nftables and iproute2 (the field suite's network namespaces and packet loss),
# util-linux (setpriv), strace (durability at the system-call level), systemd
# (systemd-analyze verifies the node's service unit), chromium and chromium-driver (the
# operator pages are tested in a real browser, through Selenium), prometheus (a real
# server scrapes a node and the cloud in a test).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SYSTEM_STAMP := $(VENV)/.system-installed
DEBIAN_PACKAGES := postgresql nftables iproute2 util-linux strace systemd chromium chromium-driver prometheus

.PHONY: FORCE demo test test-fast lint mutation bench clean install system-deps

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[cloud,sim,test]'
	touch $(STAMP)

# PostgreSQL is tested against a real server (tests/pg.py starts a throwaway cluster).
# The check asks dpkg for every package in the list, so adding one to DEBIAN_PACKAGES is
# all a new test needs; it runs on every `make test` (it costs a few milliseconds).
$(SYSTEM_STAMP): FORCE | $(PY)
	@if dpkg -s $(DEBIAN_PACKAGES) >/dev/null 2>&1; then \
	    echo "Debian packages present: $(DEBIAN_PACKAGES)"; \
	elif command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian packages: $(DEBIAN_PACKAGES)"; \
	    SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	    $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(DEBIAN_PACKAGES) \
	    || { $$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(DEBIAN_PACKAGES); }; \
	else \
	    echo "Install these Debian packages (apt-get install $(DEBIAN_PACKAGES)); the tests need them." >&2; exit 1; \
	fi
	touch $(SYSTEM_STAMP)

FORCE:

install: $(STAMP) $(SYSTEM_STAMP)

system-deps: $(SYSTEM_STAMP)

demo: $(STAMP)
	$(VENV)/bin/meshnode demo

# The gates: lint and format (ruff), types (mypy), the import layers (import-linter).
# Zero findings; `make test` runs them first.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: lint $(STAMP) $(SYSTEM_STAMP)
	$(PY) -m pytest -q

# The fast tier: in one process, on in-memory seams and MockClock, no PostgreSQL,
# no subprocesses, no real sockets (what is `slow` is decided in tests/conftest.py).
# Bytecode is kept even where PYTHONDONTWRITEBYTECODE is set: without it every run compiles
# the tree and pytest rewrites the asserts of every test module again (about 7 s of CPU).
test-fast: $(STAMP)
	PYTHONDONTWRITEBYTECODE= $(PY) -m pytest -q -m "not slow"

# Mutation testing (mutmut) over crdt/, the forwarder's planner and more: see docs/testing.md.
mutation: $(STAMP)
	$(PY) bench/mutation.py

bench: $(STAMP)
	$(PY) bench/store.py
	$(PY) bench/sync.py
	$(PY) bench/mesh.py
	$(PY) bench/uplink.py
	$(PY) bench/footprint.py

clean:
	rm -rf $(VENV) build *.egg-info
