"""Root URL configuration."""

from django.contrib import admin
from django.urls import include, path

from apps.serving import views as serving_views

urlpatterns = [
    path("health", serving_views.health, name="health"),
    path("ready", serving_views.ready, name="ready"),
    path("admin/", admin.site.urls),
    path("api/v1/", include("apps.serving.urls")),
    path("", include("apps.pipeline.urls")),
    path("", include("django_prometheus.urls")),
]
