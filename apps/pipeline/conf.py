"""One accessor for the platform's options (``settings.RECO``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.conf import settings


def reco(key: str) -> Any:
    """Return ``settings.RECO[key]``; a missing key is a programming error, not a default."""
    return settings.RECO[key]


def data_path(*parts: str) -> Path:
    """A path under DATA_DIR, with its parent directory created."""
    path = Path(settings.DATA_DIR).joinpath(*parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
