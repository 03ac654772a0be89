# Two commands on a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install demo lint test bench minilab clean gpu-check gpu-wheels gpu-prebuild gpu-preflight test-triton-versions

PIP    := $(BIN)/pip install -q -c constraints.txt

# .[dev] (pyproject.toml): the extras the suite and the demo need, ruff included; every install takes
# torch from constraints.txt (torch==2.13.0, the local CPU wheel). deepspeed (in .[dev]) builds from
# source against the installed torch: --no-build-isolation
$(STAMP): pyproject.toml setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(PIP) torch
	$(PIP) --no-build-isolation -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# --overwrite: `make demo` again replaces runs/demo (fdiv-train itself refuses to clear a run)
demo: $(STAMP)
	$(BIN)/fdiv-train pipeline --config demo --overwrite

# ruff with the configuration of pyproject.toml (its default rule set), then import-linter: the layers
# of docs/design.md and no import cycle (pyproject.toml [tool.importlinter])
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-cache

test: lint
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

# --- GPU machine (docs/gpu.md) ---------------------------------------------------------------
# gpu-check runs there with the machine's own python3 (no venv, no network); DRY_RUN=1 anywhere.
gpu-check:
	$(PYTHON) scripts/gpu_check.py $(if $(DRY_RUN),--dry-run)

# pure-Python peer wheels for the GPU machine's benchmark (it has no network); git-ignored
GPU_WHEELS ?= liger-kernel==0.8.5 cut-cross-entropy==25.1.1
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .gpu-wheels $(GPU_WHEELS)
	@for w in .gpu-wheels/*.whl; do case "$$w" in *-none-any.whl) echo "gpu-wheels: $$w";; \
	  *) echo "gpu-wheels: $$w is not a pure-Python wheel" >&2; exit 1;; esac; done

# the CUDA extension built here (compile only) for the GPU machine's Python 3.12 + torch 2.11.0+cu130
GPU_PYTHON ?= $(HOME)/.pyenv/versions/3.12.1/bin/python3.12
GPU_TORCH  ?= torch==2.11.0
.venv-gpu/.installed-stamp:
	$(GPU_PYTHON) -m venv .venv-gpu
	.venv-gpu/bin/pip install -q $(GPU_TORCH) ninja
	touch $@

gpu-prebuild: .venv-gpu/.installed-stamp
	.venv-gpu/bin/python scripts/gpu_prebuild.py

# the GPU machine's Python, torch and triton (3.6, torch's pin) here, on CPU: the interpreter tests,
# the check's own tests, the loader and the compile checks (the binding against torch 2.11's headers)
.venv-gpu/.test-stamp: .venv-gpu/.installed-stamp
	echo "$(GPU_TORCH)" > .venv-gpu/constraints.txt
	.venv-gpu/bin/pip install -q -c .venv-gpu/constraints.txt numpy pytest pytest-benchmark hypothesis mpmath
	touch $@

gpu-preflight: .venv-gpu/.test-stamp
	TRITON_INTERPRET=1 .venv-gpu/bin/python -m pytest -q tests/test_triton.py tests/test_gpu_check.py \
	  tests/test_native.py tests/test_cuda_compile.py

# the interpreter tests under triton 3.6 (the GPU machine's) besides the dev pin that `make test` uses:
# a venv that sees .venv's packages and shadows triton
.venv-triton36/.installed-stamp: $(STAMP)
	$(PYTHON) -m venv .venv-triton36
	.venv-triton36/bin/python -c "import site, sys; open(site.getsitepackages()[0] + '/zz_dev_venv.pth', 'w').write(sys.argv[1])" \
	  "$$($(BIN)/python -c 'import site; print(site.getsitepackages()[0])')"
	.venv-triton36/bin/pip install -q --no-deps triton==3.6.0
	touch $@

test-triton-versions: .venv-triton36/.installed-stamp
	.venv-triton36/bin/python -m pytest -q tests/test_triton.py

clean:
	rm -rf $(VENV) build *.egg-info
