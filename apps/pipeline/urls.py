"""Pipeline pages: the HTML quality report (staff only)."""

from django.urls import path

from apps.pipeline import views

app_name = "pipeline"

urlpatterns = [
    path("reports/quality/<int:pk>/", views.quality_report_html, name="quality-report"),
    path("reports/quality/<int:pk>.json", views.quality_report_json, name="quality-report-json"),
    path("reports/features/", views.feature_catalogue, name="feature-catalogue"),
]
