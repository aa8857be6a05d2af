# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck unit bench bench-proxy clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mesh-agent demo --nodes 5

lint: $(STAMP)
	$(VENV)/bin/ruff check gossip agent cli dataplane tests simulations

typecheck: $(STAMP)
	$(VENV)/bin/mypy --strict gossip agent cli dataplane

unit: $(STAMP)
	$(PY) -m pytest -m "not slow"

test: lint typecheck $(STAMP)
	$(PY) -m pytest

# Side-by-side with HashiCorp Serf (needs Debian's `serf`: apt-get install serf).
bench: $(STAMP)
	$(PY) simulations/bench_cluster.py

# Data plane side-by-side: direct, through two agents, and through stunnel (apt-get install stunnel4).
bench-proxy: $(STAMP)
	$(PY) simulations/bench_proxy.py --runs 3

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
