from django.apps import AppConfig


class ExperimentsConfig(AppConfig):
    """Experiments, variants and stable bucketing."""

    name = "apps.experiments"
    label = "experiments"
    verbose_name = "Experiments"
