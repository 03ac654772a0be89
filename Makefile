# Two commands on a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install demo test bench minilab clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-build-isolation -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fdiv-train pipeline --config examples/configs/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python -m bench.run --profile cpu
	$(BIN)/python -m bench.update_readme

.PHONY: bench-gpu
bench-gpu: $(STAMP)
	$(BIN)/python -m bench.run --profile gpu
	$(BIN)/python -m bench.update_readme

# The mini-lab (docs/minilab/README.md): MINILAB_JOBS worker processes of one thread each.
MINILAB_JOBS ?= 2
minilab: $(STAMP)
	$(BIN)/python examples/minilab/run.py --out docs/minilab --results docs/results.md --jobs $(MINILAB_JOBS)

clean:
	rm -rf $(VENV) build *.egg-info
