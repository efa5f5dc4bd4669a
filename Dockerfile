# The sidecar image: `docker build -t sidecar:dev .` at the repository root.
#
# Two stages. `build` turns the project and every dependency into wheels (pip wheel);
# the final stage installs only those wheels, from a bind mount (BuildKit, the default
# builder since Docker 23), so no build tool, source tree, pip cache or wheel file ends up
# in a layer of the image.
#
# At run time nothing is written outside /tmp: bytecode was compiled by pip at install
# time and PYTHONDONTWRITEBYTECODE stops any more, HOME and TMPDIR point at /tmp. Run it
# with a read-only root filesystem and a tmpfs (compose: `read_only: true`,
# `tmpfs: [/tmp]`) or an emptyDir on /tmp (Kubernetes).
#
# Mount the config at /etc/sidecar/config.yaml (the policy beside it) and either the SVID
# at /run/spiffe (svid.pem, svid_key.pem, bundle.pem: spiffe-helper's names), readable by
# uid 10001 or by the group given with `--group-add` / fsGroup, or, with
# `identity.workload_api`, the directory holding the SPIRE agent's socket.
#
# The image has the `spire` extra (grpcio, py-spiffe): `identity.workload_api` needs it,
# and so does `sidecar pki agent`, the dev Workload API server the compose example runs.

FROM python:3.13-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
# Only what the package build reads; .dockerignore keeps the rest of the tree out.
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
RUN pip wheel --wheel-dir /wheels '.[spire]'

FROM python:3.13-slim
LABEL org.opencontainers.image.title="sidecar" \
      org.opencontainers.image.description="An asyncio mTLS sidecar proxy for SPIFFE workloads" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    HOME=/tmp \
    TMPDIR=/tmp
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels /wheels/*.whl
# A numeric user and group with no /etc/passwd entry: Kubernetes' runAsNonRoot can only
# check a numeric USER.
USER 10001:10001
WORKDIR /tmp
# 8443: the inbound mTLS listener of the example configs. 9901: the admin endpoint
# (/metrics, /healthz, /readyz, /status); it binds 127.0.0.1 unless the config says
# otherwise, so publish it only with `admin.listen: 0.0.0.0:9901`. Outbound listeners
# are for the app on loopback and are not exposed.
EXPOSE 8443 9901
# No curl in a slim image: the standard library asks /healthz; any non-2xx or no answer
# raises, and the exit status is 1. Assumes the admin endpoint on port 9901 of loopback
# or of every interface (a config that moves it needs its own healthcheck).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9901/healthz', timeout=2)"]
ENTRYPOINT ["sidecar"]
CMD ["run", "-c", "/etc/sidecar/config.yaml"]
