# syntax=docker/dockerfile:1
# Build: docker build -t ses-relay .
# Run:   docker run -p 2525:2525 -e AWS_REGION=eu-west-1 -v ses-spool:/var/lib/ses-relay ses-relay
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
USER ses-relay
ENV STATE_DIRECTORY=/var/lib/ses-relay \
    SES_RELAY_SMTP_LISTEN=0.0.0.0:2525 \
    SES_RELAY_METRICS_LISTEN=0.0.0.0:9465
VOLUME /var/lib/ses-relay
EXPOSE 2525 9465
HEALTHCHECK --interval=30s --timeout=5s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9465/healthz', timeout=4)"]
ENTRYPOINT ["ses-relay"]
CMD ["serve"]
