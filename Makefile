# The README's commands.  `make test` works on a fresh Debian machine as root:
# it installs what it needs (Debian packages when missing, a virtualenv) first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

.PHONY: test unit fuzz install lint system-deps venv demo bench clean

# The package is installed for real (not editable) before every run, so the
# namespace tests run the console scripts and twistd plugins a user would get.
test: system-deps venv install $(VENV)/bin/promtool
	$(PY) -m pytest

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

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

lint: venv
	$(VENV)/bin/ruff format --check wgnat twisted tests bench
	$(VENV)/bin/ruff check wgnat twisted tests bench
	# mypy on the pure core (Twisted's I/O layers are typed loosely upstream).
	$(VENV)/bin/mypy wgnat/_types.py wgnat/duration.py wgnat/client/reconcile.py \
		wgnat/client/view.py wgnat/registry/model.py wgnat/status.py

# Figures (README "Figures"): real wireguard-go devices behind NAT routers in
# network namespaces; needs root.  Medians and p95 over runs, never unit tests.
bench: system-deps venv install
	$(PY) bench/formation.py --runs 5

demo:
	@echo "make demo comes with the Docker Compose testbed (issue 5)."
	@echo "Until then, 'make test' runs the same NAT topologies in network namespaces."

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
