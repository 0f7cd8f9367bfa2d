# syntax=docker/dockerfile:1
# The Sampler: `poegen sampler`, the sampling kernel as a gRPC SamplerService that calls the
# experts. The kernel runs on the CPU by design (float32, its own seeded generator), so this
# image has one variant: CPU torch. It holds no weights. Build from the repository root:
#   docker build -f deploy/docker/sampler.Dockerfile -t poegen/sampler:cpu .
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
    && install -d -o 10001 -g 10001 /var/lib/poegen/jobs
COPY --from=build /opt/poegen /opt/poegen
COPY --chmod=0755 deploy/docker/entrypoint.sh /usr/local/bin/poegen-entrypoint
COPY deploy/docker/sampler.yaml /etc/poegen/sampler.yaml
ENV PATH=/opt/poegen/bin:${PATH} PYTHONUNBUFFERED=1 \
    XDG_CACHE_HOME=/tmp/.cache
USER 10001:10001
# the job store (sampler.yaml's job_store): mount a volume so jobs outlive the container
VOLUME ["/var/lib/poegen/jobs"]
WORKDIR /home/poegen
EXPOSE 50050 9465
ENTRYPOINT ["poegen-entrypoint"]
CMD ["poegen", "sampler", "--config", "/etc/poegen/sampler.yaml"]
