# One command runs the demo, one runs the tests; each does its own set-up.
#   make demo   two simulated nodes making key over a private MQTT broker
#   make test   lint, type-check and the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO_SECONDS ?= 30
DEMO_ARGS ?=

.PHONY: demo test deps bench clean fuzz

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
	$(BIN)/python bench/bench_keystore.py

# System packages: the broker, a C compiler and Python headers for the cffi
# build, venv support, and clang with its libFuzzer runtime for the fuzz
# harnesses (csrc/fuzz/; the suite runs them briefly).  Installed only when
# missing; sudo only when not root.  The libFuzzer runtime comes with clang
# where apt installs recommended packages (Debian 12: libclang-rt-14-dev, a
# recommend of libclang-common-14-dev); elsewhere the second step adds it.
deps:
	@missing=""; \
	command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing="$$missing mosquitto"; \
	command -v cc >/dev/null 2>&1 || missing="$$missing gcc"; \
	command -v clang >/dev/null 2>&1 || missing="$$missing clang"; \
	[ -e /usr/include/gmp.h ] || [ -e /usr/include/$$(uname -m)-linux-gnu/gmp.h ] || missing="$$missing libgmp-dev"; \
	$(PYTHON) -c 'import sysconfig,os,sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"],"Python.h")))' || missing="$$missing python3-dev"; \
	$(PYTHON) -c 'import ensurepip' 2>/dev/null || missing="$$missing python3-venv"; \
	SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  $$SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y $$missing || exit 1; \
	fi; \
	fuzzer_rt=$$(clang -print-file-name=libclang_rt.fuzzer-$$(uname -m).a); \
	if [ ! -f "$$fuzzer_rt" ]; then \
	  rt=libclang-rt-$$(clang -dumpversion | cut -d. -f1)-dev; \
	  echo "installing the libFuzzer runtime: $$rt"; \
	  $$SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y $$rt; \
	fi

# Coverage-guided fuzzing of every C entry point (csrc/fuzz/fuzz_*.c) with
# libFuzzer, AddressSanitizer and UBSan: FUZZ_RUNS executions per harness
# (at most FUZZ_MAX_TIME seconds each), one harness per core at a time, a
# corpus kept in build/fuzz/corpus/.  Prints executions, seconds and crashes
# per entry point; a finding fails the target, its input saved in
# build/fuzz/artifacts/.  The build and run logic is csrc/fuzz/fuzz.py, which
# tests/test_kernel_libfuzzer.py also runs, briefly, in `make test`.
#   make fuzz FUZZ_RUNS=100000
FUZZ_RUNS ?= 1000000
FUZZ_MAX_TIME ?= 3600
fuzz: deps
	$(PYTHON) csrc/fuzz/fuzz.py --runs $(FUZZ_RUNS) --max-time $(FUZZ_MAX_TIME) --corpus

$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*.c csrc/*.h) csrc/build_qkernel.py | deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info qnoded/_qkernel*.so qnoded/_qkernel.c

# --- make install / make uninstall: a production node -------------------------
# qnoded goes into a venv of its own under PREFIX (the units' ExecStart is
# $(PREFIX)/bin/qnoded), the units, the sysusers file, the docs and the example
# config next to it; /etc/qnoded/node.toml is written only when there is none.
# DESTDIR stages all of it under another root (packages, tests), and then
# nothing runs on the live system.  Building from this tree needs gcc,
# libgmp-dev, python3-dev and python3-venv (`make deps` installs them, and
# Mosquitto and clang, which a node does not need).
#   make install PYTHON=/usr/bin/python3     the interpreter the venv is made from
#   make install WHEEL=dist/qnoded-*.whl     install a prebuilt wheel
#       (`pip wheel --no-deps -w dist .`): the same build on every node, no compiler there
#   make install PIP_INSTALL_ARGS="--no-index --find-links /srv/wheels"   offline
DESTDIR ?=
PREFIX ?= /opt/qnoded
BINDIR ?= /usr/local/bin
SYSTEMD_DIR ?= /etc/systemd/system
SYSUSERS_DIR ?= /usr/lib/sysusers.d
DOCDIR ?= /usr/share/doc/qnoded
WHEEL ?=
PIP_INSTALL_ARGS ?=
# The units name these paths; systemd fixes /etc (ConfigurationDirectory=).
QNODED_ETC := /etc/qnoded
# The new venv is built beside the old one and swapped in only once complete:
# a failed build (no network, no compiler) leaves the installed node as it was.
QNODED_NEW := $(DESTDIR)$(PREFIX).new

.PHONY: install uninstall

install:
	@case '$(PREFIX)' in /?*) ;; *) echo "PREFIX must be an absolute path, not '$(PREFIX)'" >&2; exit 2;; esac
	@# PREFIX is replaced wholesale: refuse anything but a venv an earlier install made.
	@if [ -e '$(DESTDIR)$(PREFIX)' ] && [ ! -e '$(DESTDIR)$(PREFIX)/pyvenv.cfg' ]; then \
	  echo "$(DESTDIR)$(PREFIX) exists and is not a venv: refusing to replace it (set PREFIX)" >&2; exit 2; fi
	rm -rf '$(QNODED_NEW)'
	$(PYTHON) -m venv '$(QNODED_NEW)'
	@home=$$(sed -n 's/^home = //p' '$(QNODED_NEW)/pyvenv.cfg'); case "$$home" in \
	  /home/*|/root/*|/run/user/*) echo "warning: the venv runs the Python in $$home, which the unit's ProtectHome=yes hides; use a system Python: make install PYTHON=/usr/bin/python3" >&2;; esac
	'$(QNODED_NEW)/bin/python' -m pip install --quiet $(PIP_INSTALL_ARGS) $(or $(WHEEL),.)
	@# A venv holds its own absolute path only in bin/ (script shebangs, activate)
	@# and pyvenv.cfg; point those at PREFIX, where it will run.
	grep -rlF '$(QNODED_NEW)' '$(QNODED_NEW)/bin' '$(QNODED_NEW)/pyvenv.cfg' | xargs -r sed -i 's|$(QNODED_NEW)|$(PREFIX)|g'
	rm -rf '$(DESTDIR)$(PREFIX).old'
	if [ -e '$(DESTDIR)$(PREFIX)' ]; then mv '$(DESTDIR)$(PREFIX)' '$(DESTDIR)$(PREFIX).old'; fi
	mv '$(QNODED_NEW)' '$(DESTDIR)$(PREFIX)'
	rm -rf '$(DESTDIR)$(PREFIX).old'
	install -d -m 0755 '$(DESTDIR)$(BINDIR)' '$(DESTDIR)$(SYSTEMD_DIR)' '$(DESTDIR)$(SYSUSERS_DIR)' \
	  '$(DESTDIR)$(DOCDIR)/mosquitto' '$(DESTDIR)$(QNODED_ETC)'
	@# Root-only: systemd reads the secrets as root (LoadCredential=); an empty tls/
	@# is what a node without TLS keys needs, a missing one fails the unit.
	install -d -m 0700 '$(DESTDIR)$(QNODED_ETC)/credentials' '$(DESTDIR)$(QNODED_ETC)/credentials/tls'
	@# A convenience for operators; never over a qnoded this install did not make.
	@if [ -e '$(DESTDIR)$(BINDIR)/qnoded' ] && [ ! -L '$(DESTDIR)$(BINDIR)/qnoded' ]; then \
	  echo "warning: $(BINDIR)/qnoded is not a symlink, left alone; run $(PREFIX)/bin/qnoded" >&2; \
	else ln -sfn '$(PREFIX)/bin/qnoded' '$(DESTDIR)$(BINDIR)/qnoded'; fi
	for unit in qnoded.service qnoded@.service; do \
	  sed -e 's|/opt/qnoded/bin/qnoded|$(PREFIX)/bin/qnoded|' -e 's|/usr/share/doc/qnoded/|$(DOCDIR)/|' \
	    "systemd/$$unit" > '$(DESTDIR)$(SYSTEMD_DIR)/'"$$unit" && chmod 0644 '$(DESTDIR)$(SYSTEMD_DIR)/'"$$unit" || exit 1; \
	done
	install -m 0644 systemd/qnoded.sysusers '$(DESTDIR)$(SYSUSERS_DIR)/qnoded.conf'
	install -m 0644 README.md systemd/node.example.toml '$(DESTDIR)$(DOCDIR)/'
	install -m 0644 qnoded/data/mosquitto-prod.conf qnoded/data/mosquitto-acl.conf '$(DESTDIR)$(DOCDIR)/mosquitto/'
	@if [ -e '$(DESTDIR)$(QNODED_ETC)/node.toml' ]; then \
	  echo "kept $(QNODED_ETC)/node.toml; the current example is $(DOCDIR)/node.example.toml"; \
	else install -m 0644 systemd/node.example.toml '$(DESTDIR)$(QNODED_ETC)/node.toml'; fi
	if [ -z '$(DESTDIR)' ]; then systemd-sysusers '$(SYSUSERS_DIR)/qnoded.conf'; fi
	if [ -z '$(DESTDIR)' ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "installed qnoded in $(DESTDIR)$(PREFIX); next: README.md, 'Deploying on a node'"

# Removes what install put outside /etc and /var: the config, the credentials,
# the state (key store and spent-pad records) and the qnoded account stay.
# Stop and disable the units first (systemctl disable --now qnoded).
uninstall:
	@case '$(PREFIX)' in /?*) ;; *) echo "PREFIX must be an absolute path, not '$(PREFIX)'" >&2; exit 2;; esac
	@# Only a venv goes wholesale, so a wrong PREFIX cannot take other files with it.
	@for dir in '$(DESTDIR)$(PREFIX)' '$(QNODED_NEW)' '$(DESTDIR)$(PREFIX).old'; do \
	  if [ ! -e "$$dir" ]; then continue; fi; \
	  if [ ! -e "$$dir/pyvenv.cfg" ]; then echo "$$dir is not a venv: left alone" >&2; \
	  else echo "rm -rf $$dir"; rm -rf "$$dir"; fi; done
	@if [ "$$(readlink '$(DESTDIR)$(BINDIR)/qnoded')" = '$(PREFIX)/bin/qnoded' ]; then rm -f '$(DESTDIR)$(BINDIR)/qnoded'; fi
	rm -f '$(DESTDIR)$(SYSTEMD_DIR)/qnoded.service' '$(DESTDIR)$(SYSTEMD_DIR)/qnoded@.service' \
	  '$(DESTDIR)$(SYSUSERS_DIR)/qnoded.conf'
	rm -f '$(DESTDIR)$(DOCDIR)/README.md' '$(DESTDIR)$(DOCDIR)/node.example.toml' \
	  '$(DESTDIR)$(DOCDIR)/mosquitto/mosquitto-prod.conf' '$(DESTDIR)$(DOCDIR)/mosquitto/mosquitto-acl.conf'
	rmdir '$(DESTDIR)$(DOCDIR)/mosquitto' '$(DESTDIR)$(DOCDIR)' 2>/dev/null || true
	if [ -z '$(DESTDIR)' ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "kept $(QNODED_ETC) (config, credentials), /var/lib/qnoded (state) and the qnoded account"
