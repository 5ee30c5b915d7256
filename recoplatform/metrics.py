"""The /metrics endpoint, correct under a multi-process server, and not public.

django-prometheus's own view builds a fresh registry in multi-process mode and so drops every
custom collector; this view adds the platform's collectors (which read the database at
scrape time) to the aggregated per-process metrics.

Metrics reveal traffic, model versions and pipeline state, so the endpoint answers only a
client whose address is in RECO["METRICS_ALLOWED_NETWORKS"] (default: loopback and private
ranges, where the scraper sits) or that sends `Authorization: Bearer <RECO["METRICS_TOKEN"]>`;
anyone else gets a 403. The address is the one the admin API throttle and audit use
(REMOTE_ADDR, or X-Forwarded-For behind REST_FRAMEWORK["NUM_PROXIES"] trusted proxies). Behind
a reverse proxy on the same host every client looks local: keep /metrics off the proxy, or set
DJANGO_NUM_PROXIES, or an empty network list and a token.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from functools import lru_cache

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.views.decorators.http import require_GET
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    generate_latest,
    multiprocess,
)

from apps.pipeline.metrics import PipelineCollector
from apps.serving.auth import client_address

DEFAULT_ALLOWED_NETWORKS = (
    "127.0.0.0/8",
    "::1/128",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "fc00::/7",
)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@lru_cache(maxsize=8)
def _parse_networks(networks: tuple[str, ...]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(n, strict=False) for n in networks)


def _option(key: str, default: object) -> object:
    return getattr(settings, "RECO", {}).get(key, default)


def address_allowed(address: str | None, networks: tuple[str, ...]) -> bool:
    """True when `address` is an IP address inside one of `networks`."""
    if not address:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == net.version and ip in net for net in _parse_networks(networks))


def token_matches(request: HttpRequest, token: str) -> bool:
    """True when a token is configured and the request carries it as a bearer token."""
    if not token:
        return False
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip(), token)


def metrics_allowed(request: HttpRequest) -> bool:
    """Whether this request may read /metrics (see the module docstring)."""
    networks = tuple(_option("METRICS_ALLOWED_NETWORKS", DEFAULT_ALLOWED_NETWORKS))  # type: ignore[arg-type]
    token = str(_option("METRICS_TOKEN", "") or "")
    return address_allowed(client_address(request), networks) or token_matches(request, token)


@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus text exposition of every metric of this deployment."""
    if not metrics_allowed(request):
        return HttpResponse(
            "Forbidden: /metrics is for the internal network or a bearer token.\n",
            status=403,
            content_type="text/plain; charset=utf-8",
        )
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        registry.register(PipelineCollector())
    else:
        registry = REGISTRY  # PipelineCollector is registered on it at start-up
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
