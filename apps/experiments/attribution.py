"""Online evaluation by dimension, with outcomes attributed from the clean interactions.

Pure core: no Django. Builds on ``apps.experiments.online`` (log reading, ``Counts``, Wilson and
normal intervals, the feedback join) and reads the exposure log once, streaming.

Every impression (one item shown in one response) in ``[start, end)`` is counted under two
*bases*, each with the same ``Counts`` and metrics (CTR, CVR, GMV per exposure, ...):

- ``feedback``: what the client reported on that response through ``POST /api/v1/feedback``,
  joined by ``request_id`` and ``item_id`` exactly as ``online.evaluate_online`` does.
- ``attributed``: what the user did on the site, from the pipeline's clean interactions
  (``DATA_DIR/clean/interactions.parquet``): Matomo product-page views and search-result
  clicks (canonical ``detail_view``, ``search_click``) count as clicks, cart additions as
  ``add_to_cart``, orders (business ``api_order`` rows, or Matomo orders the business database
  does not have) as ``purchase`` with their value. ``EVENT_KINDS`` is the mapping.

The two bases answer different questions and are never added together: feedback is exact but
depends on the client posting it; attribution needs no client work but credits any visit to the
item within the window, whether it came through the recommendation or not (view-through).

Attribution rule (last touch):

- An interaction of user U on item I at time t is credited to the **latest** exposure of I to U
  at or before t (``ts_exposure <= t``), if ``t < ts_exposure + window`` (``window`` defaults to
  24 hours; an event exactly ``window`` after the exposure is not credited). Earlier exposures
  of I to U get nothing for it, so an event is credited at most once and daily counts add up.
- U is matched on either identity an exposure carries: ``user_id`` and ``visitor_id`` (Matomo's
  16-hex visitor id, compared lower-case). Clean Matomo interactions carry the visitor id and
  the business user the visit was stitched to, business orders the user id. An exposure with
  neither cannot be credited (counted in ``impressions_without_identity``).
- To find the latest exposure of an event that falls after ``end``, exposures up to
  ``end + window`` are read as well; an event whose latest exposure is after ``end`` belongs to
  that exposure's day (``later_exposure``) and is not counted here.
- Per impression, repeated events of one kind count once (a CTR stays a share of impressions);
  the impression's value is the sum of its credited purchases' values, a purchase without a
  value (0 or null) being valued at the exposure's recorded price times its quantity, else the
  catalogue price, else 0 and counted in ``purchases_unpriced``.

GMV is the total purchase value; the platform has no cost or commission data, so *revenue per
exposure* is ``gmv_per_exposure`` (GMV / impressions, with a normal-approximation 95% interval).

Dimensions (``DIMENSIONS``): ``day`` (UTC date of the exposure), ``scene``, ``channel`` (the
recall channel of the item), ``position`` (1-based, bucketed ``1``, ``2``, ``3``, ``4-5``,
``6-10``, ``11+``), ``variant`` and ``model_version``. Impression counts add up over each
dimension's groups. ``requests`` of a group are the responses with at least one impression in
it (so for ``channel`` and ``position`` they do not add up to the total), ``requests_clicked``
those with a clicked impression in it.

Cost: the exposures of ``[start, end + window)`` are read once; about 20 us per request of 10
items (measured: 100,000 requests in the day, 100,000 in the next, 100,000 interactions: 4.0 s,
230 MB peak). Memory holds the feedback outcomes, the interactions, and the exposures of the
(user, item) pairs that have an interaction.

``compare_promotion`` evaluates equal windows before and after a model's promotion with the same
metrics and Newcombe's interval for each difference of rates.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd

from apps.experiments.online import (
    ADD_TO_CART,
    CLICK,
    DEFAULT_GRACE,
    DEFAULT_VARIANT,
    NO_MODEL,
    PURCHASE,
    Z95,
    Counts,
    ReadStats,
    _int,
    _number,
    _read_feedback,
    add_outcome,
    feedback_and_log_accounting,
    item_price,
    iter_records,
    log_files,
    wilson_interval,
)

DEFAULT_WINDOW = timedelta(hours=24)
DEFAULT_PROMOTION_SPAN = timedelta(days=7)
# A before/after comparison over less than this is noise; it waits until there is this much.
MIN_COMPARISON = timedelta(hours=1)
FEEDBACK = "feedback"
ATTRIBUTED = "attributed"
BASES = (FEEDBACK, ATTRIBUTED)
DIMENSIONS = ("day", "scene", "channel", "position", "variant", "model_version")
# Dimensions that label a whole response; the others label each item in it.
RECORD_DIMENSIONS = frozenset({"day", "scene", "variant", "model_version"})
UNKNOWN = "unknown"
# Canonical interaction events (apps.pipeline.schema.EVENTS) -> outcome kind.
EVENT_KINDS: Mapping[str, str] = {
    "detail_view": CLICK,
    "search_click": CLICK,
    "add_to_cart": ADD_TO_CART,
    "purchase": PURCHASE,
}
# (lowest position, highest position or None, label), in display order.
POSITION_BUCKETS: tuple[tuple[int, int | None, str], ...] = (
    (1, 1, "1"),
    (2, 2, "2"),
    (3, 3, "3"),
    (4, 5, "4-5"),
    (6, 10, "6-10"),
    (11, None, "11+"),
)
# Metrics compared before and after a promotion: (name, successes field, trials field); the GMV
# per exposure is compared separately (a mean, not a rate).
COMPARED_RATES = (
    ("ctr", "clicks", "impressions"),
    ("request_ctr", "requests_clicked", "requests"),
    ("cvr_click", "clicked_purchases", "clicks"),
    ("cvr_exposure", "purchases", "impressions"),
)


def _bucket_of_position(position: int) -> str:
    for low, high, label in POSITION_BUCKETS:
        if position >= low and (high is None or position <= high):
            return label
    return UNKNOWN


# Positions of a typical response, looked up rather than computed for every impression.
_BUCKET_OF: Mapping[int, str] = {p: _bucket_of_position(p) for p in range(1, 101)}


def position_bucket(position: Any) -> str:
    """``1``, ``2``, ``3``, ``4-5``, ``6-10`` or ``11+`` for a 1-based position; ``unknown``
    for anything else (missing, 0, negative, not an integer)."""
    value = _int(position)
    if value is None or value < 1:
        return UNKNOWN
    return _bucket_of_position(value)


def dimension_order(dimension: str, labels: Iterable[str]) -> list[str]:
    """Labels in display order: position buckets in rank order, anything else sorted."""
    if dimension == "position":
        rank = {label: i for i, (_, _, label) in enumerate(POSITION_BUCKETS)}
        return sorted(labels, key=lambda label: (rank.get(label, len(rank)), label))
    return sorted(labels)


def identity_keys(user_id: Any, visitor_id: Any) -> tuple[str, ...]:
    """The keys an exposure or interaction is matched on: ``u:<user_id>`` and
    ``v:<visitor id, lower-case>``, each when present."""
    keys = []
    user = _int(user_id)
    if user is not None:
        keys.append(f"u:{user}")
    if isinstance(visitor_id, str) and visitor_id.strip():
        keys.append(f"v:{visitor_id.strip().lower()}")
    return tuple(keys)


# --- interactions --------------------------------------------------------------------------------


class Interaction(NamedTuple):
    """One clean interaction that can be credited to an exposure."""

    ts: datetime
    keys: tuple[str, ...]
    item_id: int
    kind: str  # online.CLICK, ADD_TO_CART or PURCHASE
    value: float | None = None  # purchase value; None when 0 or unknown
    quantity: int = 1


def interactions_from_frame(
    frame: pd.DataFrame,
    *,
    since: datetime,
    until: datetime,
    kinds: Mapping[str, str] = EVENT_KINDS,
) -> list[Interaction]:
    """The interactions of a clean canonical frame (``apps.pipeline.schema.INTERACTIONS``) with
    ``since <= ts < until``, an item, an identity and an event in ``kinds``, oldest first."""
    if frame.empty:
        return []
    ts = pd.to_datetime(frame["ts"], utc=True)
    users = frame["user_id"] if "user_id" in frame else pd.Series(pd.NA, index=frame.index)
    visitors = frame["visitor_id"] if "visitor_id" in frame else pd.Series(pd.NA, index=frame.index)
    keep = (
        frame["item_id"].notna()
        & frame["event"].isin(list(kinds))
        & (ts >= pd.Timestamp(since))
        & (ts < pd.Timestamp(until))
        & (users.notna() | visitors.notna())
    ).fillna(False)
    rows = frame.loc[keep.to_numpy(dtype=bool)].assign(_ts=ts[keep.to_numpy(dtype=bool)])
    rows = rows.sort_values("_ts", kind="stable")
    values = rows["value"] if "value" in rows else pd.Series(0.0, index=rows.index)
    quantities = rows["quantity"] if "quantity" in rows else pd.Series(1, index=rows.index)
    out = []
    for when, user, visitor, item, event, value, quantity in zip(
        # Timestamp is a datetime subclass: compares with the exposures' datetimes.
        list(rows["_ts"]),
        users.loc[rows.index].astype(object),
        visitors.loc[rows.index].astype(object),
        rows["item_id"].astype("int64"),
        rows["event"].astype(str),
        values.astype(object),
        quantities.astype(object),
        strict=True,
    ):
        price = _number(value)
        count = _int(quantity)
        out.append(
            Interaction(
                ts=when,
                keys=identity_keys(user, visitor),
                item_id=int(item),
                kind=kinds[event],
                value=price if price is not None and price > 0 else None,
                quantity=count if count is not None and count > 0 else 1,
            )
        )
    return out


# --- last touch ----------------------------------------------------------------------------------


@dataclass
class AttributionStats:
    """What became of the interactions: credited (by kind) or why not."""

    interactions: int = 0
    credited: Counter[str] = field(default_factory=Counter)
    no_exposure: int = 0  # no exposure of the item to the user at or before the event was read
    expired: int = 0  # the latest exposure was ``window`` or more before the event
    later_exposure: int = 0  # the latest exposure is after the evaluated window: its day's
    impressions_without_identity: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "interactions": self.interactions,
            "credited": dict(sorted(self.credited.items())),
            "credited_total": sum(self.credited.values()),
            "no_exposure": self.no_exposure,
            "expired": self.expired,
            "later_exposure": self.later_exposure,
            "impressions_without_identity": self.impressions_without_identity,
        }


class LastTouch:
    """Credits interactions to the latest earlier exposure of the same item to the same user.

    Feed it every exposure in ``[start, end + window)`` with ``add`` (a ``slot`` for those that
    are evaluated, None for the later ones that only compete), then call ``resolve`` once.
    Memory holds only exposures of (user, item) pairs that have an interaction.
    """

    def __init__(self, interactions: Sequence[Interaction], window: timedelta) -> None:
        if window <= timedelta(0):
            raise ValueError("the attribution window must be positive")
        self.interactions = interactions
        self.window = window
        # (identity key, item) of every interaction: exposures of other pairs are not kept.
        self.pairs = frozenset((key, i.item_id) for i in interactions for key in i.keys)
        self._touches: dict[tuple[str, int], list[tuple[datetime, int, int | None]]] = defaultdict(
            list
        )
        self._read = 0

    def add(self, keys: Iterable[str], item_id: int, ts: datetime, slot: int | None) -> bool:
        """Record an exposure of ``item_id`` to the user with ``keys``; True when some
        interaction could be credited to it."""
        wanted = False
        for key in keys:
            pair = (key, item_id)
            if pair in self.pairs:
                # The read order breaks ties between exposures with the same timestamp.
                self._touches[pair].append((ts, self._read, slot))
                wanted = True
        self._read += 1
        return wanted

    def resolve(self) -> tuple[dict[int, list[Interaction]], AttributionStats]:
        """The interactions credited to each slot, and what happened to the others."""
        stats = AttributionStats(interactions=len(self.interactions))
        times: dict[tuple[str, int], list[datetime]] = {}
        for pair, touches in self._touches.items():
            touches.sort()  # writers' queues can leave lines slightly out of order
            times[pair] = [t for t, _, _ in touches]
        credited: dict[int, list[Interaction]] = defaultdict(list)
        for interaction in self.interactions:
            best: tuple[datetime, int, int | None] | None = None
            for key in interaction.keys:
                pair = (key, interaction.item_id)
                stamps = times.get(pair)
                if not stamps:
                    continue
                index = bisect_right(stamps, interaction.ts) - 1
                if index >= 0 and (best is None or self._touches[pair][index][:2] > best[:2]):
                    best = self._touches[pair][index]
            if best is None:
                stats.no_exposure += 1
            elif interaction.ts - best[0] >= self.window:
                stats.expired += 1
            elif best[2] is None:
                stats.later_exposure += 1
            else:
                stats.credited[interaction.kind] += 1
                credited[best[2]].append(interaction)
        return dict(credited), stats


# --- grouped evaluation --------------------------------------------------------------------------


def _group_dict(counts: Counts) -> dict[str, Any]:
    return {"counts": counts.to_dict(), "metrics": counts.metrics()}


@dataclass(frozen=True)
class GroupedEvaluation:
    """Counts per basis (``feedback``, ``attributed``), dimension and label over
    ``[start, end)``, with their totals; ``to_dict`` is what reports store."""

    start: datetime
    end: datetime
    window: timedelta
    dimensions: tuple[str, ...]
    groups: dict[str, dict[str, dict[str, Counts]]]
    totals: dict[str, Counts]
    attribution: AttributionStats
    feedback_events: dict[str, int]
    feedback_matched: int
    feedback_unmatched: int
    feedback_not_shown: int
    exposure_read: ReadStats
    feedback_read: ReadStats

    def to_dict(self) -> dict[str, Any]:
        return {
            "start": self.start.isoformat(),
            "end": self.end.isoformat(),
            "window_hours": self.window.total_seconds() / 3600,
            "attribution_model": "last_touch",
            "dimensions": list(self.dimensions),
            "totals": {basis: _group_dict(c) for basis, c in self.totals.items()},
            "breakdown": {
                basis: {
                    dimension: {
                        label: _group_dict(by_label[label])
                        for label in dimension_order(dimension, by_label)
                    }
                    for dimension, by_label in by_dimension.items()
                }
                for basis, by_dimension in self.groups.items()
            },
            "attribution": self.attribution.to_dict(),
            **feedback_and_log_accounting(self),
        }


class _Tally:
    """Impression-level counts per full label tuple (one cell per combination of dimensions),
    and request-level counts per dimension and label (a response can span several channels or
    positions, so those do not roll up from cells)."""

    def __init__(self, dimensions: tuple[str, ...]) -> None:
        self.dimensions = dimensions
        self.cells: dict[tuple[str, ...], Counts] = {}
        self.requests: list[Counter[str]] = [Counter() for _ in dimensions]
        self.degraded: list[Counter[str]] = [Counter() for _ in dimensions]
        self.clicked: list[Counter[str]] = [Counter() for _ in dimensions]
        self.total_requests = 0
        self.total_degraded = 0
        self.total_clicked = 0

    def cell(self, labels: tuple[str, ...]) -> Counts:
        found = self.cells.get(labels)
        if found is None:
            found = self.cells[labels] = Counts()
        return found

    def take_exposures(self, other: _Tally) -> None:
        """Copy the exposure counts (impressions, requests, degraded requests) of ``other``:
        both bases count the same exposures, only their outcomes differ."""
        for labels, counts in other.cells.items():
            self.cell(labels).impressions = counts.impressions
        self.requests = [Counter(c) for c in other.requests]
        self.degraded = [Counter(c) for c in other.degraded]
        self.total_requests = other.total_requests
        self.total_degraded = other.total_degraded

    def request(self, label_sets: Sequence[set[str]], degraded: bool) -> None:
        self.total_requests += 1
        self.total_degraded += degraded
        for i, labels in enumerate(label_sets):
            for label in labels:
                self.requests[i][label] += 1
                if degraded:
                    self.degraded[i][label] += 1

    def request_clicked(self, label_sets: Sequence[set[str]]) -> None:
        self.total_clicked += 1
        for i, labels in enumerate(label_sets):
            for label in labels:
                self.clicked[i][label] += 1

    def roll_up(self) -> tuple[dict[str, dict[str, Counts]], Counts]:
        groups: dict[str, dict[str, Counts]] = {d: {} for d in self.dimensions}
        total = Counts()
        for labels, counts in self.cells.items():
            total.merge(counts)
            for dimension, label in zip(self.dimensions, labels, strict=True):
                groups[dimension].setdefault(label, Counts()).merge(counts)
        for i, dimension in enumerate(self.dimensions):
            for label in set(self.requests[i]) | set(groups[dimension]):
                counts = groups[dimension].setdefault(label, Counts())
                counts.requests = self.requests[i][label]
                counts.degraded_requests = self.degraded[i][label]
                counts.requests_clicked = self.clicked[i][label]
        total.requests = self.total_requests
        total.degraded_requests = self.total_degraded
        total.requests_clicked = self.total_clicked
        return groups, total


def _label(value: Any, default: str = UNKNOWN) -> str:
    return value if isinstance(value, str) and value else default


def evaluate_grouped(
    exposure_log: Path,
    *,
    start: datetime,
    end: datetime,
    interactions: Sequence[Interaction] = (),
    window: timedelta = DEFAULT_WINDOW,
    feedback_log: Path | None = None,
    grace: timedelta = DEFAULT_GRACE,
    prices: Mapping[int, float] | None = None,
    dimensions: Sequence[str] = DIMENSIONS,
) -> GroupedEvaluation:
    """Count every impression of ``[start, end)`` by dimension, with feedback outcomes and
    outcomes attributed from ``interactions`` (see the module docstring).

    ``interactions`` should cover ``[start, end + window)`` (``interactions_from_frame``);
    ``feedback_log`` defaults to ``feedback.jsonl`` beside ``exposure_log``; ``prices`` (the
    catalogue) values purchases whose value and exposure price are unknown.
    """
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError("start and end must be timezone-aware")
    if end <= start:
        raise ValueError("end must be after start")
    unknown = set(dimensions) - set(DIMENSIONS)
    if unknown:
        raise ValueError(f"unknown dimensions: {sorted(unknown)}")
    dims = tuple(dimensions)
    exposure_log = Path(exposure_log)
    feedback_log = Path(feedback_log) if feedback_log else exposure_log.with_name("feedback.jsonl")
    prices = prices or {}
    feedback_stats, exposure_stats = ReadStats(), ReadStats()
    events: Counter[str] = Counter()
    outcomes = _read_feedback(
        feedback_log, start=start, until=end + grace, stats=feedback_stats, events=events
    )
    touch = LastTouch(interactions, window)
    # Exposures after `end` only compete for the last touch of events after `end`.
    read_until = end + window if interactions else end
    tallies = {basis: _Tally(dims) for basis in BASES}
    # Exposures and feedback outcomes are counted as the log streams; attributed outcomes
    # after it, on a copy of the exposure counts.
    shown = tallies[FEEDBACK]
    pairs = touch.pairs
    label_cache: dict[tuple[tuple[str, ...], str, str], tuple[str, ...]] = {}
    record_dims = [d in RECORD_DIMENSIONS for d in dims]
    # Impressions that may be credited: (request number, labels, price). Only those whose
    # (user, item) has an interaction, so this grows with the interactions, not the log.
    slots: list[tuple[int, tuple[str, ...], float | None]] = []
    matched = not_shown = requests = without_identity = 0
    for ts, record in iter_records(
        log_files(exposure_log), exposure_stats, start=start, stop_after=read_until
    ):
        if not start <= ts < read_until:
            continue
        items = record.get("items")
        if not isinstance(items, list):
            if ts < end:
                exposure_stats.bad_lines += 1
            continue
        keys = identity_keys(record.get("user_id"), record.get("visitor_id"))
        if ts >= end:
            for item in items:
                item_id = _int(item.get("item_id")) if isinstance(item, dict) else None
                if item_id is not None and any((k, item_id) in pairs for k in keys):
                    touch.add(keys, item_id, ts, None)
            continue
        requests += 1
        record_labels = {
            "day": ts.astimezone(UTC).date().isoformat(),
            "scene": _label(record.get("scene")),
            "variant": _label(record.get("variant"), DEFAULT_VARIANT),
            "model_version": _label(record.get("model_version"), NO_MODEL),
        }
        record_key = tuple(record_labels.values())
        request_id = record.get("request_id")
        found = outcomes.pop(request_id, None) if isinstance(request_id, str) else None
        item_labels: list[tuple[str, ...]] = []
        clicked_labels: list[tuple[str, ...]] = []
        for item in items:
            entry = item if isinstance(item, dict) else {}
            item_id = _int(entry.get("item_id"))
            channel = _label(entry.get("channel"))
            position = entry.get("position")
            bucket = _BUCKET_OF.get(position) if type(position) is int else None
            if bucket is None:
                bucket = position_bucket(position)
            # A handful of distinct label combinations: build each tuple once.
            labels = label_cache.get((record_key, channel, bucket))
            if labels is None:
                values = {**record_labels, "channel": channel, "position": bucket}
                labels = label_cache[(record_key, channel, bucket)] = tuple(values[d] for d in dims)
            item_labels.append(labels)
            shown.cell(labels).impressions += 1
            if not keys:
                without_identity += 1
            elif item_id is not None and any((k, item_id) in pairs for k in keys):
                touch.add(keys, item_id, ts, len(slots))
                slots.append((requests, labels, item_price(entry, item_id, prices)))
            outcome = found.pop(item_id, None) if found and item_id is not None else None
            if outcome is None:
                continue
            matched += 1
            value = outcome.value
            if value is None and outcome.purchased:
                value = item_price(entry, item_id, prices)
            add_outcome(
                shown.cell(labels),
                clicked=outcome.clicked,
                carted=outcome.carted,
                purchased=outcome.purchased,
                value=value,
            )
            if outcome.clicked:
                clicked_labels.append(labels)
        if found:
            not_shown += len(found)
        shown.request(
            _label_sets(record_labels, dims, record_dims, item_labels),
            bool(record.get("degraded")),
        )
        if clicked_labels:
            shown.request_clicked(_label_sets(record_labels, dims, record_dims, clicked_labels))
    credited, attribution = touch.resolve()
    attribution.impressions_without_identity = without_identity
    tallies[ATTRIBUTED].take_exposures(shown)
    _credit(tallies[ATTRIBUTED], slots, credited, dims, record_dims)
    groups: dict[str, dict[str, dict[str, Counts]]] = {}
    totals: dict[str, Counts] = {}
    for basis, tally in tallies.items():
        groups[basis], totals[basis] = tally.roll_up()
    return GroupedEvaluation(
        start=start,
        end=end,
        window=window,
        dimensions=dims,
        groups=groups,
        totals=totals,
        attribution=attribution,
        feedback_events=dict(events),
        feedback_matched=matched,
        feedback_unmatched=sum(len(items) for items in outcomes.values()),
        feedback_not_shown=not_shown,
        exposure_read=exposure_stats,
        feedback_read=feedback_stats,
    )


def _label_sets(
    record_labels: Mapping[str, str],
    dims: tuple[str, ...],
    record_dims: Sequence[bool],
    item_labels: Sequence[tuple[str, ...]],
) -> list[set[str]]:
    """Per dimension, the labels a response has: its own for a response-level dimension (even
    without items), those of its items for an item-level one."""
    return [
        {record_labels[d]} if is_record else {labels[i] for labels in item_labels}
        for i, (d, is_record) in enumerate(zip(dims, record_dims, strict=True))
    ]


def _credit(
    tally: _Tally,
    slots: Sequence[tuple[int, tuple[str, ...], float | None]],
    credited: Mapping[int, list[Interaction]],
    dims: tuple[str, ...],
    record_dims: Sequence[bool],
) -> None:
    """Add the credited interactions to the impressions they were credited to."""
    clicked_by_request: dict[int, list[tuple[str, ...]]] = defaultdict(list)
    for slot, found in credited.items():
        request, labels, price = slots[slot]
        kinds = {i.kind for i in found}
        value: float | None = None
        purchases = [i for i in found if i.kind == PURCHASE]
        if purchases:
            value = 0.0
            for purchase in purchases:
                if purchase.value is not None:
                    value += purchase.value
                elif price is not None:
                    value += price * purchase.quantity
                else:
                    value = None  # one unvalued purchase makes the impression unpriced
                    break
        add_outcome(
            tally.cell(labels),
            clicked=CLICK in kinds,
            carted=ADD_TO_CART in kinds,
            purchased=bool(purchases),
            value=value,
        )
        if CLICK in kinds:
            clicked_by_request[request].append(labels)
    for labels_of_request in clicked_by_request.values():
        # Response-level labels are the same for every item of a response: take the first's.
        first = labels_of_request[0]
        record_labels = {d: first[i] for i, d in enumerate(dims) if record_dims[i]}
        tally.request_clicked(_label_sets(record_labels, dims, record_dims, labels_of_request))


# --- before / after a promotion ------------------------------------------------------------------


def rate_difference(
    before: tuple[int, int], after: tuple[int, int], z: float = Z95
) -> dict[str, float] | None:
    """``after - before`` of two proportions ``(successes, trials)`` with Newcombe's hybrid
    score interval (method 10 of Newcombe 1998, built from the two Wilson intervals); None
    when either has no trials."""
    a, b = wilson_interval(*after, z=z), wilson_interval(*before, z=z)
    if a is None or b is None:
        return None
    p_after, p_before = after[0] / after[1], before[0] / before[1]
    difference = p_after - p_before
    low = difference - math.sqrt((p_after - a[0]) ** 2 + (b[1] - p_before) ** 2)
    high = difference + math.sqrt((a[1] - p_after) ** 2 + (p_before - b[0]) ** 2)
    return {"value": difference, "low": low, "high": high}


def mean_difference(before: Counts, after: Counts, z: float = Z95) -> dict[str, float] | None:
    """``after - before`` of GMV per exposure with a Welch normal interval; None below two
    impressions on either side."""

    def moments(c: Counts) -> tuple[float, float] | None:
        if c.impressions < 2:
            return None
        mean = c.gmv / c.impressions
        variance = max(0.0, (c.gmv_sq - c.impressions * mean * mean) / (c.impressions - 1))
        return mean, variance / c.impressions

    a, b = moments(after), moments(before)
    if a is None or b is None:
        return None
    difference = a[0] - b[0]
    half = z * math.sqrt(a[1] + b[1])
    return {"value": difference, "low": difference - half, "high": difference + half}


def counts_difference(before: Counts, after: Counts) -> dict[str, dict[str, float] | None]:
    """Every compared metric's ``after - before`` with its 95% interval."""
    out: dict[str, dict[str, float] | None] = {
        name: rate_difference(
            (getattr(before, hits), getattr(before, trials)),
            (getattr(after, hits), getattr(after, trials)),
        )
        for name, hits, trials in COMPARED_RATES
    }
    out["gmv_per_exposure"] = mean_difference(before, after)
    return out


def compare_promotion(
    exposure_log: Path,
    *,
    promoted_at: datetime,
    now: datetime,
    span: timedelta,
    interactions: Sequence[Interaction] = (),
    window: timedelta = DEFAULT_WINDOW,
    feedback_log: Path | None = None,
    grace: timedelta = DEFAULT_GRACE,
    prices: Mapping[int, float] | None = None,
    model_version: str = "",
) -> dict[str, Any]:
    """The same metrics over equal windows before and after ``promoted_at``.

    The windows are ``[P - d, P)`` and ``[P, P + d)`` with ``d = min(span, now - settle - P)``
    where ``settle`` is the longer of the attribution window and the feedback grace: every
    exposure of the "after" window has had its full time to convert, so the two sides are
    measured alike. Until ``d`` reaches an hour (or ``span``, if shorter) the comparison is
    ``pending``, with the time it will be ready. Each side has
    totals and groups by day, scene and model version per basis; ``difference`` has
    ``after - before`` of each rate with Newcombe's 95% interval and of GMV per exposure with
    a Welch interval.
    """
    settle = max(window, grace)
    # Whole minutes: the windows read better and nothing is measured finer than that.
    length = min(span, now - settle - promoted_at) // timedelta(minutes=1) * timedelta(minutes=1)
    shortest = min(span, MIN_COMPARISON)
    base: dict[str, Any] = {
        "model_version": model_version,
        "promoted_at": promoted_at.isoformat(),
        "span_hours": span.total_seconds() / 3600,
    }
    if length < shortest or length <= timedelta(0):
        ready = promoted_at + settle + shortest
        return {**base, "status": "pending", "ready_at": ready.isoformat()}
    sides = {}
    for name, start in (("before", promoted_at - length), ("after", promoted_at)):
        until = start + length + window
        sides[name] = evaluate_grouped(
            exposure_log,
            start=start,
            end=start + length,
            interactions=[i for i in interactions if start <= i.ts < until],
            window=window,
            feedback_log=feedback_log,
            grace=grace,
            prices=prices,
            dimensions=("day", "scene", "model_version"),
        )
    summaries = {}
    for name, result in sides.items():
        data = result.to_dict()
        summaries[name] = {
            "start": data["start"],
            "end": data["end"],
            "totals": data["totals"],
            "breakdown": data["breakdown"],
            "attribution": data["attribution"],
        }
    return {
        **base,
        "status": "ready",
        "hours": length.total_seconds() / 3600,
        **summaries,
        "difference": {
            basis: counts_difference(sides["before"].totals[basis], sides["after"].totals[basis])
            for basis in BASES
        },
    }
