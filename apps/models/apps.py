from django.apps import AppConfig


class RegistryConfig(AppConfig):
    """Model registry. The label is ``registry`` so references read ``registry.ModelVersion``."""

    name = "apps.models"
    label = "registry"
    verbose_name = "Model registry"
