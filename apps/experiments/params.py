"""Validation of variant parameters (pure: no Django).

A variant overrides some serving parameters; a key it leaves out keeps the serving default::

    {
        "channel_weights": {"ease": 2.0, "popular": 0.5},  # channel -> weight >= 0
        "ranker": false,                                    # false: keep the recall order
        "model_version": "v20250101-1",                     # serve this registered version
        "diversity": {"method": "mmr", "lambda": 0.7},      # or category_cap, or null = off
    }

``clean_params`` returns the canonical JSON that is stored (so an unchanged YAML import is a
no-op) or raises ``ParamsError`` listing every problem with its path.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

# The recall channels of apps/pipeline/train/trainer.py DEFAULT_CHANNELS (a test keeps the two
# equal); copied so this module stays importable without the training stack.
CHANNELS: tuple[str, ...] = (
    "itemcf",
    "usercf",
    "ease",
    "content",
    "tag",
    "category",
    "price_band",
    "popular",
    "trending",
    "vector",
    "semantic",
)
PARAM_KEYS: tuple[str, ...] = ("channel_weights", "ranker", "model_version", "diversity")
MMR = "mmr"
CATEGORY_CAP = "category_cap"
NO_DIVERSITY = "none"
MAX_MODEL_VERSION_LENGTH = 64  # registry.ModelVersion.version


class ParamsError(ValueError):
    """Variant parameters are invalid; ``problems`` names each field and what is wrong."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


@dataclass(frozen=True)
class Diversity:
    """A diversity re-ranking: ``mmr`` (with ``lambda_``), ``category_cap`` (with
    ``max_per_category``), or ``none`` (explicitly off)."""

    method: str
    lambda_: float | None = None
    max_per_category: int | None = None


@dataclass(frozen=True)
class VariantParams:
    """A variant's overrides; ``None`` means "serving default" for every field."""

    channel_weights: Mapping[str, float] | None = None
    ranker: bool | None = None
    model_version: str | None = None
    diversity: Diversity | None = None


def _unknown(kind: str, value: str, allowed: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(value, allowed, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown {kind} {value!r} (allowed: {', '.join(allowed)}){hint}"


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float)


def _clean_weights(raw: Any, problems: list[str]) -> dict[str, float]:
    if not isinstance(raw, Mapping):
        problems.append("params.channel_weights: must be a mapping of channel to weight")
        return {}
    weights: dict[str, float] = {}
    for channel, weight in raw.items():
        path = f"params.channel_weights.{channel}"
        if channel not in CHANNELS:
            problems.append(f"{path}: {_unknown('channel', str(channel), CHANNELS)}")
        elif not _is_number(weight) or not math.isfinite(weight):
            problems.append(f"{path}: must be a number, not {weight!r}")
        elif weight < 0:
            problems.append(f"{path}: must be >= 0, not {weight}")
        else:
            weights[channel] = float(weight)
    return dict(sorted(weights.items()))


def _clean_diversity(raw: Any, problems: list[str]) -> dict[str, Any] | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        problems.append('params.diversity: must be null or a mapping with a "method"')
        return None
    method = raw.get("method")
    expected = {MMR: ("method", "lambda"), CATEGORY_CAP: ("method", "max_per_category")}
    if method not in expected:
        problems.append(
            f"params.diversity.method: {_unknown('method', str(method), (MMR, CATEGORY_CAP))}"
        )
        return None
    for key in raw:
        if key not in expected[method]:
            problems.append(
                f"params.diversity.{key}: {_unknown(f'{method} key', str(key), expected[method])}"
            )
    if method == MMR:
        value = raw.get("lambda")
        if not _is_number(value) or not 0.0 <= value <= 1.0:
            problems.append(f"params.diversity.lambda: must be a number from 0 to 1, not {value!r}")
            return None
        return {"method": MMR, "lambda": float(value)}
    value = raw.get("max_per_category")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        problems.append(
            f"params.diversity.max_per_category: must be an integer >= 1, not {value!r}"
        )
        return None
    return {"method": CATEGORY_CAP, "max_per_category": value}


def clean_params(raw: Any) -> dict[str, Any]:
    """Validate variant parameters and return their canonical form; raise ``ParamsError``.

    Canonical: keys in ``PARAM_KEYS`` order, weights sorted by channel and as floats, a null
    ``ranker`` or ``model_version`` dropped (same as absent). A null ``diversity`` is kept: it
    turns diversity off, where an absent one keeps the serving default.
    """
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ParamsError([f"params: must be a mapping, not {type(raw).__name__}"])
    problems: list[str] = [
        f"params: {_unknown('key', str(key), PARAM_KEYS)}" for key in raw if key not in PARAM_KEYS
    ]
    clean: dict[str, Any] = {}
    if "channel_weights" in raw:
        clean["channel_weights"] = _clean_weights(raw["channel_weights"], problems)
    ranker = raw.get("ranker")
    if ranker is not None:
        if isinstance(ranker, bool):
            clean["ranker"] = ranker
        else:
            problems.append(f"params.ranker: must be true (on) or false (off), not {ranker!r}")
    version = raw.get("model_version")
    if version is not None:
        if not isinstance(version, str) or not version.strip():
            problems.append(f"params.model_version: must be a version string, not {version!r}")
        elif len(version.strip()) > MAX_MODEL_VERSION_LENGTH:
            problems.append(f"params.model_version: at most {MAX_MODEL_VERSION_LENGTH} characters")
        else:
            clean["model_version"] = version.strip()
    if "diversity" in raw:
        clean["diversity"] = _clean_diversity(raw["diversity"], problems)
    if problems:
        raise ParamsError(problems)
    return clean


def parse_params(raw: Any) -> VariantParams:
    """Validate variant parameters (as ``clean_params``) into an immutable ``VariantParams``."""
    clean = clean_params(raw)
    weights = clean.get("channel_weights")
    diversity: Diversity | None = None
    if "diversity" in clean:
        spec = clean["diversity"]
        if spec is None:
            diversity = Diversity(method=NO_DIVERSITY)
        elif spec["method"] == MMR:
            diversity = Diversity(method=MMR, lambda_=spec["lambda"])
        else:
            diversity = Diversity(method=CATEGORY_CAP, max_per_category=spec["max_per_category"])
    return VariantParams(
        channel_weights=MappingProxyType(dict(weights)) if weights is not None else None,
        ranker=clean.get("ranker"),
        model_version=clean.get("model_version"),
        diversity=diversity,
    )
