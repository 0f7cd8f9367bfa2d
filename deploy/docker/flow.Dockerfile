# syntax=docker/dockerfile:1
# Flow experts on diffusers: `poegen serve flux|sd3|wan|flow`, and `poegen serve classifier`
# (the shipped digit priors and classifiers are flow-family models too). Weights are never in
# the image: mount them at /models. Build from the repository root:
#   docker build -f deploy/docker/flow.Dockerfile -t poegen/flow:cpu .
#   docker build -f deploy/docker/flow.Dockerfile --build-arg TORCH_VARIANT=cu130 -t poegen/flow:cuda .
# TORCH_VARIANT names a wheel index of download.pytorch.org (cpu, cu126, cu128, cu130, ...):
# the CUDA wheels carry their CUDA runtime, so one slim base serves both variants; the host
# needs only the NVIDIA driver and container toolkit.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VARIANT=cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/poegen/bin:${PATH}
WORKDIR /src
COPY constraints.txt ./
# torch first, from the variant's index, at the version constraints.txt pins: the project's
# own install below then finds it satisfied and pulls no other build
RUN python -m venv /opt/poegen \
    && pip install --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" \
        "$(grep '^torch==' constraints.txt)"
COPY pyproject.toml README.md ./
COPY poegen_top/ poegen_top/
COPY kernel/ kernel/
COPY expert_servers/ expert_servers/
COPY clients/ clients/
COPY bench/ bench/
COPY proto/ proto/
COPY deploy/ray/ deploy/ray/
RUN pip install -c constraints.txt ".[flow]"

FROM ${PYTHON_IMAGE}
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin poegen \
    && mkdir /models
COPY --from=build /opt/poegen /opt/poegen
COPY --chmod=0755 deploy/docker/entrypoint.sh /usr/local/bin/poegen-entrypoint
COPY deploy/docker/server.yaml /etc/poegen/server.yaml
# weights come from the /models volume, never from a hub at run time
ENV PATH=/opt/poegen/bin:${PATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
    XDG_CACHE_HOME=/tmp/.cache
VOLUME ["/models"]
USER 10001:10001
WORKDIR /home/poegen
EXPOSE 50051 9464
ENTRYPOINT ["poegen-entrypoint"]
CMD ["poegen", "serve", "flow", "--config", "/etc/poegen/server.yaml", "--model", "/models/model"]
