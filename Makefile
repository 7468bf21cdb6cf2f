# Two commands matter: `make demo` and `make test`. Both set up what is missing first.
PYTHON ?= python3
STAMP  := .setup.stamp
# 2 workers keep the Triton-interpreter tests inside the CI budget on a 2-core machine.
PYTEST_ARGS ?= -n 2

.PHONY: setup demo test lint bench clean

# Reuse an importable torch (e.g. a CUDA build on a GPU box); otherwise take the pinned CPU
# wheel: an unpinned torch would pull several GB of CUDA packages.
$(STAMP): pyproject.toml setup.py
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "torch==2.13.0"
	$(PYTHON) -m pip install -q -e ".[test,bench]"
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PYTHON) -m maskkv.cli demo

test: $(STAMP)
	$(PYTHON) -m ruff check .
	TRITON_INTERPRET=$${TRITON_INTERPRET-$$($(PYTHON) -c "import torch;print(0 if torch.cuda.is_available() else 1)")} \
		$(PYTHON) -m pytest -q $(PYTEST_ARGS) tests

lint: $(STAMP)
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

bench: $(STAMP)
	$(PYTHON) benchmarks/bench_select_and_gather.py
	$(PYTHON) benchmarks/bench_ragged_attention.py
	$(PYTHON) benchmarks/bench_e2e.py

clean:
	rm -rf $(STAMP) build *.egg-info .pytest_cache
