from django.apps import AppConfig


class ServingConfig(AppConfig):
    """Online serving: the DRF API and its pure engine."""

    name = "apps.serving"
    label = "serving"
    verbose_name = "Serving"
