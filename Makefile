# Two commands from a fresh clone: `make demo` (the whole pipeline on the built-in
# corpus) and `make test`. Both create .venv when it is missing and install pinned sets.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
HASH   := $(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# Two install sets: the demo needs the package and the ONNX export; the tests add the
# reference models (torch), Beam, libtpu (27 s more of the 76 s install, 2026-12-06) and
# the CUDA PJRT plugin without CUDA libraries (gpu-aot: compile-check for GPU targets).
DEMO_STAMP := $(VENV)/.installed-demo-$(HASH)
TEST_STAMP := $(VENV)/.installed-test-$(HASH)
CHROMIUM   := /usr/bin/chromium
# XLA's CPU runtime allocates each step's temporaries afresh; glibc maps big blocks with
# mmap, so every step page-faults them in 4 KB pages (20 % of the demo's CPU time was
# kernel). Transparent huge pages for malloc's mappings: the vision stage's step 157 ->
# 181 images/s, kernel time 14.5 -> 6.1 s in 150 steps, identical losses (2026-12-06).
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

.PHONY: demo test install params clean

$(DEMO_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[export,serve]"
	$(BIN)/pip install -q --no-deps jax2onnx==0.17.1  # see the export extra in pyproject.toml
	rm -f $(VENV)/.installed-demo-* && touch $@

$(TEST_STAMP): $(DEMO_STAMP)
	$(BIN)/pip install -q -e ".[test,tpu,gpu-aot,beam,export,serve,gcs]"
	rm -f $(VENV)/.installed-test-* && touch $@

install: $(TEST_STAMP) $(CHROMIUM)

# The page tests (tests/test_serve_page.py) drive Debian's Chromium through Playwright;
# without its recommends (systemd, perl, samba clients...: 130 packages with them), as CI
# runs it: as root on a fresh machine.
$(CHROMIUM):
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium

demo: $(DEMO_STAMP)
	JAX_PLATFORMS=cpu $(BIN)/unifer demo --workdir workdir/demo

# Tests that start multi-process jobs run last and alone: two coordinated jobs at once on
# 2 cores starve each other's collectives.
test: $(TEST_STAMP) $(CHROMIUM)
	JAX_PLATFORMS=cpu $(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not multiprocess"
	JAX_PLATFORMS=cpu $(BIN)/python -m pytest -q -m multiprocess

# Parameter counts of the model presets, built abstractly (nothing allocated).
params: $(DEMO_STAMP)
	JAX_PLATFORMS=cpu $(BIN)/unifer params --preset tiny demo base 7b

clean:
	rm -rf $(VENV) workdir
