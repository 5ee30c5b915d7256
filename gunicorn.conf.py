"""Production WSGI server settings (`make serve`).

Sync workers, one per core: on this 2-core class of machine more threads or workers than cores
made p99 worse (../shared/PERFORMANCE.md). Models load lazily in each worker after the fork
(the serving state is per process), never in the master.
"""

import multiprocessing
import os

bind = os.environ.get("RECO_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("RECO_WORKERS", multiprocessing.cpu_count()))
worker_class = "sync"
# Keep-alive lets a load balancer (or the load generator) reuse connections.
keepalive = 5
timeout = 30
graceful_timeout = 10
preload_app = False
accesslog = os.environ.get("RECO_ACCESS_LOG") or None
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()


def on_starting(server):
    """Start every server with an empty Prometheus multiprocess directory: files of a previous
    run's workers would otherwise be summed into this run's counters."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        import pathlib

        path = pathlib.Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):
            stale.unlink()


def post_worker_init(worker):
    """Import the whole application now, then take everything loaded so far out of the
    garbage collector's reach.

    A full (generation 2) collection walks every tracked object: with Django, DRF, pandas
    and the scorers imported that is ~230,000 objects and ~100 ms, and it ran every ~20 s
    under load, a 100-200 ms stall of the worker (benchmarks/reliability_overload.py). After
    `gc.freeze()` the collector only walks what was allocated later (a loaded bundle adds
    ~2,000 objects: 0.2 ms). The URLconf is imported here instead of on the first request so
    that the view modules are frozen too.
    """
    import gc

    from django.urls import get_resolver

    get_resolver().url_patterns  # noqa: B018 - the attribute access imports every view module
    # Overload shedding reads each request's queueing delay from the kernel's receive
    # timestamp (microseconds) instead of TCP_INFO's 4 ms steps (apps/serving/shedding.py).
    from apps.serving.shedding import install_arrival_timestamps

    install_arrival_timestamps(worker)
    gc.collect()
    gc.freeze()


def child_exit(server, worker):
    """Drop a dead worker's Prometheus multiprocess files so its gauges do not linger."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
