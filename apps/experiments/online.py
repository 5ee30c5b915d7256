"""Online evaluation and serving health from the serving logs (pure core: no Django).

Serving writes JSON lines (``apps.serving.exposure``), rotated by size: ``exposures.jsonl``
then ``exposures.jsonl.1`` (newer) ... ``exposures.jsonl.5`` (oldest), and ``feedback.jsonl``
beside it. The records this module reads:

- exposure (one per recommendation response): ``ts`` (ISO 8601, UTC), ``request_id``,
  ``user_id``, ``visitor_id``, ``scene``, ``variant`` (``"<experiment>:<variant>"`` or
  ``"default"``), ``model_version``, ``degraded``, ``degrade_reason``, ``source``,
  ``latency_ms``, ``items`` (``item_id``, ``position`` (1-based), ``channel``, ``price``: the
  catalogue price when served, null when unknown).
- feedback (``POST /api/v1/feedback``): ``ts``, ``request_id``, ``event`` (``exposure``,
  ``click``, ``add_to_cart``, ``purchase``), ``item_id``, optional ``value`` (purchase value).

Definitions (every count is per group: a variant label, or a model version):

- *request*: one exposure record; *impression* (an "exposure" in the rates below): one item
  shown in one request, i.e. one ``(request_id, item_id)``.
- Feedback joins an impression by ``request_id`` *and* ``item_id``. Repeated events of one
  kind on one impression count once (a double click is one click), so every rate is a share
  of impressions and lies in [0, 1]. Feedback whose request has no exposure in the window is
  ``unmatched``; feedback on an item the request did not show is ``not_shown``. If a client
  reuses a request id, its feedback joins the first exposure read with that id.
- ``ctr`` = clicked impressions / impressions; ``request_ctr`` = requests with at least one
  click / requests; ``add_to_cart_rate`` = impressions added to a cart / impressions.
- ``cvr_click`` = impressions both clicked and purchased / clicked impressions (conversion
  after a click); ``cvr_exposure`` = purchased impressions / impressions (a purchase without a
  recorded click counts here, not in ``cvr_click``).
- ``gmv_per_exposure`` = purchase value / impressions. An impression's value is the largest
  ``value`` among its purchase events (a client retrying a post repeats the value); without
  one, the item's ``price`` recorded in the exposure, else its price from ``prices`` (the
  catalogue); without either, 0, and the purchase is counted in ``purchases_unpriced``.
- Each rate carries a Wilson score 95% interval; ``gmv_per_exposure`` a normal-approximation
  95% interval (mean +- 1.96 standard errors over impressions). Both treat impressions as
  independent; impressions of one request are correlated, so the intervals are somewhat
  narrow, and ``request_ctr`` is the most conservative click figure.

The window is ``[start, end)`` on the exposure's ``ts``; feedback is read from ``start`` to
``end + grace`` (a click after midnight on an exposure before midnight belongs to that day).
Counts are additive (``Counts.merge``), so daily reports sum into an experiment-long result
whose intervals are recomputed from the sums.

``apps.experiments.attribution`` builds on this module: the same feedback join broken down by
day, scene, channel, position, variant and model version, plus outcomes attributed from the
pipeline's clean interactions (Matomo views/clicks, business orders) by last touch.

Files are streamed line by line. Memory holds only the feedback outcomes of the window (far
fewer than exposures) and the per-group counters; a rotated file last written before the
window starts is skipped without being opened, and reading stops once records are well past
the window (lines are appended in time order, give or take the writer's queue).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

Z95 = 1.959963984540054  # two-sided 95% normal quantile
CLICK = "click"
ADD_TO_CART = "add_to_cart"
PURCHASE = "purchase"
OUTCOME_EVENTS = frozenset({CLICK, ADD_TO_CART, PURCHASE})
DEFAULT_VARIANT = "default"
NO_MODEL = "none"
DEFAULT_GRACE = timedelta(hours=24)
# Lines are written by a queue that drains within milliseconds, and several workers append to
# one file: a record can be this much out of order. Reading stops only past this margin.
ORDER_SLACK = timedelta(minutes=5)
# Reading costs about 12 us a record (measured with 200,000 records in 2.3 s), so the
# dashboard's last-hour summary stays near a second even when the hour had more traffic.
DEFAULT_HEALTH_MAX_RECORDS = 100_000
_ROTATED = re.compile(r"^\.(\d+)$")


# --- statistics ----------------------------------------------------------------------------------


def wilson_interval(successes: int, trials: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval of a proportion; None without trials."""
    if trials <= 0:
        return None
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must be 0..{trials}, not {successes}")
    p = successes / trials
    z2 = z * z
    denominator = 1 + z2 / trials
    centre = (p + z2 / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials)) / denominator
    # At 0 or n successes the bound is exactly 0 or 1; rounding would leave 1e-17.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return low, high


def mean_interval(
    total: float, total_sq: float, n: int, z: float = Z95
) -> tuple[float, float] | None:
    """Normal-approximation interval of a mean from its sum and sum of squares; None below
    two observations (no variance to estimate)."""
    if n < 2:
        return None
    mean = total / n
    # max(0, ...): rounding can make a zero variance slightly negative.
    variance = max(0.0, (total_sq - n * mean * mean) / (n - 1))
    half = z * math.sqrt(variance / n)
    return mean - half, mean + half


def _rate(successes: int, trials: int) -> dict[str, float] | None:
    interval = wilson_interval(successes, trials)
    if interval is None:
        return None
    return {"value": successes / trials, "low": interval[0], "high": interval[1]}


# --- counts --------------------------------------------------------------------------------------

COUNT_FIELDS = (
    "requests",
    "impressions",
    "degraded_requests",
    "requests_clicked",
    "clicks",
    "add_to_carts",
    "purchases",
    "clicked_purchases",
    "purchases_unpriced",
    "gmv",
    "gmv_sq",
)


@dataclass
class Counts:
    """Sufficient statistics of one group; every field adds across windows (see ``merge``)."""

    requests: int = 0
    impressions: int = 0
    degraded_requests: int = 0
    requests_clicked: int = 0
    clicks: int = 0
    add_to_carts: int = 0
    purchases: int = 0
    clicked_purchases: int = 0
    purchases_unpriced: int = 0
    gmv: float = 0.0
    gmv_sq: float = 0.0  # sum of squared per-impression values: the GMV interval needs it

    def merge(self, other: Counts) -> Counts:
        """Add ``other`` into this one; returns self."""
        for name in COUNT_FIELDS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    def to_dict(self) -> dict[str, int | float]:
        return {name: getattr(self, name) for name in COUNT_FIELDS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Counts:
        """The inverse of ``to_dict``; missing keys are 0 (older reports)."""
        counts = cls()
        for name in COUNT_FIELDS:
            value = data.get(name, 0) or 0
            setattr(counts, name, float(value) if name in ("gmv", "gmv_sq") else int(value))
        return counts

    def metrics(self) -> dict[str, Any]:
        """Rates with Wilson 95% intervals, GMV per exposure with a normal 95% interval.

        Each is ``{"value", "low", "high"}``, or None when its denominator is 0 (the GMV
        interval is None below two impressions)."""
        gmv: dict[str, Any] | None = None
        if self.impressions:
            interval = mean_interval(self.gmv, self.gmv_sq, self.impressions)
            gmv = {
                "value": self.gmv / self.impressions,
                "low": interval[0] if interval else None,
                "high": interval[1] if interval else None,
            }
        return {
            "ctr": _rate(self.clicks, self.impressions),
            "request_ctr": _rate(self.requests_clicked, self.requests),
            "add_to_cart_rate": _rate(self.add_to_carts, self.impressions),
            "cvr_click": _rate(self.clicked_purchases, self.clicks),
            "cvr_exposure": _rate(self.purchases, self.impressions),
            "gmv_per_exposure": gmv,
            "degraded_share": _rate(self.degraded_requests, self.requests),
        }


def add_outcome(
    counts: Counts, *, clicked: bool, carted: bool, purchased: bool, value: float | None
) -> None:
    """Add one impression's outcome to ``counts`` (its ``impressions`` are counted by the
    caller). ``value`` is the purchase value, None when unknown: the purchase then counts as
    worth 0 and in ``purchases_unpriced``."""
    counts.clicks += clicked
    counts.add_to_carts += carted
    if not purchased:
        return
    counts.purchases += 1
    counts.clicked_purchases += clicked
    if value is None:
        counts.purchases_unpriced += 1
        value = 0.0
    counts.gmv += value
    counts.gmv_sq += value * value


# --- reading the logs ----------------------------------------------------------------------------


def log_files(path: Path) -> list[Path]:
    """``path`` and its rotated files, oldest first (``path.5`` ... ``path.1``, ``path``)."""
    path = Path(path)
    rotated: list[tuple[int, Path]] = []
    if path.parent.is_dir():
        for candidate in path.parent.iterdir():
            if not candidate.name.startswith(path.name):
                continue
            match = _ROTATED.match(candidate.name[len(path.name) :])
            if match and candidate.is_file():
                rotated.append((int(match.group(1)), candidate))
    files = [p for _, p in sorted(rotated, reverse=True)]
    if path.is_file():
        files.append(path)
    return files


def parse_ts(value: Any) -> datetime | None:
    """An aware datetime from a record's ``ts``; None when missing, unparseable or naive."""
    if not isinstance(value, str):
        return None
    try:
        ts = datetime.fromisoformat(value)
    except ValueError:
        return None
    return ts if ts.tzinfo is not None else None


@dataclass
class ReadStats:
    """What reading the logs saw: files opened and skipped, lines read and unreadable."""

    files_read: list[str] = field(default_factory=list)
    files_skipped: int = 0
    lines: int = 0
    bad_lines: int = 0


def _modified(path: Path) -> datetime | None:
    try:
        stamp = os.stat(path).st_mtime
    except OSError:
        return None
    return datetime.fromtimestamp(stamp, tz=UTC)


def iter_records(
    paths: Iterable[Path],
    stats: ReadStats,
    *,
    start: datetime | None = None,
    stop_after: datetime | None = None,
) -> Iterator[tuple[datetime, dict[str, Any]]]:
    """``(ts, record)`` for every readable line of ``paths`` (oldest file first), streamed.

    A file last modified before ``start`` is skipped unopened (it holds nothing at or after
    ``start``); reading stops at the first record after ``stop_after`` + ``ORDER_SLACK``.
    Lines that are not JSON objects with an aware ``ts`` are counted in ``stats.bad_lines``.
    """
    for path in paths:
        modified = _modified(path)
        if start is not None and modified is not None and modified < start:
            stats.files_skipped += 1
            continue
        try:
            handle = open(path, encoding="utf-8", errors="replace")  # noqa: SIM115
        except FileNotFoundError:
            # Rotated away since it was listed: its lines are in a file read already or
            # skipped; a recomputation sees them.
            stats.files_skipped += 1
            continue
        stats.files_read.append(str(path))
        with handle:
            for line in handle:
                record = _parse_line(line, stats)
                if record is None:
                    continue
                ts, data = record
                if stop_after is not None and ts > stop_after + ORDER_SLACK:
                    return
                yield ts, data


def _parse_line(line: str | bytes, stats: ReadStats) -> tuple[datetime, dict[str, Any]] | None:
    if not line.strip():
        return None
    stats.lines += 1
    try:
        data = json.loads(line)
    except ValueError:
        stats.bad_lines += 1
        return None
    ts = parse_ts(data.get("ts")) if isinstance(data, dict) else None
    if ts is None:
        stats.bad_lines += 1
        return None
    return ts, data


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def item_price(item: Any, item_id: int | None, prices: Mapping[int, float]) -> float | None:
    """The price an exposure recorded for an item, else the catalogue's, else None."""
    recorded = _number(item.get("price")) if isinstance(item, dict) else None
    if recorded is not None and recorded >= 0:
        return recorded
    return prices.get(item_id) if item_id is not None else None


# --- online evaluation ---------------------------------------------------------------------------


@dataclass
class _Outcome:
    """What users did on one impression (feedback side of the join)."""

    clicked: bool = False
    carted: bool = False
    purchased: bool = False
    value: float | None = None


@dataclass(frozen=True)
class OnlineEvaluation:
    """Counts per variant label and per model version over ``[start, end)``, with what the
    join could not attribute. ``to_dict`` is what reports store."""

    start: datetime
    end: datetime
    by_variant: dict[str, Counts]
    by_model_version: dict[str, Counts]
    feedback_events: dict[str, int]
    feedback_matched: int
    feedback_unmatched: int
    feedback_not_shown: int
    exposure_read: ReadStats
    feedback_read: ReadStats

    def to_dict(self) -> dict[str, Any]:
        def groups(data: Mapping[str, Counts]) -> dict[str, Any]:
            return {
                key: {"counts": counts.to_dict(), "metrics": counts.metrics()}
                for key, counts in sorted(data.items())
            }

        return {
            "start": self.start.isoformat(),
            "end": self.end.isoformat(),
            "by_variant": groups(self.by_variant),
            "by_model_version": groups(self.by_model_version),
            **feedback_and_log_accounting(self),
        }


def split_variant(label: str) -> tuple[str | None, str]:
    """``"exp:b"`` -> ``("exp", "b")``; ``"default"`` -> ``(None, "default")``."""
    experiment, sep, variant = label.partition(":")
    return (experiment, variant) if sep else (None, label)


def _read_feedback(
    path: Path, *, start: datetime, until: datetime, stats: ReadStats, events: Counter[str]
) -> dict[str, dict[int, _Outcome]]:
    """The outcome of every impression with feedback in ``[start, until)``, by request."""
    outcomes: dict[str, dict[int, _Outcome]] = {}
    for ts, record in iter_records(log_files(path), stats, start=start, stop_after=until):
        event = record.get("event")
        if event not in OUTCOME_EVENTS or not start <= ts < until:
            continue
        request_id, item_id = record.get("request_id"), _int(record.get("item_id"))
        if not isinstance(request_id, str) or item_id is None:
            stats.bad_lines += 1
            continue
        events[event] += 1
        outcome = outcomes.setdefault(request_id, {}).setdefault(item_id, _Outcome())
        if event == CLICK:
            outcome.clicked = True
        elif event == ADD_TO_CART:
            outcome.carted = True
        else:
            outcome.purchased = True
            value = _number(record.get("value"))
            if value is not None and (outcome.value is None or value > outcome.value):
                outcome.value = value
    return outcomes


def evaluate_online(
    exposure_log: Path,
    *,
    start: datetime,
    end: datetime,
    feedback_log: Path | None = None,
    grace: timedelta = DEFAULT_GRACE,
    prices: Mapping[int, float] | None = None,
) -> OnlineEvaluation:
    """Join feedback to exposures in ``[start, end)`` and count per variant and model version.

    ``feedback_log`` defaults to ``feedback.jsonl`` beside ``exposure_log`` (as serving writes
    it); ``prices`` values purchases that carry no ``value``. See the module docstring for the
    definitions.
    """
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError("start and end must be timezone-aware")
    if end <= start:
        raise ValueError("end must be after start")
    exposure_log = Path(exposure_log)
    feedback_log = Path(feedback_log) if feedback_log else exposure_log.with_name("feedback.jsonl")
    prices = prices or {}
    feedback_stats, exposure_stats = ReadStats(), ReadStats()
    events: Counter[str] = Counter()
    outcomes = _read_feedback(
        feedback_log, start=start, until=end + grace, stats=feedback_stats, events=events
    )
    by_variant: dict[str, Counts] = {}
    by_model: dict[str, Counts] = {}
    matched = not_shown = 0
    for ts, record in iter_records(
        log_files(exposure_log), exposure_stats, start=start, stop_after=end
    ):
        if not start <= ts < end:
            continue
        items = record.get("items")
        if not isinstance(items, list):
            exposure_stats.bad_lines += 1
            continue
        variant = record.get("variant")
        model = record.get("model_version")
        counted = Counts(requests=1, degraded_requests=int(bool(record.get("degraded"))))
        request_id = record.get("request_id")
        found = outcomes.pop(request_id, None) if isinstance(request_id, str) else None
        for item in items:
            item_id = _int(item.get("item_id")) if isinstance(item, dict) else None
            counted.impressions += 1
            outcome = found.pop(item_id, None) if found and item_id is not None else None
            if outcome is None:
                continue
            matched += 1
            value = outcome.value
            if value is None and outcome.purchased:
                value = item_price(item, item_id, prices)
            add_outcome(
                counted,
                clicked=outcome.clicked,
                carted=outcome.carted,
                purchased=outcome.purchased,
                value=value,
            )
        counted.requests_clicked = int(counted.clicks > 0)
        if found:
            not_shown += len(found)
        variant_key = variant if isinstance(variant, str) and variant else DEFAULT_VARIANT
        model_key = model if isinstance(model, str) and model else NO_MODEL
        by_variant.setdefault(variant_key, Counts()).merge(counted)
        by_model.setdefault(model_key, Counts()).merge(counted)
    unmatched = sum(len(items) for items in outcomes.values())
    return OnlineEvaluation(
        start=start,
        end=end,
        by_variant=by_variant,
        by_model_version=by_model,
        feedback_events=dict(events),
        feedback_matched=matched,
        feedback_unmatched=unmatched,
        feedback_not_shown=not_shown,
        exposure_read=exposure_stats,
        feedback_read=feedback_stats,
    )


# --- serving health ------------------------------------------------------------------------------


class LatencyHistogram:
    """Latencies in logarithmic buckets (each 1% wider than the last): bounded memory, and a
    quantile is the upper edge of its bucket, so at most 1% above the exact value."""

    RATIO = 1.01
    FLOOR_MS = 0.01

    def __init__(self) -> None:
        self.counts: Counter[int] = Counter()
        self.n = 0

    def add(self, ms: float) -> None:
        index = 0 if ms <= self.FLOOR_MS else math.ceil(math.log(ms / self.FLOOR_MS, self.RATIO))
        self.counts[index] += 1
        self.n += 1

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile (0 < q <= 1) in ms, rounded up to its bucket; None when empty."""
        if self.n == 0:
            return None
        rank = math.ceil(q * self.n)
        seen = 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen >= rank:
                return self.FLOOR_MS * self.RATIO**index
        return None  # pragma: no cover - the loop always reaches rank


@dataclass(frozen=True)
class ServingHealth:
    """What the exposure log says about ``[since, until)``: requests, degraded ones by reason,
    and latency quantiles (None when no record in the window carries ``latency_ms``)."""

    since: datetime
    until: datetime
    requests: int
    degraded: int
    degraded_by_reason: dict[str, int]
    by_source: dict[str, int]
    latency_recorded: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    bad_lines: int
    files_read: int
    # Set when ``max_records`` stopped the read: the figures cover [covered_from, until) only.
    covered_from: datetime | None = None

    @property
    def truncated(self) -> bool:
        return self.covered_from is not None

    @property
    def degraded_share(self) -> float | None:
        return self.degraded / self.requests if self.requests else None

    def reasons(self) -> list[tuple[str, int, float]]:
        """``(reason, count, share of all requests)``, most frequent first."""
        return [
            (reason, count, count / self.requests)
            for reason, count in sorted(self.degraded_by_reason.items(), key=lambda kv: -kv[1])
        ]


def _reverse_lines(path: Path, block: int = 64 * 1024) -> Iterator[bytes]:
    """The lines of a file, last first, reading ``block`` bytes at a time from the end; none
    when the file was rotated away since it was listed."""
    try:
        handle = open(path, "rb")  # noqa: SIM115
    except FileNotFoundError:
        return
    with handle:
        position = handle.seek(0, os.SEEK_END)
        tail = b""
        while position > 0:
            size = min(block, position)
            position -= size
            handle.seek(position)
            chunk = handle.read(size) + tail
            lines = chunk.split(b"\n")
            tail = lines[0]  # may continue in the previous block
            yield from reversed(lines[1:])
        if tail:
            yield tail


def serving_health(
    exposure_log: Path,
    *,
    since: datetime,
    until: datetime,
    max_records: int | None = DEFAULT_HEALTH_MAX_RECORDS,
) -> ServingHealth:
    """Summarise the exposure records of ``[since, until)``.

    Files are read from their end, newest file first, and reading stops at the first record
    older than ``since`` - ``ORDER_SLACK``: the cost follows the window's traffic, not the size
    of the log. At most ``max_records`` records are summarised (the newest); past that the
    result says from when it covers (``covered_from``).
    """
    stats = ReadStats()
    requests = degraded = 0
    reasons: Counter[str] = Counter()
    sources: Counter[str] = Counter()
    latency = LatencyHistogram()
    covered_from: datetime | None = None
    for path in reversed(log_files(Path(exposure_log))):
        modified = _modified(path)
        if modified is not None and modified < since:
            break  # this file and every older one end before the window
        stats.files_read.append(str(path))
        done = False
        for line in _reverse_lines(path):
            parsed = _parse_line(line, stats)
            if parsed is None:
                continue
            ts, record = parsed
            if ts < since - ORDER_SLACK:
                done = True
                break
            if not since <= ts < until:
                continue
            if max_records is not None and requests >= max_records:
                covered_from, done = ts, True
                break
            requests += 1
            sources[str(record.get("source") or "unknown")] += 1
            if record.get("degraded"):
                degraded += 1
                reasons[str(record.get("degrade_reason") or "unknown")] += 1
            ms = _number(record.get("latency_ms"))
            if ms is not None and ms >= 0:
                latency.add(ms)
        if done:
            break
    return ServingHealth(
        since=since,
        until=until,
        requests=requests,
        degraded=degraded,
        degraded_by_reason=dict(reasons),
        by_source=dict(sources),
        latency_recorded=latency.n,
        p50_ms=latency.quantile(0.50),
        p95_ms=latency.quantile(0.95),
        p99_ms=latency.quantile(0.99),
        bad_lines=stats.bad_lines,
        files_read=len(stats.files_read),
        covered_from=covered_from,
    )


def feedback_and_log_accounting(result: Any) -> dict[str, Any]:
    """The `feedback` and `logs` sections every online result reports: how the feedback join
    went and what was read. `result` has `feedback_events`/`_matched`/`_unmatched`/
    `_not_shown` and the two `LogRead`s `exposure_read` and `feedback_read`."""
    exposure, feedback = result.exposure_read, result.feedback_read
    return {
        "feedback": {
            "events": dict(sorted(result.feedback_events.items())),
            "matched": result.feedback_matched,
            "unmatched": result.feedback_unmatched,
            "not_shown": result.feedback_not_shown,
        },
        "logs": {
            "exposure_files": exposure.files_read,
            "exposure_lines": exposure.lines,
            "feedback_files": feedback.files_read,
            "feedback_lines": feedback.lines,
            "bad_lines": exposure.bad_lines + feedback.bad_lines,
            "files_skipped": exposure.files_skipped + feedback.files_skipped,
        },
    }
