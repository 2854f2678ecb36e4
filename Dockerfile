# One image for the hive and the workers. The torch build is chosen at build time:
#   docker build -t hive:cuda .                      (CUDA 12.8 wheels; compose.yaml)
#   docker build -t hive:cpu --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu .   (compose.cpu.yaml)
FROM python:3.11-slim

ARG TORCH=torch==2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/hf HF_HUB_DISABLE_TELEMETRY=1

WORKDIR /app
RUN pip install --index-url "$TORCH_INDEX" "$TORCH"
# The dependencies from pyproject.toml alone (empty packages stand in for the code), so that a
# change to the code rebuilds only the layers below.
COPY pyproject.toml README.md ./
RUN mkdir hive worker shared \
 && touch hive/__init__.py worker/__init__.py shared/__init__.py \
 && pip install . \
 && rm -rf hive worker shared build *.egg-info
COPY shared shared
COPY hive hive
COPY worker worker
RUN pip install --no-deps --force-reinstall . && rm -rf build *.egg-info

# Not root. The volumes' mount points belong to the user, so that new named volumes do too.
RUN useradd --create-home --uid 1000 hive && mkdir -p /hf /hub-cache && chown hive:hive /hf /hub-cache
USER hive

EXPOSE 7833
CMD ["hive", "serve", "--host", "0.0.0.0"]
