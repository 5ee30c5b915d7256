"""YAML import/export of experiments (config/experiments.yaml).

Format::

    experiments:
      - name: home-weights          # slug, unique; the identity used by import
        scene: for_you              # for_you | similar | detail | popular
        status: running             # draft | running | paused | stopped
        salt: home-weights          # optional; defaults to the name
        description: ...            # optional
        starts_at: 2025-01-01T00:00:00Z   # optional, with a timezone
        ends_at: null                     # optional
        variants:                   # the complete list: variants not listed are deleted
          - name: control
            allocation: 5000        # basis points: 10000 = 100%
            params: {}
          - name: more-ease
            allocation: 5000
            params: {channel_weights: {ease: 2.0}}

An optional key left out keeps the stored value (or the default, for a new experiment); a key
given as null sets null. Experiments in the database but not in the file are left alone.

``parse_experiments_yaml`` checks everything that needs no database and raises one
``ExperimentsFileError`` listing every problem; ``services.experiments_import`` checks the rest
(status changes, one running experiment per scene) and writes.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import yaml

from apps.experiments.bucketing import BUCKETS
from apps.experiments.choices import ExperimentStatus, Scene
from apps.experiments.models import Experiment
from apps.experiments.params import ParamsError, clean_params

HEADER = (
    "# Experiments: imported with `manage.py experiments_import`, exported with\n"
    "# `manage.py experiments_export` (format: apps/experiments/yaml_io.py).\n"
    "# allocation is in basis points: 10000 = 100% of units.\n"
)
SLUG = re.compile(r"^[-a-zA-Z0-9_]+$")
MAX_NAME = 64
EXPERIMENT_KEYS = (
    "name",
    "scene",
    "status",
    "salt",
    "description",
    "starts_at",
    "ends_at",
    "variants",
)
VARIANT_KEYS = ("name", "allocation", "params")


class _Missing(enum.Enum):
    MISSING = "missing"


MISSING = _Missing.MISSING
Missing = Literal[_Missing.MISSING]


class ExperimentsFileError(ValueError):
    """The file (or the import it asks for) is invalid; ``problems`` lists every problem, each
    naming the experiment, the variant and the field."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class VariantSpec:
    """A variant as the file declares it (params already canonical)."""

    name: str
    allocation: int
    params: dict[str, Any]


@dataclass(frozen=True)
class ExperimentSpec:
    """An experiment as the file declares it; ``MISSING`` fields keep the stored value."""

    name: str
    scene: str
    status: str | Missing = MISSING
    salt: str | Missing = MISSING
    description: str | Missing = MISSING
    starts_at: datetime | Missing | None = MISSING
    ends_at: datetime | Missing | None = MISSING
    variants: tuple[VariantSpec, ...] | Missing = MISSING


def _slug_problem(value: Any) -> str | None:
    if not isinstance(value, str) or not SLUG.match(value):
        return f"must be a slug (letters, digits, - and _), not {value!r}"
    if len(value) > MAX_NAME:
        return f"at most {MAX_NAME} characters"
    return None


def _datetime(value: Any, where: str, problems: list[str]) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            problems.append(f"{where}: not an ISO 8601 date and time: {value!r}")
            return None
    if not isinstance(value, datetime):
        problems.append(f"{where}: must be a date and time, not {value!r}")
        return None
    if value.tzinfo is None or value.utcoffset() is None:
        problems.append(f"{where}: needs a timezone, e.g. 2025-01-01T00:00:00Z")
        return None
    return value


def _variants(raw: Any, where: str, problems: list[str]) -> tuple[VariantSpec, ...]:
    if not isinstance(raw, list):
        problems.append(f"{where}, field variants: must be a list")
        return ()
    specs: list[VariantSpec] = []
    seen: set[str] = set()
    for index, item in enumerate(raw):
        if not isinstance(item, Mapping):
            problems.append(f"{where}, variants[{index}]: must be a mapping")
            continue
        name = item.get("name")
        here = (
            f"{where}, variant {name!r}" if isinstance(name, str) else f"{where}, variants[{index}]"
        )
        before = len(problems)
        problems.extend(
            f"{here}, field {key}: unknown field (allowed: {', '.join(VARIANT_KEYS)})"
            for key in item
            if key not in VARIANT_KEYS
        )
        if (problem := _slug_problem(name)) is not None:
            problems.append(f"{here}, field name: {problem}")
        elif name in seen:
            problems.append(f"{here}, field name: duplicate variant name")
        seen.add(str(name))
        allocation = item.get("allocation")
        if (
            isinstance(allocation, bool)
            or not isinstance(allocation, int)
            or not 0 <= allocation <= BUCKETS
        ):
            problems.append(
                f"{here}, field allocation: must be an integer number of basis points "
                f"from 0 to {BUCKETS}, not {allocation!r}"
            )
        try:
            params = clean_params(item.get("params"))
        except ParamsError as exc:
            problems.extend(f"{here}, field {p}" for p in exc.problems)
            params = {}
        if len(problems) == before:
            specs.append(VariantSpec(name=name, allocation=allocation, params=params))
    # Counted over every variant, also those with other problems, so the sum is reported too.
    allocations = [item.get("allocation") for item in raw if isinstance(item, Mapping)]
    total = sum(a for a in allocations if isinstance(a, int) and not isinstance(a, bool))
    if total > BUCKETS:
        problems.append(
            f"{where}, field variants: allocations sum to {total} basis points "
            f"({total / 100:g}%), more than {BUCKETS} (100%)"
        )
    return tuple(specs)


def _experiment(
    item: Any, index: int, seen: set[str], problems: list[str]
) -> ExperimentSpec | None:
    if not isinstance(item, Mapping):
        problems.append(f"experiments[{index}]: must be a mapping")
        return None
    name = item.get("name")
    where = f"experiment {name!r}" if isinstance(name, str) else f"experiments[{index}]"
    before = len(problems)
    problems.extend(
        f"{where}, field {key}: unknown field (allowed: {', '.join(EXPERIMENT_KEYS)})"
        for key in item
        if key not in EXPERIMENT_KEYS
    )
    if (problem := _slug_problem(name)) is not None:
        problems.append(f"{where}, field name: {problem}")
    elif name in seen:
        problems.append(f"{where}, field name: duplicate experiment name")
    seen.add(str(name))
    scene = item.get("scene")
    if scene not in Scene.values:
        problems.append(
            f"{where}, field scene: must be one of {', '.join(Scene.values)}, not {scene!r}"
        )
    fields: dict[str, Any] = {}
    if "status" in item:
        if item["status"] not in ExperimentStatus.values:
            problems.append(
                f"{where}, field status: must be one of {', '.join(ExperimentStatus.values)}, "
                f"not {item['status']!r}"
            )
        fields["status"] = item["status"]
    if "salt" in item:
        salt = item["salt"]
        if not isinstance(salt, str) or not salt.strip() or len(salt) > MAX_NAME:
            problems.append(
                f"{where}, field salt: must be a non-empty string of at most {MAX_NAME} characters"
            )
        fields["salt"] = salt
    if "description" in item:
        description = item["description"]
        if description is not None and not isinstance(description, str):
            problems.append(f"{where}, field description: must be text")
        fields["description"] = description or ""
    for key in ("starts_at", "ends_at"):
        if key in item:
            fields[key] = _datetime(item[key], f"{where}, field {key}", problems)
    starts, ends = fields.get("starts_at"), fields.get("ends_at")
    if isinstance(starts, datetime) and isinstance(ends, datetime) and ends <= starts:
        problems.append(f"{where}, field ends_at: must be after starts_at")
    if "variants" in item:
        fields["variants"] = _variants(item["variants"], where, problems)
    if len(problems) > before:
        return None
    return ExperimentSpec(name=name, scene=scene, **fields)


def parse_experiments_data(data: Any) -> list[ExperimentSpec]:
    """Validate an already-loaded experiments document (``{"experiments": [...]}``); raise
    ``ExperimentsFileError`` with every problem."""
    if data is None:
        return []
    if not isinstance(data, Mapping) or not isinstance(data.get("experiments", []), list):
        raise ExperimentsFileError(['the file must be a mapping with an "experiments" list'])
    problems = [f"unknown top-level key {key!r}" for key in data if key != "experiments"]
    seen: set[str] = set()
    items = data.get("experiments") or []
    specs = [_experiment(item, i, seen, problems) for i, item in enumerate(items)]
    if problems:
        raise ExperimentsFileError(problems)
    return [s for s in specs if s is not None]


def parse_experiments_yaml(text: str) -> list[ExperimentSpec]:
    """Parse and validate an experiments file; raise ``ExperimentsFileError`` with every problem."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ExperimentsFileError([f"not valid YAML: {exc}"]) from exc
    return parse_experiments_data(data)


def experiment_to_data(experiment: Experiment) -> dict[str, Any]:
    """One experiment (with prefetched variants) as the file writes it."""
    data: dict[str, Any] = {
        "name": experiment.name,
        "scene": experiment.scene,
        "status": experiment.status,
        "salt": experiment.salt,
        "description": experiment.description,
    }
    if experiment.starts_at is not None:
        data["starts_at"] = experiment.starts_at.isoformat()
    if experiment.ends_at is not None:
        data["ends_at"] = experiment.ends_at.isoformat()
    data["variants"] = [
        {"name": v.name, "allocation": v.allocation, "params": v.params}
        for v in experiment.variants.all()
    ]
    return data


def dump_experiments_yaml(experiments: Iterable[Experiment]) -> str:
    """The experiments (with prefetched variants, see ``selectors.experiments_with_variants``)
    as an experiments file that imports back to the same state."""
    data = {"experiments": [experiment_to_data(e) for e in experiments]}
    return HEADER + yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)
