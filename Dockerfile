# syntax=docker/dockerfile:1
# clinicloop images, two targets the k8s manifests name:
#   docker build --target cpu  -t ghcr.io/clinicloop/clinicloop:0.1.0-cpu .
#   docker build --target cuda -t ghcr.io/clinicloop/clinicloop:0.1.0-cuda .
# `cpu`: the gateway, scoring and migrations (no torch), with the tiny model built in, so it serves
# offline as it is (`docker run -p 8000:8000 -e CLINICLOOP_SERVER__API_KEYS='["sha256:..."]' IMAGE`:
# off loopback the gateway wants keys). `cuda`: all of that plus the training and
# quantization stack (`rl refresh --qlora`, `quant awq`) on torch's CUDA wheels; the NVIDIA driver
# comes from the node (NVIDIA container toolkit). vLLM itself runs from vllm/vllm-openai.
# Both run as UID 10001 and hold no secrets: keys and the store URL come from the environment.

# llama-cpp-python has no Linux wheel on PyPI: build it once, with the Makefile's flags (no
# -march=native, so the wheel runs on any x86-64 node).
FROM python:3.11.14-slim-bookworm AS llama-wheel
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*
ARG LLAMA_CPP_PYTHON=0.3.36
RUN CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=4 \
    pip wheel --no-cache-dir --no-deps -w /wheels "llama-cpp-python==${LLAMA_CPP_PYTHON}"

# An empty venv beside the source and the llama.cpp wheel, which both environments install into.
FROM python:3.11.14-slim-bookworm AS venv-base
COPY --from=llama-wheel /wheels /wheels
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY clinicloop ./clinicloop

# The serving environment: clinicloop with Postgres, no torch.
FROM venv-base AS venv-cpu
RUN pip install --no-cache-dir --find-links /wheels ".[postgres]"

# The tiny model, trained at build time (torch on the CPU, in this stage only).
FROM venv-cpu AS tiny-model
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && pip install --no-cache-dir --find-links /wheels ".[model]"
RUN clinicloop model build-tiny --size tiny --out /opt/clinicloop/models

# The training stack: torch's CUDA wheels (they carry the CUDA runtime), TRL, PEFT,
# llm-compressor, bitsandbytes for QLoRA.
FROM venv-base AS venv-cuda
RUN pip install --no-cache-dir torch==2.13.0 \
    && pip install --no-cache-dir --find-links /wheels ".[rl,quant,postgres]" bitsandbytes==0.50.2

FROM python:3.11.14-slim-bookworm AS runtime
RUN groupadd --gid 10001 clinicloop \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp clinicloop \
    && mkdir -p /var/lib/clinicloop && chown 10001:10001 /var/lib/clinicloop
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    CLINICLOOP_MODELS_DIR=/opt/clinicloop/models
# Relative defaults (var/: the SQLite store, spool, registry) land here when no volume is given.
WORKDIR /var/lib/clinicloop
COPY --from=tiny-model /opt/clinicloop/models /opt/clinicloop/models
EXPOSE 8000
ENTRYPOINT ["clinicloop"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]

FROM runtime AS cpu
COPY --from=venv-cpu /opt/venv /opt/venv
# For `docker run`; Kubernetes ignores it and uses the manifests' probes.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
USER 10001:10001

FROM runtime AS cuda
COPY --from=venv-cuda /opt/venv /opt/venv
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
