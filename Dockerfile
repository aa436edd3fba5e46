# EmailOps daemon image: `python -m prod.run` as an unprivileged user, state in the /data volume.
# The root filesystem may be read-only (docker run --read-only, compose `read_only: true`):
# nothing is written outside /data and /tmp.
FROM python:3.11-slim

# No .pyc files at run time (the root fs may be read-only), unbuffered JSON logs, and every
# "home" or cache a library might reach for is under /tmp.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    XDG_CONFIG_HOME=/tmp/.config

ARG APP_UID=10001
ARG APP_GID=10001
RUN groupadd --system --gid "${APP_GID}" emailops \
 && useradd --system --uid "${APP_UID}" --gid emailops --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin emailops \
 && mkdir -p /data/logs /data/state /data/cache \
 && chown -R emailops:emailops /data

WORKDIR /app

# Dependencies first: this layer is rebuilt only when requirements-frozen.txt changes.
COPY requirements-frozen.txt ./
RUN python -m pip install --no-cache-dir --requirement requirements-frozen.txt

# The project itself (emailops/ and prod/, plus the `emailops` command), without dependencies:
# they are pinned above.
COPY pyproject.toml README.md ./
COPY emailops ./emailops
COPY prod ./prod
RUN python -m pip install --no-cache-dir --no-deps ./ \
 && rm -rf build ./*.egg-info

# The operator console (README "Operator console") on port 8080 of every interface of the
# container; publish it on the host's loopback only (docker-compose.yml), or behind a TLS proxy
# with WEB_BASE_URL=https://...
ENV WEB_PORT=8080 \
    WEB_ADDR=0.0.0.0
EXPOSE 8080

# Numeric, so that Kubernetes' runAsNonRoot and host tools can check it; /data is owned by it.
USER ${APP_UID}:${APP_GID}
VOLUME ["/data"]

# Docker's default stop signal, stated: the supervisor stops its workers gracefully on SIGTERM
# within SHUTDOWN_TIMEOUT_SECONDS (15 s); give `docker stop -t` / stop_grace_period more than that.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["python", "-m", "prod.healthcheck"]
CMD ["python", "-m", "prod.run"]
