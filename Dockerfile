# Production image: web (WSGI server), Celery worker and beat share it.
FROM python:3.11-slim-bookworm
RUN apt-get update && apt-get install -y --no-install-recommends libmariadb-dev pkg-config gcc \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY . .
ENV DJANGO_SETTINGS_MODULE=recoplatform.settings DATA_DIR=/data PYTHONUNBUFFERED=1 \
    RECO_BIND=0.0.0.0:8000 PROMETHEUS_MULTIPROC_DIR=/tmp/prometheus
RUN mkdir -p /data
EXPOSE 8000
# gunicorn.conf.py: sync workers, one per core, an emptied multiprocess metrics directory.
CMD ["gunicorn", "-c", "gunicorn.conf.py", "recoplatform.wsgi:application"]
