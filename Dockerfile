FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 SIDECAR_HOST=0.0.0.0
WORKDIR /app

# The wheel ships the sidecar and the dashboard (as sidecar.dashboard); dashboard/ is its source folder.
COPY pyproject.toml ./
COPY sidecar/ sidecar/
COPY dashboard/ dashboard/
RUN pip install '.[dashboard]'

# The reference Celery app is not in the wheel; the worker service runs it from the working directory.
COPY tasks/ tasks/

# Not root: the relay needs no privilege, and a compromised process should not own the image.
RUN useradd --create-home --uid 10001 sidecar && mkdir .sidecar && chown sidecar .sidecar
USER sidecar

EXPOSE 8000 5006
# /healthz is 503 while the stream reader or Redis is down (docs/protocol.md); urlopen raises on it.
HEALTHCHECK --interval=10s --timeout=5s --start-period=15s --retries=3 \
    CMD python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=4)" \
        "http://127.0.0.1:${SIDECAR_PORT:-8000}/healthz"
CMD ["gunicorn", "-c", "sidecar/gunicorn.conf.py"]
