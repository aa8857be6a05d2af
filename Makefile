# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# The venv's interpreter: the distribution's own python3 where it is 3.11 or newer and has its venv module,
# else the first python3 on PATH; `make PYTHON=...` picks another.  The distribution's is the one the
# compose images run, and it is built with profile-guided and link-time optimization, which a python3
# built from source (pyenv's default) is not: every agent start and CLI call costs less CPU on it
# (docs/footprint.md, "The interpreter").
SYSTEM_PYTHON := /usr/bin/python3
ifeq ($(origin PYTHON),undefined)
PYTHON := $(shell $(SYSTEM_PYTHON) -c 'import ensurepip, sys, venv; sys.exit(sys.version_info < (3, 11))' \
            >/dev/null 2>&1 && echo $(SYSTEM_PYTHON) || echo python3)
endif
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo compile cluster-key docker-offline test lint typecheck unit canary bench bench-proxy bench-http bench-footprint bench-dns simulate clean which-python

# editable_mode=compat: the checkout goes on sys.path through a plain .pth line, as a wheel's files would
# be found; setuptools' default editable finder makes every interpreter start import pathlib and
# importlib.util in site, about 8 ms of each agent start and each CLI call that no installed agent pays.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test]' --config-settings editable_mode=compat
	touch $(STAMP)

# Our packages byte-compiled, as a pip install leaves them: where PYTHONDONTWRITEBYTECODE is set
# (it is on these machines) every agent would otherwise compile them again at each start.
# compileall rewrites only what changed since.
compile: $(STAMP)
	@$(PY) -m compileall -q gossip agent dataplane cli > /dev/null

demo: $(STAMP) compile
	$(VENV)/bin/mesh-agent demo --nodes 5

# The key of the docker compose demo (docker-compose.yml): written once into .env, which git ignores.
cluster-key:
	@if grep -qs '^MESH_CLUSTER_KEY=.' .env; then echo ".env already holds a cluster key"; else \
	  umask 077; grep -vs '^MESH_CLUSTER_KEY=' .env > .env.new; \
	  printf 'MESH_CLUSTER_KEY=%s\n' "$$($(PYTHON) -c 'import base64, os; print(base64.b64encode(os.urandom(32)).decode())')" >> .env.new; \
	  mv .env.new .env; echo "wrote a new cluster key to .env"; fi

# The compose demo's image where a build can reach neither an image registry nor the package index:
# a Debian base from mmdebstrap and wheels made on this host (docker/build-offline.sh; README.md).
docker-offline:
	docker/build-offline.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check gossip agent cli dataplane tests simulations

typecheck: $(STAMP)
	$(VENV)/bin/mypy --strict gossip agent cli dataplane simulations/harness.py simulations/sim.py simulations/scenarios.py simulations/report.py simulations/__main__.py simulations/coordinates.py

unit: $(STAMP) compile
	$(PY) -m pytest -m "not slow"

test: lint typecheck $(STAMP) compile
	$(PY) -m pytest

# The reactor's idle hook reads trio internals (dataplane/reactor.py), so pyproject.toml pins the
# trio it was checked against.  This canary installs the newest release of every dependency,
# ignoring the pins, in a scratch venv and runs the tests that lean on those internals: a trio that
# breaks the hook shows here before users meet it.  It reports and never fails (CI runs it).
CANARY := $(VENV)-canary
CANARY_TESTS := tests/test_reactor.py tests/test_rawsocket.py tests/test_tunnel.py tests/test_proxy.py
# Every runtime dependency by name, from pyproject.toml (a hand-kept list here once missed one,
# and the canary then blamed trio for an ImportError).
export CANARY_DEPS := import re, tomllib; print(" ".join(re.split(r"[<>=!~;\[ ]", d)[0] for d in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))
canary:
	@rm -rf $(CANARY)
	@if ! { $(PYTHON) -m venv $(CANARY) && $(CANARY)/bin/pip install --quiet --upgrade \
	      $$($(PYTHON) -c "$$CANARY_DEPS") pytest pytest-trio hypothesis > $(VENV)-canary.pip.log 2>&1; }; then \
	  echo "CANARY: could not install the newest dependencies (no package index?); nothing checked"; \
	else \
	  v=$$($(CANARY)/bin/python -c 'import trio; print(trio.__version__)'); \
	  if PYTHONPATH=. $(CANARY)/bin/python -m pytest -q -p no:cacheprovider $(CANARY_TESTS) \
	        > $(CANARY)/pytest.log 2>&1; then \
	    echo "CANARY: newest trio $$v passes $(CANARY_TESTS)"; \
	  else \
	    echo "CANARY: newest trio $$v FAILS the data plane's tests; pin trio below it until fixed:"; \
	    tail -n 30 $(CANARY)/pytest.log; \
	  fi; \
	fi; rm -rf $(CANARY) $(VENV)-canary.pip.log

# Side-by-side with HashiCorp Serf (needs Debian's `serf`: apt-get install serf).
bench: $(STAMP)
	$(PY) simulations/bench_cluster.py

# Data plane side-by-side: direct, through two agents, and through stunnel (apt-get install stunnel4).
bench-proxy: $(STAMP)
	$(PY) simulations/bench_proxy.py --runs 3

# HTTP through the mesh (http and tcp mode) beside haproxy's two-hop HTTP chain and direct, with wrk.
bench-http: $(STAMP)
	$(PY) simulations/bench_http.py --runs 3

# What one agent costs before it works (RSS, start-up, the CLI, 25 agents starting at once), beside Serf.
bench-footprint: $(STAMP)
	$(PY) simulations/bench_footprint.py --runs 3

# The DNS server beside dnsmasq answering the same names from a hosts file, with dnsperf
# (apt-get install dnsperf dnsmasq): peak queries/s, latency percentiles at half the agent's peak.
bench-dns: $(STAMP)
	$(PY) simulations/bench_dns.py --runs 3

# The protocol at sizes no machine can run for real: the real gossip/ state machines on a virtual
# clock (simulations/sim.py).  Writes results.md, results.json and PNG plots to SIM_OUT.
# The defaults are the sizes the simulations issue asks for; 10,000 nodes peak at about 4 GB of RAM.
# About 30 minutes with the defaults on a 2-core machine; SIM_SIZES=100,1000 takes a few.
SIM_SIZES ?= 100,1000,10000
SIM_PARTITION_SIZES ?= 100,300,1000
SIM_CHURN_SIZES ?= 1000
SIM_OUT   ?= simulations/results
SIM_STAMP := $(VENV)/.installed-sim
$(SIM_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,sim]'
	touch $(SIM_STAMP)

simulate: $(SIM_STAMP)
	$(PY) -m simulations report --sizes $(SIM_SIZES) --partition-sizes $(SIM_PARTITION_SIZES) \
		--churn-sizes $(SIM_CHURN_SIZES) --out $(SIM_OUT)

# The interpreter a new venv would be built from (the existing one's: .venv/pyvenv.cfg).
which-python:
	@echo $(PYTHON)

clean:
	rm -rf $(VENV) $(CANARY) .pytest_cache .mypy_cache .ruff_cache *.egg-info
