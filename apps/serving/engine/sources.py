"""The serving vocabulary for degradation: where an answer came from and why.

These are `StrEnum`s rather than Django `TextChoices` because the engine never imports Django
(CONVENTIONS rule 3); a `StrEnum` member is a `str`, so the response serializer, the log line
and the Prometheus label all use the same value (rule 9).
"""

from __future__ import annotations

from enum import StrEnum


class Source(StrEnum):
    """Which step of the degradation chain produced the items."""

    REDIS = "redis"
    LOCAL_STORE = "local_store"
    POPULAR = "popular"


class Reason(StrEnum):
    """Why an answer did not come from the normal source (None in the outcome when it did)."""

    REDIS_TIMEOUT = "redis_timeout"
    REDIS_CONNECTION = "redis_connection"
    BREAKER_OPEN = "breaker_open"
    # Redis answered, but with something we could not use (a corrupt value, an unexpected
    # reply): not in the brief's list, but folding it into "timeout" would mislead on-call.
    REDIS_ERROR = "redis_error"
    # Redis answered "nothing for this key" but the same bundle's local store had an answer:
    # Redis is missing data it should hold (restarted empty, flushed, half-published).
    REDIS_MISSING = "redis_missing"
    LOCAL_STORE_UNAVAILABLE = "local_store_unavailable"
    # The request budget ran out before a step could start: the step was skipped.
    BUDGET_EXHAUSTED = "budget_exhausted"
    # The ranker raised or returned unusable scores / took longer than its budget: the answer
    # keeps the fused recall order (not a fallback step, but a worse answer: degraded).
    RANKER_FAILED = "ranker_failed"
    RANKER_TIMEOUT = "ranker_timeout"
    # Every source that was asked answered, but had nothing for this key (a cold-start user):
    # not a dependency failure, so it does not mark the response degraded.
    EMPTY = "empty"


class Unavailable(StrEnum):
    """The typed cause carried by `StoreUnavailable`."""

    TIMEOUT = "timeout"
    CONNECTION = "connection"
    BREAKER_OPEN = "breaker_open"
    LOCAL_STORE = "local_store"


class StoreUnavailable(Exception):
    """A candidate store could not answer in time; `reason` says why.

    Raised instead of a library exception so that callers handle one type and never depend
    on redis-py or sqlite3 error classes.
    """

    def __init__(self, reason: Unavailable | str, detail: str = "") -> None:
        self.reason = Unavailable(reason)
        self.detail = detail
        super().__init__(f"{self.reason}: {detail}" if detail else str(self.reason))
