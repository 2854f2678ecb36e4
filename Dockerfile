# One image for the hive and the workers. The torch build is chosen at build time:
#   docker build .                                   (CUDA 12.8 wheels)
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu .
FROM python:3.11-slim

ARG TORCH=torch==2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128

WORKDIR /app
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX" "$TORCH"
COPY pyproject.toml README.md ./
COPY shared shared
COPY hive hive
COPY worker worker
RUN pip install --no-cache-dir .

ENV HF_HOME=/hf PYTHONUNBUFFERED=1
EXPOSE 7833
CMD ["hive", "serve", "--host", "0.0.0.0"]
