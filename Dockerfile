# tierdisk server and CLI.
#   docker build -t tierdisk .
#   docker run --rm -p 7400:7400 -p 9400:9400 tierdisk            # serves the default volume
#   docker run --rm tierdisk --server HOST:7400 volumes             # any client verb
# docker-compose.yml runs this image as the origin and cache tiers (see deploy/README.md).
FROM python:3.11-slim

# The server and the CLI tune glibc malloc themselves at start (DESIGN §6: without it every
# ~1 MiB gRPC message costs about a thousand page faults), so no MALLOC_* variables here:
# they would keep the tuning on when TIERDISK_NO_MALLOC_TUNING=1 asks for it off.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/tierdisk
COPY . .
RUN pip install ".[fast]" \
 && install -m 0755 deploy/healthcheck.py /usr/local/bin/tierdisk-healthcheck \
 && install -m 0755 deploy/origin-entrypoint.py /usr/local/bin/tierdisk-origin-entrypoint \
 && install -d -m 0755 /etc/tierdisk \
 && install -m 0644 deploy/tierdisk/origin.toml deploy/tierdisk/cache.toml /etc/tierdisk/ \
 && useradd --system --uid 10001 --user-group --no-create-home \
        --home-dir /var/lib/tierdisk --shell /usr/sbin/nologin tierdisk \
 && install -d -o tierdisk -g tierdisk -m 0750 /var/lib/tierdisk

USER tierdisk
WORKDIR /var/lib/tierdisk

# 7400: gRPC (BlockDevice, health, reflection); 9400: Prometheus /metrics.
EXPOSE 7400 9400

HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["tierdisk-healthcheck", "127.0.0.1:7400"]

ENTRYPOINT ["tierdisk"]
CMD ["serve", "--listen", "0.0.0.0:7400", "--metrics", "0.0.0.0:9400", "--data-dir", "/var/lib/tierdisk"]
