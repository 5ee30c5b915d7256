"""MLflow tracking of training runs (glue: reads the tracking URI from settings)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from django.conf import settings

logger = logging.getLogger(__name__)

EXPERIMENT = "recoplatform"


def log_training_run(
    *,
    version: str,
    params: Mapping[str, Any],
    metrics: Mapping[str, float],
    bundle_dir: Path,
    tags: Mapping[str, str] | None = None,
) -> str:
    """Log params, metrics and the bundle directory to MLflow; return the run id.

    Raises whatever MLflow raises: the caller decides whether a tracking outage fails training.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(settings.MLFLOW_TRACKING_URI)
    client = MlflowClient()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    experiment_id = (
        experiment.experiment_id
        if experiment is not None
        else client.create_experiment(EXPERIMENT, artifact_location=settings.MLFLOW_ARTIFACT_ROOT)
    )
    with mlflow.start_run(
        experiment_id=experiment_id, run_name=version, tags=dict(tags or {})
    ) as run:
        mlflow.log_params({k: (str(v)[:500]) for k, v in params.items()})
        mlflow.log_metrics({_metric_key(k): float(v) for k, v in metrics.items() if v == v})
        mlflow.log_artifacts(str(bundle_dir), artifact_path="bundle")
    return run.info.run_id


def _metric_key(name: str) -> str:
    # MLflow metric names allow letters, digits, _ - . / and spaces; "@" is not one of them.
    return name.replace("@", "_at_")
