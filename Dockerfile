# syntax=docker/dockerfile:1
# Build and run: see "Container" in README.md. In short:
#   docker build -t ses-relay .
#   docker run -d --name ses-relay --stop-timeout 45 \
#     -p 127.0.0.1:2525:2525 -p 127.0.0.1:9465:9465 \
#     -e AWS_REGION=eu-west-1 -v ses-spool:/var/lib/ses-relay ses-relay
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY relay ./relay
RUN python -m pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/ses-relay --create-home ses-relay
COPY --from=build /wheels /wheels
RUN python -m pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY config.example.toml /etc/ses-relay/config.example.toml
# Listens on all the container's addresses; relays for Docker's networks only.
COPY deploy/docker/config.toml /etc/ses-relay/config.toml
COPY deploy/docker/healthcheck.py /usr/local/lib/ses-relay/healthcheck.py
USER ses-relay
# The spool (spool.path's default when set).
ENV STATE_DIRECTORY=/var/lib/ses-relay
VOLUME /var/lib/ses-relay
EXPOSE 2525 9465
# GET /healthz on metrics.listen as this configuration (and SES_RELAY_*) sets it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s \
    CMD ["python", "/usr/local/lib/ses-relay/healthcheck.py", "/etc/ses-relay/config.toml"]
# SIGTERM starts a graceful stop of at most 30 s: run with --stop-timeout 45
# (Docker's default of 10 s would kill sessions finishing their transaction).
STOPSIGNAL SIGTERM
ENTRYPOINT ["ses-relay"]
CMD ["serve", "-c", "/etc/ses-relay/config.toml"]
