# smallshot image for KubeRay: Ray 2.60 on Python 3.11 with every dependency baked in, so pods
# start without installing anything.
#   docker build -t smallshot:0.1.0 .                              # CPU
#   docker build --build-arg VARIANT=gpu -t smallshot:0.1.0-gpu .  # CUDA (A100/H100 nodes)
# checkov:skip=CKV_DOCKER_2:Kubernetes ignores image HEALTHCHECKs; KubeRay probes the Ray containers
ARG RAY_VERSION=2.60.0
ARG VARIANT=cpu
FROM rayproject/ray:${RAY_VERSION}-py311-${VARIANT}

# Everything runs as the base image's `ray` user (uid 1000, group users), who owns its Python.
USER 1000:100

# Pod root filesystems are read-only: caches and configs go to the /tmp volume.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    RAY_USAGE_STATS_ENABLED=0 \
    XDG_CACHE_HOME=/tmp/cache \
    XDG_CONFIG_HOME=/tmp/config \
    MPLCONFIGDIR=/tmp/config/matplotlib \
    TORCH_EXTENSIONS_DIR=/tmp/cache/torch_extensions \
    TRITON_CACHE_DIR=/tmp/cache/triton

# Created by `ray` so the in-tree build below may write into it.
RUN mkdir -p /home/ray/smallshot
WORKDIR /home/ray/smallshot

# Dependencies first (this layer survives code changes), in the order the Makefile uses:
# torch, then Ray/HF and the rest, then DeepSpeed built against the installed torch.
COPY --chown=1000:100 requirements.txt ./
RUN pip install "torch==2.14.1" "torchvision==0.29.1" \
 && pip install -r requirements.txt \
 && pip install --no-build-isolation "deepspeed==0.19.*"

# The project itself, without touching the dependencies installed above.
COPY --chown=1000:100 . ./
RUN pip install --no-deps --no-build-isolation . \
 && rm -rf build ./*.egg-info
