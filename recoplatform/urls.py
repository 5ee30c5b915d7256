"""Root URL configuration."""

from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from apps.serving import views as serving_views
from apps.serving.baseline import BaselineView
from recoplatform.dashboard import dashboard_view
from recoplatform.metrics import metrics

urlpatterns = [
    path("health", serving_views.health, name="health"),
    path("ready", serving_views.ready, name="ready"),
    # Before admin/ so the admin's catch-all does not answer it; staff only via admin_view.
    path("admin/dashboard/", admin.site.admin_view(dashboard_view), name="admin-dashboard"),
    path("admin/", admin.site.urls),
    # Benchmark baseline (benchmarks/serving_load.py); hidden from the API schema.
    path("api/v1/_baseline", BaselineView.as_view(), name="baseline"),
    path("api/v1/", include("apps.serving.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="docs"),
    path("", include("apps.pipeline.urls")),
    path("metrics", metrics, name="prometheus-django-metrics"),
]

# JSON 404s under /api/ (apps/serving/errors.py), Django's page elsewhere.
handler404 = "apps.serving.errors.not_found"
