# Two commands on a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install demo test bench minilab clean

PIP    := $(BIN)/pip install -q -c constraints.txt

# deepspeed (in .[dev]) builds from source against the installed torch: --no-build-isolation
$(STAMP): setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(PIP) torch
	$(PIP) --no-build-isolation -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# --overwrite: `make demo` again replaces runs/demo (fdiv-train itself refuses to clear a run)
demo: $(STAMP)
	$(BIN)/fdiv-train pipeline --config demo --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python -m bench.run --profile cpu
	$(BIN)/python -m bench.update_readme

.PHONY: bench-gpu
bench-gpu: $(STAMP)
	$(BIN)/python -m bench.run --profile gpu
	$(BIN)/python -m bench.update_readme

minilab: $(STAMP)
	$(BIN)/python examples/minilab/run.py --out docs/minilab --results docs/results.md

clean:
	rm -rf $(VENV) build *.egg-info
