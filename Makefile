# The README's commands.  `make test` works on a fresh Debian machine as root:
# it installs what it needs (Debian packages when missing, a virtualenv) first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

.PHONY: test test-kernel bench-kernel unit fuzz install lint dist system-deps docker-engine venv image demo demo-down demo-clean bench clean

# The package is installed for real (not editable) before every run, so the
# namespace tests run the console scripts and twistd plugins a user would get.
# The Docker tests (tests/integration/test_compose.py) need an engine:
# docker-engine installs and starts one (as root; they skip otherwise, fail under CI).
# PYTEST_ARGS: e.g. make test PYTEST_ARGS=tests/integration/test_compose.py
# A full run (no PYTEST_ARGS) ends with the kernel stage (test-kernel below), run
# even when pytest failed so that CI shows both; KERNEL_STAGE=0 leaves it out.
PYTEST_ARGS ?=
KERNEL_STAGE ?= $(if $(PYTEST_ARGS),0,1)
test: system-deps docker-engine venv install $(VENV)/bin/promtool
	@status=0; $(PY) -m pytest $(PYTEST_ARGS) || status=$$?; \
	if [ "$(KERNEL_STAGE)" = 1 ]; then VENV=$(VENV) scripts/kernel-vm.sh || status=1; fi; \
	exit $$status

# Kernel WireGuard on a real kernel: this host's kernel has no WireGuard module,
# so a Debian kernel that has it boots in a VM (virtme-ng, QEMU with an emulated
# CPU) and tests/test_netlink.py and tests/integration/test_kernel_mesh.py run
# there; 6 to 8 minutes on 2 cores.  Installs QEMU, busybox-static and a kernel
# package when missing (as root).  Skips, saying why, where no VM can run; fails
# under CI=true.
test-kernel: system-deps venv install
	@VENV=$(VENV) scripts/kernel-vm.sh

unit: venv install
	$(PY) -m pytest -m "not realdevice and not integration"

# The property-based tests (tests/test_fuzz.py) with many more examples each;
# prints how many inputs were tried.  `make fuzz FUZZ_EXAMPLES=20000` for more.
FUZZ_EXAMPLES ?= 5000
fuzz: venv
	WGNAT_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest tests/test_fuzz.py -q -s -W ignore::DeprecationWarning

$(VENV)/bin/promtool: | venv
	scripts/fetch-promtool.sh $(VENV)/bin

install: venv
	$(PY) -m pip install -q --no-deps --force-reinstall .

system-deps:
	@scripts/install-system-deps.sh

docker-engine:
	@scripts/docker-engine.sh

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

# Style, and types over the whole package (Twisted's reactor typed by its
# interfaces: the mypy-zope plugin, configured in pyproject.toml).
lint: venv
	$(VENV)/bin/ruff format --check wgnat twisted tests bench compose
	$(VENV)/bin/ruff check wgnat twisted tests bench compose
	$(VENV)/bin/mypy wgnat compose/testbed.py

# A release: the sdist and the wheel in dist/, checked as the package index
# checks an upload (twine check --strict renders the README as the description).
# The egg-info goes first: setuptools would otherwise re-read its old file list.
dist: venv
	rm -rf dist wgnat.egg-info
	$(PY) -m build --outdir dist .
	$(VENV)/bin/twine check --strict dist/*

# Figures (README "Figures"): real wireguard-go devices behind NAT routers in
# network namespaces; needs root.  Medians and p95 over runs, never unit tests.
# About 6 minutes: formation with eight clients (5 runs, ~40 s each), then one
# client with 1,000 peers (apply, then 2 minutes at rest).
bench: system-deps venv install
	$(PY) bench/formation.py --clients 8 --runs 5
	$(PY) bench/client_cost.py --peers 1000 --rest 120

# Formation figures on kernel WireGuard devices, in test-kernel's VM (emulated CPU:
# the absolute times are not comparable with make bench's; compare the parts).
# Four clients, three runs: about 10 minutes.
bench-kernel: system-deps venv install
	@VENV=$(VENV) scripts/kernel-vm.sh bench --clients 4 --runs 3

# The image (python:3.11-slim, or a local Debian base where no registry answers).
image: venv
	@scripts/docker-engine.sh --required
	PYTHON=$(PY) scripts/docker-build.sh

# The Docker Compose NAT testbed (compose/): a table of every pair's path.
demo: venv
	@scripts/docker-engine.sh --required
	@PYTHON=$(PY) $(PY) compose/testbed.py up

# Removes the testbed and says what stays: the images, build/docker-wheels, a
# background dockerd, the Debian packages it installed, the virtualenv.
demo-down: venv
	@$(PY) compose/testbed.py down

# demo-down, then the images (wgnat-gateway, wgnat-prometheus, wgnat, wgnat-base:bookworm) and
# build/docker-wheels.  Not the virtualenv (make clean), not Docker itself.
demo-clean: venv
	@$(PY) compose/testbed.py clean

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
