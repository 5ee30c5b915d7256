"""Recommendation API routes, mounted under /api/v1/.

Ids in the path are matched as strings so that a malformed id reaches the input serializer and
gets the API's 400 JSON, not Django's HTML 404.
"""

from django.urls import path

from apps.serving import admin_api, api

app_name = "serving"

urlpatterns = [
    path("recommendations/for-you", api.ForYouView.as_view(), name="for-you"),
    path("items/<str:item_id>/similar", api.SimilarView.as_view(), name="similar"),
    path("items/<str:item_id>/for-user", api.DetailView.as_view(), name="detail"),
    path("popular", api.PopularView.as_view(), name="popular"),
    path("feedback", api.FeedbackView.as_view(), name="feedback"),
    path("users/<str:user_id>/assignment", api.AssignmentView.as_view(), name="assignment"),
    path("admin/reload", api.ReloadView.as_view(), name="admin-reload"),
    path(
        "admin/models/<str:version>/promote",
        admin_api.PromoteView.as_view(),
        name="admin-promote",
    ),
    path("admin/models/rollback", admin_api.RollbackView.as_view(), name="admin-rollback"),
    path("admin/pipeline/retrain", admin_api.RetrainView.as_view(), name="admin-retrain"),
]
