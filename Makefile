# Two commands matter: `make demo` and `make test`. Both set up what is missing first.
#
# Everything is installed into a project virtual environment, .venv, so that a system Python
# that refuses `pip install` (PEP 668, "externally-managed-environment": Debian, Ubuntu) works.
# The venv sees the system's site-packages (--system-site-packages): a torch already on the
# machine (e.g. a CUDA build on a GPU box) stays importable and is reused, not replaced.
PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.setup.stamp
# 2 workers keep the Triton-interpreter tests inside the CI budget on a 2-core machine.
PYTEST_ARGS ?= -n 2

.PHONY: setup demo test lint bench clean

# A Python without ensurepip (Debian's python3 without python3-venv) cannot make a venv with
# its own pip; then the venv is made without one and runs the system's pip module, which
# --system-site-packages makes importable (pip installs into the running interpreter's prefix,
# the venv).
$(VPY):
	@$(PYTHON) -m venv --system-site-packages $(VENV) 2>/dev/null \
		|| { rm -rf $(VENV) && $(PYTHON) -m venv --system-site-packages --without-pip $(VENV); }
	@$(VPY) -m pip --version >/dev/null 2>&1 || { \
		echo "error: $(VENV) has no pip: install pip for $(PYTHON) (e.g. python3-pip)," \
		     "or its ensurepip (python3-venv), then run make again" >&2; \
		rm -rf $(VENV); exit 1; }

# Reuse an importable torch (e.g. a CUDA build on a GPU box); otherwise take the pinned CPU
# wheel: an unpinned torch would pull several GB of CUDA packages.
$(STAMP): pyproject.toml setup.py | $(VPY)
	@$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q "torch==2.13.0"
	$(VPY) -m pip install -q -e ".[test,bench,eval]"
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VPY) -m maskkv.cli demo

test: $(STAMP)
	$(VPY) -m ruff check .
	TRITON_INTERPRET=$${TRITON_INTERPRET-$$($(VPY) -c "import torch;print(0 if torch.cuda.is_available() else 1)")} \
		$(VPY) -m pytest -q $(PYTEST_ARGS) tests

lint: $(STAMP)
	$(VPY) -m ruff check .
	$(VPY) -m ruff format --check .

bench: $(STAMP)
	$(VPY) benchmarks/bench_select_and_gather.py
	$(VPY) benchmarks/bench_ragged_attention.py
	$(VPY) benchmarks/bench_e2e.py

clean:
	rm -rf $(VENV) .setup.stamp build *.egg-info .pytest_cache
