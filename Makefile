# The two commands a newcomer needs: `make demo` (the main job on the packaged default) and
# `make test`. Both install what they need first, idempotently, into .venv.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test demo lint

$(PY):
	python3 -m venv $(VENV)

install: $(PY)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned, so pip takes the CPU build on disk instead of downloading a CUDA one.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	bash scripts/install-assets.sh $(PY)

lint: install
	$(PY) -m ruff check src tests bench

test: install lint
	$(PY) -m pytest

demo: install
	$(VENV)/bin/slimtune compare
