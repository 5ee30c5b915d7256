from django.apps import AppConfig


class PipelineConfig(AppConfig):
    """Offline pipeline: extraction, cleaning, data quality, runs and watermarks."""

    name = "apps.pipeline"
    label = "pipeline"
    verbose_name = "Pipeline"

    def ready(self) -> None:
        from apps.pipeline.metrics import register_collector

        register_collector()
