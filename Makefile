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

.PHONY: serve test demo lint install llama-wheel clean

serve: $(STAMP)
	$(BIN)/clinicloop serve --host $(HOST) --port $(PORT)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py $(DEMO_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check clinicloop tests benchmarks scripts

install: $(STAMP)

llama-wheel: $(LLAMA_WHEEL)

$(LLAMA_WHEEL):
	mkdir -p $(WHEELS)
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(PYTHON) -m pip wheel --no-deps -w $(WHEELS) llama-cpp-python==$(LLAMA_CPP_PYTHON)

# torch is installed first and pinned to the CPU wheel on disk, so nothing pulls a CUDA build.
$(STAMP): pyproject.toml $(LLAMA_WHEEL)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q --find-links $(WHEELS) -e ".[$(EXTRAS)]"
	touch $(STAMP)

clean:
	rm -rf $(VENV) var
