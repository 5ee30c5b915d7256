"""Django glue for extraction: watermarks and locks as rows, each write one conditional UPDATE.

Implements the ``WatermarkStore`` and ``LockManager`` protocols of ``apps.pipeline.extract``.
Neither class holds a database transaction open: every decision is a single UPDATE whose WHERE
clause states the condition, so the database serialises concurrent runs for us
(healthchecks-style claiming).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from django.db.models import F, Q
from django.utils import timezone

from apps.pipeline.models import ExtractionLock, Watermark


class DjangoWatermarkStore:
    """Watermarks in ``pipeline.Watermark``; the CAS checks version and fencing token."""

    def get(self, source: str, table: str) -> tuple[dict[str, Any] | None, int]:
        """The stored value and version; ``(None, 0)`` before the first run."""
        row = (
            Watermark.objects.filter(source=source, table=table)
            .values_list("value", "version")
            .first()
        )
        if row is None:
            return None, 0
        return row[0], row[1]

    def compare_and_set(
        self,
        source: str,
        table: str,
        expected_version: int,
        new_value: dict[str, Any] | None,
        fence_token: int,
        rows_total: int,
    ) -> bool:
        """Store ``new_value`` only if nobody moved the version and no newer token wrote it."""
        Watermark.objects.get_or_create(source=source, table=table)
        updated = Watermark.objects.filter(
            source=source,
            table=table,
            version=expected_version,
            fence_token__lte=fence_token,
        ).update(
            value=new_value,
            version=F("version") + 1,
            fence_token=fence_token,
            rows_total=rows_total,
            # QuerySet.update() skips auto_now.
            updated_at=timezone.now(),
        )
        return updated == 1

    def mark_reconciled(self, source: str, table: str) -> None:
        """Record when deletes were last reconciled (shown in the admin)."""
        Watermark.objects.filter(source=source, table=table).update(
            last_reconciled_at=timezone.now()
        )


class DjangoLockManager:
    """Leases in ``pipeline.ExtractionLock``; every claim increments the fencing token."""

    def __init__(self, clock: Callable[[], dt.datetime] = timezone.now) -> None:
        self.clock = clock

    def acquire(self, name: str, holder: str, ttl_seconds: int) -> int | None:
        """Claim the lease if it is free or expired; return the new token, else None."""
        if not holder:
            raise ValueError("holder must name the claimant (an empty holder means free)")
        now = self.clock()
        ExtractionLock.objects.get_or_create(name=name)
        claimed = ExtractionLock.objects.filter(
            Q(holder="") | Q(expires_at__isnull=True) | Q(expires_at__lte=now),
            name=name,
        ).update(
            holder=holder,
            token=F("token") + 1,
            acquired_at=now,
            expires_at=now + dt.timedelta(seconds=ttl_seconds),
        )
        if claimed != 1:
            return None
        # Nobody else can claim it before it expires, so this reads our own claim.
        return (
            ExtractionLock.objects.filter(name=name, holder=holder, acquired_at=now)
            .values_list("token", flat=True)
            .first()
        )

    def release(self, name: str, token: int) -> None:
        """Free the lease, unless a newer claim (another token) holds it now."""
        ExtractionLock.objects.filter(name=name, token=token).update(holder="", expires_at=None)
