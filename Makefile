# meterd developer commands. Each target creates .venv and installs what it needs.
VENV    ?= .venv
PYTHON  ?= python3
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-dev

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: $(STAMP)
	$(BIN)/meterd demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

test: lint
	$(BIN)/pytest -q -n 2

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache

# The Debian package, in dist/ (or DEB_OUT): see docs/install.md.
.PHONY: deb
deb:
	packaging/build-deb.sh $(or $(DEB_OUT),dist)
