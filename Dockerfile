# Image for every guardmesh service (the command picks one): `docker compose up` builds it.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends gcc g++ && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY . .
# CPU build of PyTorch by default; pass --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 for CUDA.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir torch --index-url ${TORCH_INDEX} && pip install --no-cache-dir .
ENV GUARDMESH__MESH__STATE_DIR=/var/lib/guardmesh
# An unprivileged user owns the state folder (a fresh named volume takes its ownership from the image).
RUN useradd --uid 10001 --create-home guardmesh && mkdir -p /var/lib/guardmesh && chown guardmesh /var/lib/guardmesh
USER 10001
ENTRYPOINT ["guardmesh"]
