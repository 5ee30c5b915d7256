"""The degradation chain: Redis -> the bundle's local store -> the in-memory popular list.

Each step is labelled and counted, and no dependency failure escapes as an exception: the
caller always gets `(items, source, reason)` (CONVENTIONS rule 9).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, NamedTuple, TypeVar

from apps.serving.engine.sources import Reason, Source, StoreUnavailable, Unavailable

logger = logging.getLogger(__name__)

T = TypeVar("T")

# The counter callback gets (step, outcome): outcome is "ok", "empty", "skipped_budget" or a
# Reason value. The metrics layer maps it onto a Prometheus counter with those two labels.
StepCounter = Callable[[Source, str], None]

OK = "ok"
EMPTY = "empty"
SKIPPED_BUDGET = "skipped_budget"

_REDIS_REASONS = {
    Unavailable.TIMEOUT: Reason.REDIS_TIMEOUT,
    Unavailable.CONNECTION: Reason.REDIS_CONNECTION,
    Unavailable.BREAKER_OPEN: Reason.BREAKER_OPEN,
}


@dataclass(frozen=True)
class Deadline:
    """A request's total time budget, passed down so later steps can see what is left."""

    expires_at: float
    clock: Callable[[], float] = field(default=time.monotonic, compare=False)

    @classmethod
    def after(cls, seconds: float, clock: Callable[[], float] = time.monotonic) -> Deadline:
        """A deadline `seconds` from now on `clock`."""
        return cls(clock() + seconds, clock)

    def remaining(self) -> float:
        """Seconds left, never negative."""
        return max(0.0, self.expires_at - self.clock())

    def expired(self) -> bool:
        """True once the budget is spent."""
        return self.clock() >= self.expires_at


class Outcome(NamedTuple, Generic[T]):
    """`(items, source, reason)`; unpacks as a 3-tuple."""

    items: Sequence[T]
    source: Source
    reason: Reason | None

    @property
    def degraded(self) -> bool:
        """True when a dependency failure (not a cold-start miss) changed the answer."""
        return self.reason is not None and self.reason is not Reason.EMPTY


def _no_count(step: Source, outcome: str) -> None:
    return None


def recommend_with_fallback(
    primary: Callable[[], Sequence[T]] | None,
    local: Callable[[], Sequence[T]],
    popular: Callable[[], Sequence[T]],
    *,
    deadline: Deadline | None = None,
    count: StepCounter | None = None,
) -> Outcome[T]:
    """Try Redis (`primary`), then the local store, then the popular list.

    `primary=None` means no Redis is configured: the local store is then the normal source
    and an answer from it is not degraded. A step that answers with nothing passes on to the
    next one. `reason` is the first thing that went wrong (the root cause); each step's own
    outcome goes to `count`. A step that would start after `deadline` is skipped. `popular`
    is in memory and always runs; if even it raises, the answer is an empty list.
    """
    counter = count or _no_count
    reason: Reason | None = None

    def note(new: Reason) -> None:
        nonlocal reason
        if reason is None or reason is Reason.EMPTY:
            reason = new

    steps: list[tuple[Source, Callable[[], Sequence[T]]]] = []
    if primary is not None:
        steps.append((Source.REDIS, primary))
    steps.append((Source.LOCAL_STORE, local))

    for source, fn in steps:
        if deadline is not None and deadline.expired():
            counter(source, SKIPPED_BUDGET)
            note(Reason.BUDGET_EXHAUSTED)
            continue  # the clock only moves on: every later step is skipped (and counted)
        try:
            items = fn()
        except StoreUnavailable as exc:
            failure = (
                _REDIS_REASONS.get(exc.reason, Reason.REDIS_ERROR)
                if source is Source.REDIS
                else Reason.LOCAL_STORE_UNAVAILABLE
            )
            counter(source, failure)
            note(failure)
            logger.warning("serving step %s unavailable: %s", source, exc)
            continue
        except Exception:
            # Not an outage we know about (bad data, a bug): still never a 5xx, but logged
            # with the traceback so it is not hidden behind the fallback.
            failure = (
                Reason.REDIS_ERROR if source is Source.REDIS else Reason.LOCAL_STORE_UNAVAILABLE
            )
            counter(source, failure)
            note(failure)
            logger.exception("serving step %s failed unexpectedly", source)
            continue
        if items:
            counter(source, OK)
            if source is Source.LOCAL_STORE and primary is not None and reason is Reason.EMPTY:
                # Redis and the local store hold the same bundle's lists: an empty Redis
                # answer for a key the store knows means Redis lost data (not a cold start).
                reason = Reason.REDIS_MISSING
            return Outcome(items, source, reason)
        counter(source, EMPTY)
        if reason is None:
            reason = Reason.EMPTY

    try:
        items = popular()
    except Exception:
        logger.exception("in-memory popular list failed")
        items = []
    counter(Source.POPULAR, OK if items else EMPTY)
    return Outcome(items, Source.POPULAR, reason)
