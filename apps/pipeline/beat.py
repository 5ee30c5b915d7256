"""A database beat scheduler with a leader lock, so a second beat is a hot standby.

django-celery-beat's ``DatabaseScheduler`` assumes exactly one beat: two (a rolling deploy, a
scaled service, an operator starting one by hand) send every periodic task twice. Here every
beat process competes for one Redis lease, like celery-redbeat: ``SET key token NX PX ttl``
takes it, a compare-and-PEXPIRE script renews it on every tick, a compare-and-DEL releases it
on shutdown. Only the holder sends due tasks; the others check the lease every third of its
TTL and take over within one TTL of the leader's death. A leader that cannot renew (Redis
down, its lease taken over after a long pause) stops sending at once. The pipeline's triggers
are also atomic (``services.pipeline_run_trigger``), so a duplicate that slips through (a
leader paused past its TTL, or killed between a send and saving it) still yields one run.

Shutdown and saves. Celery's SIGTERM handler closes the scheduler (a final sync, here also
the lease's release) from inside whatever the loop was doing and then raises SystemExit.
When that lands in the save of a task's last run, the stock sync's ``close_old_connections``
has just closed the connection under it, and Django can turn the SystemExit into an ordinary
error that ``apply_entry`` logs and swallows: the beat then went on ticking, took the lease
it had just released, re-read a schedule whose last save had been cut off and sent a task a
second time at once (tests/reliability/test_celery_faults.py saw both). So a closed
scheduler never leads again and ends the loop itself, and a task's last run stays marked
unsaved until a save of it succeeds: the close in the handler saves it (before the lease goes
to the standby, which reads it), a failed save is retried at the next sync, and a schedule
re-read from the database keeps this process's newer last run of an unsaved entry.

Settings (Celery namespace): ``CELERY_BEAT_LEADER_LOCK_URL`` (a Redis URL; empty: no lock,
the plain scheduler), ``CELERY_BEAT_LEADER_LOCK_SECONDS`` (the lease's TTL) and
``CELERY_BEAT_LEADER_LOCK_KEY``.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from typing import Any

from django.core.exceptions import ObjectDoesNotExist
from django.db import DatabaseError, InterfaceError, close_old_connections
from django_celery_beat.schedulers import DatabaseScheduler

logger = logging.getLogger(__name__)

DEFAULT_KEY = "recoplatform:beat:leader"

# KEYS[1] = lease key, ARGV[1] = our token, ARGV[2] = TTL in ms. 1 when we (still) hold it.
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""


class LeaderLease:
    """One Redis lease with a token unique to this process; every operation is one round trip.

    Short socket timeouts and no retries: a beat that cannot reach Redis must step down
    quickly rather than keep sending on a lease it may have lost.
    """

    def __init__(self, client: Any, key: str, ttl_seconds: float, token: str = "") -> None:
        self.client = client
        self.key = key
        self.ttl_ms = max(1, int(ttl_seconds * 1000))
        self.token = token or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    @classmethod
    def from_url(cls, url: str, key: str, ttl_seconds: float) -> LeaderLease:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        timeout = min(2.0, ttl_seconds / 3)
        client = redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )
        return cls(client, key, ttl_seconds)

    def acquire_or_renew(self) -> bool:
        """Hold the lease for another TTL; False when another process holds it."""
        if self.client.eval(_RENEW, 1, self.key, self.token, self.ttl_ms):
            return True
        return bool(self.client.set(self.key, self.token, nx=True, px=self.ttl_ms))

    def release(self) -> bool:
        """Give the lease up now (only if we hold it), so a standby need not wait for the TTL."""
        return bool(self.client.eval(_RELEASE, 1, self.key, self.token))

    def holder(self) -> str | None:
        value = self.client.get(self.key)
        return value.decode() if isinstance(value, bytes) else value


class LeaderDatabaseScheduler(DatabaseScheduler):
    """``DatabaseScheduler`` that sends due tasks only while it holds the beat leader lease."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.is_leader = False
        self.closed = False
        self.lease: LeaderLease | None = None
        super().__init__(*args, **kwargs)
        conf = self.app.conf
        url = conf.get("beat_leader_lock_url") or ""
        ttl = float(conf.get("beat_leader_lock_seconds") or 30)
        self.standby_interval = max(0.2, ttl / 3)
        if url:
            key = conf.get("beat_leader_lock_key") or DEFAULT_KEY
            self.lease = LeaderLease.from_url(url, key, ttl)
            logger.info("beat leader lock %s (TTL %.0f s) as %s", key, ttl, self.lease.token)
        else:
            logger.warning("beat leader lock: no CELERY_BEAT_LEADER_LOCK_URL, run one beat only")

    def _lead(self) -> bool:
        """Take or renew the lease; log and act on every change of leadership."""
        assert self.lease is not None
        try:
            leading = self.lease.acquire_or_renew()
        except Exception as exc:  # any Redis failure: we may have lost the lease
            logger.warning("beat leader lock unreachable (%s): not sending tasks", exc)
            leading = False
        if leading and not self.is_leader:
            logger.info("beat leader lock taken by %s: this beat sends tasks", self.lease.token)
            # Re-read the schedule: while on standby this process's copy of each entry's
            # last run went stale; the leader saved its own after every task it sent.
            self._initial_read = True
            self._heap = None
        elif self.is_leader and not leading:
            logger.warning("beat leader lock lost by %s: standing by", self.lease.token)
        self.is_leader = leading
        return leading

    def tick(self, *args: Any, **kwargs: Any) -> float:
        if self.closed:  # the shutdown's SystemExit was swallowed (see the module docstring)
            raise SystemExit("beat scheduler closed")
        if self.lease is None:
            return super().tick(*args, **kwargs)
        if not self._lead():
            return self.standby_interval
        # Wake up in time to renew the lease before it expires.
        return min(super().tick(*args, **kwargs), self.standby_interval)

    def reserve(self, entry: Any) -> Any:
        """The stock reserve, and the schedule keeps the advanced entry.

        The stock one advances the model but leaves the schedule holding the old entry, whose
        own last run is the previous one; a heap rebuilt from the schedule without a database
        read (a change noticed just before a send invalidates the heap) then found the task
        due again and sent it twice, 30 ms apart (tests/reliability/test_celery_faults.py).
        """
        new_entry = super().reserve(entry)
        if self._schedule is not None and new_entry.name in self._schedule:
            self._schedule[new_entry.name] = new_entry
        return new_entry

    def sync(self) -> None:
        """Save each entry's last run; an entry stays dirty until a save of it succeeds.

        The stock sync pops an entry before saving it and drops it when the save raises a
        database error, so a save that failed (a locked database) or was interrupted (the
        SIGTERM handler's close runs a sync inside this one) was never retried. Here a sync
        that runs inside another one sees the entry still dirty and saves it.
        """
        try:
            close_old_connections()
        except (DatabaseError, InterfaceError) as exc:
            logger.warning("beat: database unreachable, schedule not saved (%s)", exc)
            return
        for name in list(self._dirty):
            entry = (self._schedule or {}).get(name)
            if entry is None:
                self._dirty.discard(name)
                continue
            try:
                self._save(entry)
            except ObjectDoesNotExist:  # deleted meanwhile: nothing to save
                pass
            except (DatabaseError, InterfaceError) as exc:
                logger.warning("beat: last run of %s not saved, retried next sync (%s)", name, exc)
                continue
            self._dirty.discard(name)

    @staticmethod
    def _save(entry: Any) -> None:
        """``entry.save()``, unless the database already holds a later run (saved by a beat
        that took the lease while this one's save kept failing): never move it backwards."""
        model = entry.model
        saved = (
            type(model)._default_manager.filter(pk=model.pk).values_list("last_run_at", flat=True)
        )
        latest = saved.first()
        if latest and model.last_run_at and latest > model.last_run_at:
            return
        entry.save()

    def all_as_schedule(self) -> dict[str, Any]:
        """The schedule from the database, keeping this process's last run of any entry whose
        save has not succeeded yet (else a re-read would make it due again at once)."""
        fresh = super().all_as_schedule()
        for name in self._dirty:
            old, new = (self._schedule or {}).get(name), fresh.get(name)
            # The model, not the entry: sending advances the model both entries share.
            last = old.model.last_run_at if old is not None else None
            if new is None or not last:
                continue
            if not new.model.last_run_at or last > new.model.last_run_at:
                new.last_run_at = new.model.last_run_at = last
                new.model.total_run_count = old.model.total_run_count
        return fresh

    def close(self) -> None:
        if self.closed:  # the SIGTERM handler's close, then the service loop's own
            return
        self.closed = True
        super().close()
        if self.lease is not None and self.is_leader:
            try:
                self.lease.release()
                logger.info("beat leader lock released by %s", self.lease.token)
            except Exception as exc:
                logger.warning("beat leader lock not released (%s): expires by itself", exc)
            self.is_leader = False
