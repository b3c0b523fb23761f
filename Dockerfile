# syntax=docker/dockerfile:1
# One image for every dartserve service: the command picks the service (serve, gateway, vision,
# pruner, generator, worker). Model weights are not in the image: Hugging Face checkpoints go to
# the cache at /models (HF_HOME), a volume. Only the 7 MB bundled demo model is inside.
#
#   docker build -t dartserve:0.1.0 .                                 # CPU
#   docker build --build-arg VARIANT=cuda -t dartserve:0.1.0-cuda .   # NVIDIA GPUs
ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS python
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH

FROM python AS torch-cpu
# PyPI's Linux torch wheel pulls several GB of CUDA libraries; this index has the same release without.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY constraints.txt /src/
RUN python -m venv /opt/venv \
 && pip install -c /src/constraints.txt --index-url ${TORCH_INDEX_URL} torch==2.13.0

FROM python AS torch-cuda
# The CUDA wheels bring their own CUDA runtime: the host needs only the driver and the NVIDIA
# container toolkit. Pick the index that matches the drivers of your GPU nodes.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
COPY constraints.txt /src/
RUN python -m venv /opt/venv \
 && pip install -c /src/constraints.txt --index-url ${TORCH_INDEX_URL} torch==2.13.0

FROM torch-${VARIANT} AS build
COPY pyproject.toml README.md /src/
COPY dartserve /src/dartserve
COPY services /src/services
# torch is already installed and pinned: this adds dartserve and its other dependencies only.
RUN pip install -c /src/constraints.txt /src

FROM python AS runtime
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/dartserve dartserve \
 && mkdir /models && chown 10001:10001 /models
COPY --from=build /opt/venv /opt/venv
# A container is reached from outside itself: bind every interface, not loopback.
ENV DARTSERVE_HOST=0.0.0.0 HF_HOME=/models
VOLUME /models
USER 10001:10001
WORKDIR /home/dartserve
EXPOSE 8000 50051 50052 50053 9101 9102 9103
# Checks the default command; docker-compose.yml and k8s/ give each service its own check.
HEALTHCHECK --interval=30s --timeout=10s --start-period=2m --retries=3 CMD ["dartserve", "probe", "serve"]
ENTRYPOINT ["dartserve"]
CMD ["serve"]
