"""Django settings, driven by environment variables with embedded defaults.

With no variable set, everything runs on one laptop: SQLite for Django's own tables, SQLite
files for the business and Matomo sources (``make_demo_data`` creates them), no Redis, and
Celery tasks executed eagerly in-process. Each variable below switches one piece to a real
server; docs/CONFIGURATION.md lists them all.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from recoplatform.env import env_bool, env_dir, env_float, env_int, env_str, env_url

BASE_DIR = Path(__file__).resolve().parent.parent

DATA_DIR = env_dir("DATA_DIR", BASE_DIR / "var")

DEBUG = env_bool("DJANGO_DEBUG", default=True)
SECRET_KEY = env_str("DJANGO_SECRET_KEY", "insecure-dev-key-change-me" if DEBUG else "")
if not SECRET_KEY:
    raise ImproperlyConfigured("DJANGO_SECRET_KEY must be set when DJANGO_DEBUG is off")
ALLOWED_HOSTS = [h for h in env_str("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost").split(",") if h]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    # Swagger UI's static files, served locally: the network is closed here.
    "drf_spectacular_sidecar",
    "django_celery_beat",
    "django_prometheus",
    "apps.pipeline",
    "apps.models",
    "apps.experiments",
    "apps.serving",
]

MIDDLEWARE = [
    # First: an overloaded worker refuses work (503 + Retry-After) before anything is spent on
    # it (apps/serving/shedding.py; RECO["SHED_*"]).
    "apps.serving.shedding.SheddingMiddleware",
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
]

ROOT_URLCONF = "recoplatform.urls"
WSGI_APPLICATION = "recoplatform.wsgi.application"
ASGI_APPLICATION = "recoplatform.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Django's own database ---------------------------------------------------------------
_database_url = env_url(
    "DATABASE_URL",
    f"sqlite:///{DATA_DIR / 'recoplatform.sqlite3'}",
    schemes=("sqlite", "mysql", "mariadb", "postgres", "postgresql"),
)
try:
    DATABASES = {"default": dj_database_url.parse(_database_url, conn_max_age=60)}
except Exception as exc:  # dj_database_url raises plain ValueErrors/KeyErrors
    raise ImproperlyConfigured(f"DATABASE_URL={_database_url!r} cannot be parsed: {exc}") from None
if DATABASES["default"]["ENGINE"] == "django.db.backends.mysql":
    DATABASES["default"].setdefault("OPTIONS", {})["charset"] = "utf8mb4"
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # WAL lets the admin read while a pipeline stage writes; the busy timeout covers short overlaps.
    # IMMEDIATE: a transaction takes the write lock when it begins, waiting up to the timeout.
    # With SQLite's default (DEFERRED) one that read first and then writes fails at once with
    # "database is locked" when another connection wrote meanwhile (the busy timeout does not
    # apply to that upgrade): a promotion did so during a pipeline run in the soak scenario.
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 20,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        "transaction_mode": "IMMEDIATE",
    }
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    # A file (not Django's shared in-memory database) so that background threads and
    # subprocesses started by tests can write while the test holds a connection.
    # The pid keeps two concurrent test runs on one machine from sharing a database.
    DATABASES["default"]["TEST"] = {
        "NAME": str(DATA_DIR / f"test_recoplatform_{os.getpid()}.sqlite3")
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Sources, Redis, Celery, MLflow --------------------------------------------------------
_SOURCE_SCHEMES = ("sqlite", "mysql", "mariadb")
BUSINESS_DB_URL = env_url(
    "BUSINESS_DB_URL", f"sqlite:///{DATA_DIR / 'business.sqlite3'}", schemes=_SOURCE_SCHEMES
)
MATOMO_DB_URL = env_url(
    "MATOMO_DB_URL", f"sqlite:///{DATA_DIR / 'matomo.sqlite3'}", schemes=_SOURCE_SCHEMES
)
REDIS_URL = env_url("REDIS_URL", "", schemes=("redis", "rediss", "unix"))
CELERY_BROKER_URL = env_url("CELERY_BROKER_URL", "", schemes=("redis", "rediss", "amqp", "pyamqp"))
# MLflow's file store is in maintenance mode (it refuses to start without an opt-out), so the
# embedded default is its SQLite backend; artifacts go to DATA_DIR/mlartifacts.
MLFLOW_TRACKING_URI = env_str("MLFLOW_TRACKING_URI", f"sqlite:///{DATA_DIR / 'mlflow.db'}")
MLFLOW_ARTIFACT_ROOT = env_str("MLFLOW_ARTIFACT_ROOT", (DATA_DIR / "mlartifacts").as_uri())

# Celery: with no broker configured, tasks run eagerly in the calling process.
CELERY_TASK_ALWAYS_EAGER = CELERY_BROKER_URL == ""
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_RESULT_BACKEND = env_str("CELERY_RESULT_BACKEND", "")
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# Task events feed the Celery exporter that Prometheus scrapes (docker-compose.yml).
CELERY_WORKER_SEND_TASK_EVENTS = True
CELERY_TASK_SEND_SENT_EVENT = True
# Redis broker: a task delivered but never acknowledged (its worker was killed, or it lost the
# broker) is delivered again after the visibility timeout: the delay before a crashed worker's
# stage resumes. Longer than the longest task (the daily train stage) and than any retry
# countdown (60 s at most); a shorter one is still safe (a stage delivered again while it runs
# waits for it: tasks are idempotent) but delivers long stages several times. Unacknowledged
# tasks are looked for every tenth of it, at most every 10 s (kombu's default: every 100 s).
_visibility_timeout = env_int("CELERY_VISIBILITY_TIMEOUT_SECONDS", 2 * 3600, minimum=2)
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": _visibility_timeout,
    "unacked_restore_interval": max(1, min(10, _visibility_timeout // 10)),
    "unacked_restore_throttle": 1,
}
# A pipeline run with no sign of life for this long (its chain was lost with the broker's
# queue) is failed by the reaper task, so it stops blocking the next run of its kind. Longer
# than the visibility timeout: until then a redelivered task may still carry the run on.
PIPELINE_RUN_STALE_SECONDS = env_int(
    "RECO_PIPELINE_RUN_STALE_SECONDS", _visibility_timeout + 1800, minimum=1
)
# Beat: schedules in the database (django-celery-beat), sent only by the beat that holds a
# leader lease in Redis (apps/pipeline/beat.py), so a second beat is a hot standby that takes
# over within the lease's TTL. Default lease store: the broker (without it beat cannot send).
CELERY_BEAT_SCHEDULER = "apps.pipeline.beat:LeaderDatabaseScheduler"
CELERY_BEAT_LEADER_LOCK_URL = env_url(
    "CELERY_BEAT_LEADER_LOCK_URL",
    CELERY_BROKER_URL if CELERY_BROKER_URL.startswith(("redis:", "rediss:")) else "",
    schemes=("redis", "rediss", "unix"),
)
CELERY_BEAT_LEADER_LOCK_SECONDS = env_int("CELERY_BEAT_LEADER_LOCK_SECONDS", 30, minimum=1)
# Save each entry's last run after every task sent: a standby that takes over reads it and does
# not send a task the old leader already sent.
CELERY_BEAT_SYNC_EVERY = 1
CELERY_TIMEZONE = "UTC"

# Loopback and private ranges: where a Prometheus scraper sits (compose network, cluster).
_PRIVATE_NETWORKS = "127.0.0.0/8,::1/128,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,fc00::/7"


def _networks(name: str, default: str) -> list[str]:
    """A comma list of IP networks (CIDR); a bad one stops start-up naming the variable."""
    networks = [n.strip() for n in env_str(name, default).split(",") if n.strip()]
    for network in networks:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ImproperlyConfigured(f"{name}: {network!r} is not an IP network") from None
    return networks


# --- Platform options (read through apps.pipeline.conf.reco()) -----------------------------
RECO = {
    "SOURCES_CONTRACT": env_str("RECO_SOURCES_CONTRACT", str(BASE_DIR / "config" / "sources.yaml")),
    # A data-quality score below this blocks training.
    "QUALITY_THRESHOLD": env_float("RECO_QUALITY_THRESHOLD", 90.0, minimum=0.0),
    # Data older than this (hours) counts as stale in the freshness check.
    "FRESHNESS_MAX_AGE_HOURS": env_float("RECO_FRESHNESS_MAX_AGE_HOURS", 48.0, minimum=0.0),
    # How long an extraction lock is held before another run may take it over (seconds).
    "EXTRACT_LOCK_TTL_SECONDS": env_int("RECO_EXTRACT_LOCK_TTL_SECONDS", 3600, minimum=1),
    # Rows fetched per round trip during extraction.
    "EXTRACT_BATCH_ROWS": env_int("RECO_EXTRACT_BATCH_ROWS", 50_000, minimum=1),
    # Training options (apps.pipeline.train.trainer.TrainConfig fields).
    "TRAIN_OPTIONS": {"max_users": env_int("RECO_TRAIN_MAX_USERS", 4000, minimum=10)},
    # Online evaluation: how long after an exposure a view/order is credited to it (last
    # touch), and the longest window compared on each side of a promotion.
    "ONLINE_ATTRIBUTION_HOURS": env_float("RECO_ONLINE_ATTRIBUTION_HOURS", 24.0, minimum=0.01),
    "ONLINE_PROMOTION_WINDOW_DAYS": env_float(
        "RECO_ONLINE_PROMOTION_WINDOW_DAYS", 7.0, minimum=0.01
    ),
    # The evaluate stage (stratified protocol): inner folds whose examples train its ranker.
    "EVALUATE_RANKER_FOLDS": env_int("RECO_EVALUATE_RANKER_FOLDS", 1, minimum=1),
    # The first model of an empty registry is promoted (through every gate) after training.
    "AUTO_PROMOTE_FIRST": env_bool("RECO_AUTO_PROMOTE_FIRST", default=True),
    # Promotion gates (apps/models/gates.py): the smoke test loads bundles with this function
    # (LightGBM on one thread, rows prepared outside the timed call, as serving scores).
    "BUNDLE_LOADER": "apps.models.gates.load_ranker_scorer",
    "SMOKE_P95_MS": env_float("RECO_SMOKE_P95_MS", 100.0, minimum=0.1),
    # ... and refuses a candidate whose p95 CPU time per request is more than this many times
    # the primary's on the same requests, both timed in the same gate run (0: no comparison);
    # identical bundles measured 0.92-1.10x here with both cores busy. Candidates at or under
    # the floor are not judged by the ratio.
    "GATE_MAX_LATENCY_RATIO": env_float("RECO_GATE_MAX_LATENCY_RATIO", 2.0, minimum=0.0),
    "GATE_LATENCY_SAMPLES": env_int("RECO_GATE_LATENCY_SAMPLES", 200, minimum=1),
    "GATE_LATENCY_FLOOR_MS": env_float("RECO_GATE_LATENCY_FLOOR_MS", 0.25, minimum=0.0),
    # Exposure log (JSON lines, size-rotated); feedback.jsonl and audit.jsonl sit beside it.
    "EXPOSURE_LOG": env_str("RECO_EXPOSURE_LOG", str(DATA_DIR / "exposures" / "exposures.jsonl")),
    # Serving: the whole request's engine budget, the Redis socket timeouts, how often a worker
    # polls the registry, whether it also listens for change messages on Redis, and the share
    # of requests the shadow model scores in the background.
    "SERVING_BUDGET_MS": env_float("RECO_SERVING_BUDGET_MS", 150.0, minimum=1.0),
    "SERVING_REDIS_TIMEOUT_MS": env_int("RECO_SERVING_REDIS_TIMEOUT_MS", 50, minimum=1),
    "SERVING_POLL_SECONDS": env_float("RECO_SERVING_POLL_SECONDS", 5.0, minimum=0.1),
    "SERVING_PUBSUB": env_bool("RECO_SERVING_PUBSUB", default=True),
    # Per-process circuit breakers in front of Redis and of each bundle's local store: open
    # after this many consecutive timeouts/connection errors, probe again after the reset time.
    # A sync worker stalls for failures x the Redis timeout while its breaker opens (3 x 50 ms:
    # p99 stays under 200 ms when Redis hangs; with 5 it reached 150-185 ms).
    "SERVING_BREAKER_FAILURES": env_int("RECO_SERVING_BREAKER_FAILURES", 3, minimum=1),
    "SERVING_BREAKER_RESET_SECONDS": env_float(
        "RECO_SERVING_BREAKER_RESET_SECONDS", 2.0, minimum=0.01
    ),
    # Overload shedding (apps/serving/shedding.py), first in MIDDLEWARE: once every request
    # for SHED_QUEUE_INTERVAL_MS waited longer than SHED_QUEUE_TARGET_MS for a worker (a
    # standing queue, not a burst), refuse those that did with 503 + Retry-After until the
    # queue is gone (target 0: off); SHED_MAX_IN_FLIGHT caps concurrent requests in a
    # threaded worker (0: off). Accepted requests then wait about the target under overload.
    # The interval must outlast a breaker opening (3 x 50 ms of Redis timeouts) and the
    # slowdowns the soak at half the capacity shows every 10-30 s (both workers ~3x slower
    # for 200-400 ms, the waits growing to 20-120 ms; a 200 ms interval shed 427 of 150,000
    # requests in one soak, benchmarks/reliability_soak.py): bursts to serve, not an overload
    # to shed. Target 1 ms: a request here takes ~2 ms of a
    # worker, and the accepted requests' p99 under a 2x overload must stay within twice the
    # normal p99 (5 ms kept it ~3x; benchmarks/reliability_overload.py).
    "SHED_ENABLED": env_bool("RECO_SHED_ENABLED", default=True),
    "SHED_QUEUE_TARGET_MS": env_float("RECO_SHED_QUEUE_TARGET_MS", 1.0, minimum=0.0),
    "SHED_QUEUE_INTERVAL_MS": env_float("RECO_SHED_QUEUE_INTERVAL_MS", 500.0, minimum=1.0),
    # ... and only when at least this many late requests reached the process in that run: a
    # worker that saw a handful in an interval was idle, its requests late for want of CPU.
    "SHED_QUEUE_MIN_LATE": env_int("RECO_SHED_QUEUE_MIN_LATE", 20, minimum=1),
    "SHED_MAX_IN_FLIGHT": env_int("RECO_SHED_MAX_IN_FLIGHT", 0, minimum=0),
    "SHED_RETRY_AFTER_SECONDS": env_int("RECO_SHED_RETRY_AFTER_SECONDS", 1, minimum=1),
    "SHADOW_SAMPLE": env_float("RECO_SHADOW_SAMPLE", 0.2, minimum=0.0),
    # Admin API tokens (DRF authtoken) are refused once older than this; re-issue with
    # `manage.py drf_create_token -r USER`. Deleting a token revokes it.
    "API_TOKEN_MAX_AGE_DAYS": env_float("RECO_API_TOKEN_MAX_AGE_DAYS", 30.0, minimum=0.0),
    # /metrics answers clients in these networks, or any client with the bearer token
    # (recoplatform/metrics.py). Default: loopback and private ranges (the scraper's network).
    "METRICS_ALLOWED_NETWORKS": _networks("RECO_METRICS_ALLOWED_NETWORKS", _PRIVATE_NETWORKS),
    "METRICS_TOKEN": env_str("RECO_METRICS_TOKEN", ""),
}

# --- Internationalisation, static files ------------------------------------------------------
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "static"

# --- Security: HTTPS, request size, API limits, cache --------------------------------------
# With DJANGO_DEBUG off every HTTPS protection is on unless a variable turns it off
# (`manage.py check --deploy --fail-level WARNING` passes; tests/reliability/test_deploy_checks.py).
_PRODUCTION = not DEBUG
SECURE_SSL_REDIRECT = env_bool("DJANGO_SECURE_SSL_REDIRECT", default=_PRODUCTION)
# Probes and the Prometheus scraper speak plain HTTP inside the private network.
SECURE_REDIRECT_EXEMPT = [r"^health$", r"^ready$", r"^metrics$"]
SESSION_COOKIE_SECURE = env_bool("DJANGO_SESSION_COOKIE_SECURE", default=_PRODUCTION)
CSRF_COOKIE_SECURE = env_bool("DJANGO_CSRF_COOKIE_SECURE", default=_PRODUCTION)
SECURE_HSTS_SECONDS = env_int(
    "DJANGO_SECURE_HSTS_SECONDS", 31_536_000 if _PRODUCTION else 0, minimum=0
)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool(
    "DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS", default=_PRODUCTION
)
SECURE_HSTS_PRELOAD = env_bool("DJANGO_SECURE_HSTS_PRELOAD", default=False)
if not SECURE_HSTS_PRELOAD:
    # Preloading commits the whole registrable domain to HTTPS in browsers for a long time;
    # only the domain's owner can decide that, so it is opt-in and its warning silenced.
    SILENCED_SYSTEM_CHECKS = ["security.W021"]
# Behind a TLS-terminating proxy that sets X-Forwarded-Proto (and strips it from clients).
if env_bool("DJANGO_SECURE_PROXY_SSL_HEADER", default=False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
# A larger request body is refused: a JSON 413 on the API (apps/serving/errors.py).
DATA_UPLOAD_MAX_MEMORY_SIZE = env_int("DJANGO_DATA_UPLOAD_MAX_MEMORY_SIZE", 2_621_440, minimum=1024)
_ADMIN_THROTTLE_RATE = env_str("RECO_ADMIN_THROTTLE_RATE", "30/minute")
if not re.fullmatch(r"[1-9][0-9]*/(s|sec|second|m|min|minute|h|hour|d|day)", _ADMIN_THROTTLE_RATE):
    raise ImproperlyConfigured(
        f"RECO_ADMIN_THROTTLE_RATE={_ADMIN_THROTTLE_RATE!r} is not a rate like 30/minute"
    )

REST_FRAMEWORK = {
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    # Django's request-size and field-count refusals as JSON 413/400 (they were HTML 400s).
    "EXCEPTION_HANDLER": "apps.serving.errors.exception_handler",
    # The admin endpoints' throttle (apps.serving.auth.AdminRateThrottle), per client address.
    "DEFAULT_THROTTLE_RATES": {"admin": _ADMIN_THROTTLE_RATE},
    # Trusted proxies in front of the server: the client address is taken from
    # X-Forwarded-For only that many hops back. 0 (default): REMOTE_ADDR, so a client cannot
    # choose its throttle key or audit address by sending the header. DRF's own default
    # (None) would trust the header.
    "NUM_PROXIES": env_int("DJANGO_NUM_PROXIES", 0, minimum=0),
}

# The cache holds the admin throttle's counters. With Redis, every worker and host shares
# them (a per-process cache would multiply the limit by the number of workers); short
# timeouts and no retries, as on the serving path; if Redis does not answer the throttle
# lets requests through (apps.serving.auth). Without Redis (one laptop): per-process memory.
if REDIS_URL:
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": "reco-cache",
            "OPTIONS": {
                "socket_timeout": 0.1,
                "socket_connect_timeout": 0.1,
                "retry": Retry(NoBackoff(), 0),
            },
        }
    }
else:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
            "LOCATION": "recoplatform",
        }
    }

SPECTACULAR_SETTINGS = {
    "TITLE": "recoplatform API",
    "DESCRIPTION": "Recommendations, feedback, assignments and serving administration.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    # Offline: Swagger UI from drf-spectacular-sidecar's bundled files, not a CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO").upper()},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}
