# The two commands of the README: `make demo` (the main job) and `make test` (the suite).
# Both create .venv on first use and install the package with its test extras from the registry.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# the CPU's in-place PReLU op, built ahead of time (optional: without a C compiler the
	# pipeline runs PyTorch's PReLU and says so once)
	-$(BIN)/python -m dds_perception.detection.native_prelu
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dds-perception demo

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
