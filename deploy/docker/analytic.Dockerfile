# syntax=docker/dockerfile:1
# Analytic experts: `poegen serve analytic` (Gaussian mixtures, rewards, constraints, masked
# targets) with exact velocities and log-densities. An expert is a YAML file (an entry point of
# poegen.experts and its parameters), mounted under /models like any model. Build from the
# repository root:
#   docker build -f deploy/docker/analytic.Dockerfile -t poegen/analytic:cpu .
#   docker build -f deploy/docker/analytic.Dockerfile --build-arg TORCH_VARIANT=cu130 -t poegen/analytic:cuda .
# (TORCH_VARIANT: see flow.Dockerfile.)
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
RUN pip install -c constraints.txt "."

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
CMD ["poegen", "serve", "analytic", "--config", "/etc/poegen/server.yaml", "--model", "/models/expert.yaml"]
