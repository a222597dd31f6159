# hierseg training image: CUDA runtime + a pinned CUDA build of torch + hierseg; runs jobs/train.py.
#   docker build -t hierseg:0.1.0 .
#   docker run --gpus all --shm-size=16g -v $PWD/data:/data hierseg:0.1.0 --spec examples/specs/srf_tem.yaml
# The same image serves Ray head/worker pods (deploy/kuberay) and Slurm jobs (via apptainer/enroot).
# Torch wheels bring their own CUDA libraries; the base image provides a matching runtime and cuDNN
# for anything else, and the host needs an NVIDIA driver new enough for CUDA 12.8.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# Pinned together: Ray must match the cluster's rayVersion; mlflow and mlflow-skinny must be the same release.
ARG RAY_VERSION=2.60.0
ARG MLFLOW_VERSION=3.17.2

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates tini \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

# torch first, from the CUDA wheel index, in its own layer (it is most of the image and changes least).
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY hierseg ./hierseg
RUN pip install . "ray[default,train]==${RAY_VERSION}" "mlflow==${MLFLOW_VERSION}" "torch==${TORCH_VERSION}"

COPY jobs ./jobs
COPY examples ./examples
COPY deploy ./deploy

RUN useradd --create-home --uid 1000 --shell /bin/bash hierseg \
 && mkdir -p /data && chown hierseg:hierseg /data /app
# Numeric, so Kubernetes runAsNonRoot can verify it without reading /etc/passwd.
USER 1000:1000
ENV HOME=/home/hierseg

ENTRYPOINT ["tini", "--", "python", "jobs/train.py"]
CMD ["--help"]
