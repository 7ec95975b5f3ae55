# make setup | test | reliability | demo | bench | lint. `test` and `demo` set up .venv first when it is missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; a user with a GPU installs a CUDA build into .venv first and setup keeps it.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.dsimagenet-setup

.PHONY: setup test reliability demo bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install "$(TORCH_SPEC)"
	$(BIN)/pip install -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

reliability: $(STAMP)
	$(BIN)/python -m pytest -q -m reliability tests

demo: $(STAMP)
	$(BIN)/dsimagenet demo --out demo-out

# The CPU benchmarks; the GPU ones (bench/gpu_session.py runs them all, bench/evaluate_cuda.py) need a CUDA machine.
CPU_BENCH := bench/build.py bench/build_hub.py bench/hub_formats.py bench/load.py bench/nasbench201.py bench/train.py

bench: $(STAMP)
	@for f in $(CPU_BENCH); do echo "== $$f"; $(BIN)/python $$f || exit 1; done

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) demo-out build *.egg-info
