# One command runs the demo, one runs the tests; each does its own set-up.
#   make demo   two simulated nodes making key over a private MQTT broker
#   make test   lint, type-check and the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO_SECONDS ?= 30
DEMO_ARGS ?=

.PHONY: demo test deps bench clean

demo: $(VENV)/.installed
	$(BIN)/qnoded demo --seconds $(DEMO_SECONDS) $(DEMO_ARGS)

test: $(VENV)/.installed
	$(BIN)/ruff check qnoded drivers tests bench hil
	$(BIN)/mypy
	$(BIN)/python -m pytest

bench: $(VENV)/.installed
	$(BIN)/python bench/bench_kernel.py
	$(BIN)/python bench/bench_pipeline.py
	$(BIN)/python bench/bench_daemon.py
	$(BIN)/python bench/bench_post.py

# System packages: the broker, a C compiler and Python headers for the cffi
# build, venv support.  Installed only when missing; sudo only when not root.
deps:
	@missing=""; \
	command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing="$$missing mosquitto"; \
	command -v cc >/dev/null 2>&1 || missing="$$missing gcc"; \
	[ -e /usr/include/gmp.h ] || [ -e /usr/include/$$(uname -m)-linux-gnu/gmp.h ] || missing="$$missing libgmp-dev"; \
	$(PYTHON) -c 'import sysconfig,os,sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"],"Python.h")))' || missing="$$missing python3-dev"; \
	$(PYTHON) -c 'import ensurepip' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y $$missing; \
	fi

$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*.c csrc/*.h) csrc/build_qkernel.py | deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info qnoded/_qkernel*.so qnoded/_qkernel.c
