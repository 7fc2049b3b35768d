# make serve: set up .venv and serve the embedded default on 127.0.0.1:$(PORT)
# make test:  set up .venv and run the test suite
# make demo:  the whole loop on the tiny model: serve, log, score, retrain, gate, hot-swap
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
EXTRAS ?= model,rl,postgres,test
STAMP := $(VENV)/.installed

.PHONY: serve test demo lint install llama-wheel llama-server loadtest clean

serve: $(STAMP)
	$(BIN)/clinicloop serve --host $(HOST) --port $(PORT)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py $(DEMO_ARGS)

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

# Benchmark-only peer: llama.cpp's C++ llama-server, built once from the llama.cpp vendored in
# llama-cpp-python's sdist (the same llama.cpp and CPU flags as the wheel), statically linked so
# the one cached file is all it needs; shared by every clone on this machine (about 10 minutes).
LLAMA_SERVER := $(HOME)/.cache/clinicloop/bin/llama-server-$(LLAMA_CPP_PYTHON)
LLAMA_SERVER_WORK := $(HOME)/.cache/clinicloop/build/llama-server-$(LLAMA_CPP_PYTHON)
LLAMA_SDIST_DIR := $(LLAMA_SERVER_WORK)/llama_cpp_python-$(LLAMA_CPP_PYTHON)

llama-server: $(LLAMA_SERVER)

$(LLAMA_SERVER):
	mkdir -p $(LLAMA_SERVER_WORK) $(dir $@)
	test -d $(LLAMA_SDIST_DIR)/vendor/llama.cpp || { \
		$(PYTHON) -m pip download -q --no-deps --no-binary :all: \
			-d $(LLAMA_SERVER_WORK) llama-cpp-python==$(LLAMA_CPP_PYTHON) && \
		tar xzf $(LLAMA_SDIST_DIR).tar.gz -C $(LLAMA_SERVER_WORK); }
	cmake -S $(LLAMA_SDIST_DIR)/vendor/llama.cpp -B $(LLAMA_SERVER_WORK)/build \
		-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF -DLLAMA_OPENSSL=OFF \
		-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
		-DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF
	cmake --build $(LLAMA_SERVER_WORK)/build --target llama-server -j$$(nproc)
	cp $(LLAMA_SERVER_WORK)/build/bin/llama-server $@.tmp
	mv $@.tmp $@

# torch is installed first and pinned to the CPU wheel on disk, so nothing pulls a CUDA build.
$(STAMP): pyproject.toml $(LLAMA_WHEEL)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q --find-links $(WHEELS) -e ".[$(EXTRAS)]"
	touch $(STAMP)

clean:
	rm -rf $(VENV) var
