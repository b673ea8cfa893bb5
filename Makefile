# The two commands a newcomer needs: `make run` and `make test`.
# Both bootstrap .venv from nothing; `make test` also installs the Debian tools the tests use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SOCKET ?= /run/hwbkptd/hwbkptd.sock
PYTEST_ARGS ?=

.PHONY: run test lint typecheck pytest pytest-pure bench deps build-deps install clean

# `pip install -e .` compiles the stop round (hwbkptd/_fastpath.c): it needs a C compiler
# and the headers of the Python that runs the venv.
$(STAMP): pyproject.toml hwbkptd/_fastpath.c | build-deps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# Debian tools the suite needs: a C compiler for the target programs and the reference
# tracers, systemd-analyze / systemd-socket-activate for the unit tests, gdb for the
# gdbserver tests, lldb-19 for the lldb ones, Debian's gdbserver as the bench's reference.
build-deps:
	@missing=""; \
	command -v gcc >/dev/null || missing="$$missing gcc libc6-dev"; \
	$(PYTHON) -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
		|| missing="$$missing python3-dev"; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

deps:
	@missing=""; \
	command -v gcc >/dev/null || missing="$$missing gcc libc6-dev"; \
	command -v gdb >/dev/null || missing="$$missing gdb"; \
	command -v lldb-19 >/dev/null || missing="$$missing lldb-19"; \
	command -v gdbserver >/dev/null || missing="$$missing gdbserver"; \
	command -v systemd-socket-activate >/dev/null || missing="$$missing systemd"; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

run: $(STAMP)
	$(VENV)/bin/hwbkptd --socket $(SOCKET)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

pytest: $(STAMP) deps
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test: lint typecheck pytest

# The suite again with the compiled stop round switched off (CI runs both: .ci/run).
pytest-pure: $(STAMP) deps
	HWBKPT_PURE=1 $(VENV)/bin/pytest $(PYTEST_ARGS)

bench: $(STAMP) deps
	$(PY) -m bench

install: $(STAMP)
	$(PYTHON) -m pip install .
	install -D -m 0644 systemd/hwbkptd.service /etc/systemd/system/hwbkptd.service
	install -D -m 0644 systemd/hwbkptd.socket /etc/systemd/system/hwbkptd.socket
	install -D -m 0644 systemd/hwbkptd.sysusers /usr/lib/sysusers.d/hwbkptd.conf
	install -D -m 0644 systemd/hwbkptd.tmpfiles /usr/lib/tmpfiles.d/hwbkptd.conf

clean:
	rm -rf $(VENV) build *.egg-info tests/_build bench/_build hwbkptd/*.so
