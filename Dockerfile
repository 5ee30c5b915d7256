# Production image: web (WSGI server), Celery worker and beat share it.
FROM python:3.11-slim-bookworm
RUN apt-get update && apt-get install -y --no-install-recommends libmariadb-dev pkg-config gcc \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY . .
ENV DJANGO_SETTINGS_MODULE=recoplatform.settings DATA_DIR=/data PYTHONUNBUFFERED=1
RUN mkdir -p /data
EXPOSE 8000
CMD ["gunicorn", "recoplatform.wsgi:application", "--bind", "0.0.0.0:8000", "--workers", "2"]
