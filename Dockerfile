FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

COPY pyproject.toml ./
COPY sidecar/ sidecar/
RUN pip install '.[dashboard]'

# The reference Celery app and the dashboard are not in the wheel; the worker and dashboard services run
# them from the working directory.
COPY tasks/ tasks/
COPY dashboard/ dashboard/

EXPOSE 8000 5006
CMD ["sidecar", "serve", "--host", "0.0.0.0", "--port", "8000"]
