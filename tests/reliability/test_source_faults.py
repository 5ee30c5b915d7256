"""Scenario 6: the source databases fail during extraction, and the API keeps serving.

Against the real stage code (`services.pipeline_run_execute` -> `pipeline_stage_execute` ->
`_stage_extract` -> `extract.extract_source`, Django watermark store and lock), the demo
business and Matomo databases are loaded into a private mariadbd (tests/reliability/
mariadb_fixtures.py) and extracted in small pages (50 rows). Each scenario first runs a clean
extraction (every watermark at version 1), then writes new, updated and deleted rows at the
source, then runs the next incremental extraction with a fault:

(a) the source mariadbd is SIGKILLed right after the first page of `business.user` is durable
    in the lake, stays down for one more attempt (connection refused), then restarts on the
    same data directory;
(b) the source is SIGSTOPped at the same point (a hung peer: sockets open, nothing answers)
    and resumed after two attempts, with a 2 s read and connect timeout;
(c) the Matomo database is unreachable through the fault proxy (blackhole, then reset) while
    the business database is healthy, then reachable again.

Each time the stage must fail with a classified transient error (`TransientSourceError`, the
driver's code recorded), be retried with growing backoff, never move a watermark while the
fault lasts, and the retry must end with the lake holding exactly the source's rows (none
missing, duplicated, extra or stale) and every watermark advanced once. The retry delays are
the production policy's (`errors.STAGE_RETRY`); the run loop waits at most HOLD_S of each, so
the module stays short.

(d) All along, the production server (gunicorn, demo bundle, private Redis) is configured with
the faulted source URLs and polled; every request sent during a fault window must be a 200.
Serving never reads the source databases (its data is the model bundle and Redis), so this
shows that no request path, /ready included, depends on them.

Controls: (a) an uninterrupted extraction of the same source into a fresh lake equals the
faulted run's lake; (b) with the read timeout disabled the same SIGSTOP blocks the stage for
as long as the source hangs (CONTROL_HANG_S, three read timeouts), instead of failing it within
the timeout; (c) the proxy passes traffic in `pass` mode before the fault, so the failures come
from the fault modes. Results: benchmarks/results/reliability/s6_*.json.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import re
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import sqlalchemy as sa

from apps.pipeline import demo, errors, services
from apps.pipeline.lake import Lake, rows_to_arrow, to_frame
from apps.pipeline.models import (
    ExtractionLock,
    ExtractionRun,
    PipelineRun,
    RunStatus,
    Stage,
    StageRun,
    Watermark,
)
from apps.pipeline.sources import db
from apps.pipeline.sources.contract import TableSpec
from tests.reliability.faultproxy import BLACKHOLE, PASS, RESET, fault_proxy
from tests.reliability.mariadb_fixtures import MariaDBProcess, private_mariadb
from tests.reliability.serving_fixtures import (
    DemoSite,
    RedisProcess,
    Server,
    percentile,
    running_server,
    write_result,
)

pytestmark = [pytest.mark.django_db, pytest.mark.slow]

# Small pages, so that a fault can fall between two pages of one table.
PAGE_ROWS = 50
# The source timeouts of the faulted runs (production defaults: 5 s connect, 120 s read).
READ_TIMEOUT_S = 2
CONNECT_TIMEOUT_S = 2
# Scenario criterion: a hung attempt fails within the read timeout (the page in flight) plus
# one connect timeout (the next table, after which the source counts as unreachable) plus this.
MARGIN_S = 3.0
# The control's hang: three read timeouts, after which the test resumes the source.
CONTROL_HANG_S = 3 * READ_TIMEOUT_S
# At most this much of each retry delay is actually waited (the delay itself is recorded).
HOLD_S = 1.0
# Demo data: the same small marketplace as the Celery worker tests, ending an hour ago (every
# row older than any safety lag).
DEMO = demo.DemoConfig(users=150, items=60, actions=6000, days=20, seed=7)
BUSINESS = Stage.EXTRACT_BUSINESS
MATOMO = Stage.EXTRACT_MATOMO


# --- the private source server ----------------------------------------------------------------


@dataclass
class Sources:
    """The private mariadbd with the demo `business` and `matomo` databases."""

    server: MariaDBProcess
    business_url: str
    matomo_url: str

    def ensure_running(self) -> None:
        """Whatever a failed test left behind: a resumed, running server."""
        if self.server.stopped:
            self.server.resume()
        if self.server.process is None or self.server.process.poll() is not None:
            self.server.start()

    def engine(self, name: str) -> sa.Engine:
        return db.make_engine(self.business_url if name == "business" else self.matomo_url)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sources]:
    with private_mariadb(tmp_path_factory.mktemp("s6-mariadb")) as server:
        end = dt.datetime.now(dt.UTC).replace(tzinfo=None, microsecond=0) - dt.timedelta(hours=1)
        business = db.make_engine(server.create_database("business"))
        matomo = db.make_engine(server.create_database("matomo"))
        try:
            demo.generate(business, matomo, dataclasses.replace(DEMO, end=end))
        finally:
            business.dispose()
            matomo.dispose()
        yield Sources(server, server.url("business"), server.url("matomo"))


@pytest.fixture(autouse=True)
def _sources_running(sources: Sources) -> Iterator[None]:
    sources.ensure_running()
    yield
    sources.ensure_running()


# --- the API under observation ----------------------------------------------------------------


class ApiProbe:
    """Polls the production server from a thread, about 15 requests/s, for the whole module:
    for-you (ranked lists), popular, and /ready. Samples are (sent, status, latency_ms)."""

    def __init__(self, server: Server, paths: list[str]) -> None:
        self.server = server
        self.paths = paths
        self.samples: list[tuple[float, int | str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="s6-api-probe", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            path = self.paths[i % len(self.paths)]
            i += 1
            sent = time.monotonic()
            try:
                with urllib.request.urlopen(self.server.base + path, timeout=10) as resp:
                    resp.read()
                    status: int | str = resp.status
            except urllib.error.HTTPError as exc:
                status = exc.code
            except TimeoutError:
                status = "timeout"
            except OSError:
                status = "error"
            self.samples.append((sent, status, round((time.monotonic() - sent) * 1000, 1)))
            self._stop.wait(0.06)

    def window(self, start: float, end: float) -> dict[str, Any]:
        """What the API answered to the requests sent between `start` and `end`."""
        picked = [s for s in list(self.samples) if start <= s[0] <= end]
        statuses = Counter(s[1] for s in picked)
        return {
            "window_s": round(end - start, 2),
            "requests": len(picked),
            "http_200": statuses.get(200, 0),
            "http_5xx": sum(n for c, n in statuses.items() if isinstance(c, int) and c >= 500),
            "http_other": sum(
                n for c, n in statuses.items() if isinstance(c, int) and c != 200 and c < 500
            ),
            "client_timeouts": statuses.get("timeout", 0),
            "connection_errors": statuses.get("error", 0),
            "p50_ms": percentile([s[2] for s in picked], 0.5),
            "max_ms": percentile([s[2] for s in picked], 1.0),
        }


@pytest.fixture(scope="module")
def api(
    demo_site: DemoSite, sources: Sources, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ApiProbe]:
    workdir = tmp_path_factory.mktemp("s6-api")
    redis = RedisProcess(workdir / "redis")
    try:
        demo_site.publish(redis.url)
        # The serving processes get the very source URLs the faults hit: if any request path
        # touched a source database, the fault windows would show it.
        with running_server(
            demo_site,
            workdir / "server",
            redis.url,
            settings={"BUSINESS_DB_URL": sources.business_url, "MATOMO_DB_URL": sources.matomo_url},
        ) as server:
            paths = [
                *demo_site.for_you_paths(limit=10, users=20),
                "/api/v1/popular?limit=10",
                "/ready",
            ]
            probe = ApiProbe(server, paths)
            probe.start()
            try:
                yield probe
            finally:
                probe.stop()
    finally:
        redis.close()


# --- pipeline helpers -------------------------------------------------------------------------


def configure(
    settings: Any, monkeypatch: pytest.MonkeyPatch, sources: Sources, **urls: str
) -> None:
    """Point the pipeline at the private sources, with small pages and short timeouts."""
    settings.BUSINESS_DB_URL = urls.get("business", sources.business_url)
    settings.MATOMO_DB_URL = urls.get("matomo", sources.matomo_url)
    settings.RECO = {**settings.RECO, "EXTRACT_BATCH_ROWS": PAGE_ROWS}
    monkeypatch.setenv(db.READ_TIMEOUT_ENV, str(READ_TIMEOUT_S))
    monkeypatch.setenv(db.CONNECT_TIMEOUT_ENV, str(CONNECT_TIMEOUT_S))
    monkeypatch.delenv(services.TEST_PAUSE_ENV, raising=False)


def fresh_platform(settings: Any, data_dir: Path) -> None:
    """A new DATA_DIR and no watermarks or locks: as on a platform that never extracted."""
    settings.DATA_DIR = data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    Watermark.objects.all().delete()
    ExtractionLock.objects.all().delete()


def run_stages(
    stages: tuple[str, ...],
    *,
    on_stage: Callable[[str], Callable[[int], None] | None] | None = None,
    sleep: Callable[[float], None] | None = None,
) -> PipelineRun:
    """One pipeline run of `stages` through the production in-process loop."""
    run = services.pipeline_run_create(kind="incremental", triggered_by="s6")
    done = services.pipeline_run_execute(
        run_id=run.pk, stages=stages, on_stage=on_stage, sleep=sleep or (lambda s: None)
    )
    assert done is not None
    return done


def watermarks(source: str) -> dict[str, tuple[int, Any]]:
    return {w.table: (w.version, w.value) for w in Watermark.objects.filter(source=source)}


def stage_of(run: PipelineRun, stage: str) -> StageRun:
    return StageRun.objects.get(pipeline_run_id=run.pk, stage=stage)


def driver_codes(text: str) -> list[int]:
    """MySQL error codes named in an error text, e.g. `(2013, 'Lost connection ...')`."""
    return sorted({int(c) for c in re.findall(r"\((\d{4}),", text)})


def first_driver_error(text: str) -> str | None:
    """The first `(code, 'message')` a stage error quotes from the driver."""
    match = re.search(r"\((\d{4}), [\"'](.*?)[\"']\)", text)
    return f"{match.group(1)} {match.group(2)}" if match else None


def retry_figures(stage_run: StageRun) -> dict[str, Any]:
    retries = (stage_run.detail or {}).get("retries", [])
    delays = [r["retry_in"] for r in retries]
    return {
        "attempts": stage_run.attempts,
        "status": stage_run.status,
        "error_class": sorted({r["error"].split(":", 1)[0] for r in retries}),
        "driver_error_codes_by_failed_attempt": [driver_codes(r["error"]) for r in retries],
        "first_driver_error_by_failed_attempt": [first_driver_error(r["error"]) for r in retries],
        "retry_in_s": delays,
        "retry_in_grows": all(b > a for a, b in itertools.pairwise(delays)),
        "retry_policy": {
            "max_retries": errors.STAGE_RETRY.max_retries,
            "base_seconds": errors.STAGE_RETRY.base_seconds,
        },
    }


class Retries:
    """The `sleep` of the run loop: records each retry delay and what the platform looked
    like at that moment, waits at most HOLD_S of it, then runs the test's action for it."""

    def __init__(self, source: str, actions: dict[int, Callable[[], None]]) -> None:
        self.source = source
        self.actions = actions
        self.delays: list[float] = []
        self.watermarks: list[dict[str, tuple[int, Any]]] = []
        self.stage_status: list[str] = []
        self.at: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        self.at.append(time.monotonic())
        self.watermarks.append(watermarks(self.source))
        self.stage_status.append(
            StageRun.objects.filter(stage=f"extract_{self.source}")
            .order_by("-pk")
            .values_list("status", flat=True)
            .first()
            or ""
        )
        time.sleep(min(seconds, HOLD_S))
        action = self.actions.get(len(self.delays))
        if action is not None:
            action()


class FaultAtFirstPage:
    """`on_stage` for the run loop: `inject` runs once, right after the first page of `stage`
    is durable in the lake (before any watermark of the run moves)."""

    def __init__(self, stage: str, inject: Callable[[], None]) -> None:
        self.stage = stage
        self.inject = inject
        self.at: float | None = None
        self.rows_before = 0
        self.token: int | None = None

    def __call__(self, stage: str) -> Callable[[int], None] | None:
        if stage != self.stage:
            return None

        def progress(rows: int) -> None:
            if self.at is None:
                self.rows_before = rows
                self.token = ExtractionLock.objects.get(
                    name=f"extract:{stage.removeprefix('extract_')}"
                ).token
                self.at = time.monotonic()
                self.inject()

        return progress


# --- source changes and the comparison with the lake -------------------------------------------


def _columns(conn: sa.Connection, table: str, without: str) -> list[str]:
    rows = conn.execute(
        sa.text(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = DATABASE()"
            " AND table_name = :t ORDER BY ordinal_position"
        ),
        {"t": table},
    ).fetchall()
    return [r[0] for r in rows if r[0] != without]


def change_business(sources: Sources, tag: str) -> dict[str, int]:
    """New users and orders, updated datasets and deleted tasks, all inside the next window
    (updated 30 s ago: above the watermark minus the lookback, below NOW() minus the lag)."""
    engine = sources.engine("business")
    recent = "UTC_TIMESTAMP() - INTERVAL 30 SECOND"
    try:
        with engine.begin() as conn:
            users = conn.execute(
                sa.text(
                    "INSERT INTO `user` (username, company_name, industry, province, city,"
                    f" created_at, updated_at) SELECT CONCAT(:tag, id), company_name, industry,"
                    f" province, city, {recent}, {recent} FROM `user` ORDER BY id LIMIT 120"
                ),
                {"tag": f"{tag}-"},
            ).rowcount
            orders = conn.execute(
                sa.text(
                    "INSERT INTO api_order (order_no, user_id, dataset_id, amount, status,"
                    f" created_at, updated_at) SELECT CONCAT(:tag, order_no), user_id,"
                    f" dataset_id, amount, status, {recent}, {recent} FROM api_order"
                    " ORDER BY id LIMIT 60"
                ),
                {"tag": f"{tag}-"},
            ).rowcount
            datasets = conn.execute(
                sa.text(
                    f"UPDATE dataset SET price = price + 1, updated_at = {recent}"
                    " ORDER BY id LIMIT 20"
                )
            ).rowcount
            deleted = conn.execute(sa.text("DELETE FROM task ORDER BY id LIMIT 5")).rowcount
    finally:
        engine.dispose()
    return {"users_added": users, "orders_added": orders, "datasets_updated": datasets,
            "tasks_deleted": deleted}  # fmt: skip


def change_matomo(sources: Sources) -> dict[str, int]:
    """New actions (ids above the watermark) and visits that went on (a recent last action)."""
    engine = sources.engine("matomo")
    try:
        with engine.begin() as conn:
            cols = ", ".join(
                f"`{c}`" for c in _columns(conn, "matomo_log_link_visit_action", "idlink_va")
            )
            actions = conn.execute(
                sa.text(
                    f"INSERT INTO matomo_log_link_visit_action ({cols}) SELECT {cols}"
                    " FROM matomo_log_link_visit_action ORDER BY idlink_va LIMIT 150"
                )
            ).rowcount
            visits = conn.execute(
                sa.text(
                    "UPDATE matomo_log_visit SET visit_total_actions = visit_total_actions + 1,"
                    " visit_last_action_time = UTC_TIMESTAMP() - INTERVAL 40 SECOND"
                    " ORDER BY idvisit LIMIT 80"
                )
            ).rowcount
    finally:
        engine.dispose()
    return {"actions_added": actions, "visits_updated": visits}


def source_frame(engine: sa.Engine, spec: TableSpec) -> pd.DataFrame:
    columns = list(spec.columns)
    with engine.connect() as conn:
        q = conn.dialect.identifier_preparer.quote
        rows = conn.execute(
            sa.text(f"SELECT {', '.join(q(c) for c in columns)} FROM {q(spec.physical)}")
        ).fetchall()
    return to_frame(rows_to_arrow(rows, columns, spec.columns), spec.columns)


def _same(a: pd.Series, b: pd.Series) -> pd.Series:
    return (a == b) | (a.isna() & b.isna())


def compare(lake: Lake, sources: Sources, source: str) -> dict[str, Any]:
    """Per table and in total: the lake's current view against the source's rows."""
    spec = services.get_contract().sources[source]
    engine = sources.engine(source)
    tables: dict[str, dict[str, int]] = {}
    try:
        for name, table in spec.tables.items():
            pk = list(table.primary_key)
            src = source_frame(engine, table)
            got = lake.read_table(source, name) if lake.exists(source, name) else src.iloc[:0]
            merged = src.merge(
                got.drop_duplicates(pk), on=pk, how="outer", suffixes=("_s", "_l"), indicator=True
            )
            both = merged[merged["_merge"] == "both"]
            stale = pd.Series(False, index=both.index)
            for column in (c for c in table.columns if c not in pk):
                stale |= ~_same(both[f"{column}_s"], both[f"{column}_l"])
            tables[name] = {
                "source_rows": len(src),
                "lake_rows": len(got),
                "rows_missing": int((merged["_merge"] == "left_only").sum()),
                "rows_duplicated": int(got.duplicated(pk).sum()),
                "rows_extra": int((merged["_merge"] == "right_only").sum()),
                "rows_stale": int(stale.sum()),
            }
    finally:
        engine.dispose()
    keys = (
        "source_rows",
        "lake_rows",
        "rows_missing",
        "rows_duplicated",
        "rows_extra",
        "rows_stale",
    )
    return {"total": {k: sum(t[k] for t in tables.values()) for k in keys}, "tables": tables}


def lake_frames(lake: Lake, source: str) -> dict[str, pd.DataFrame]:
    spec = services.get_contract().sources[source]
    return {
        name: lake.read_table(source, name)
        .sort_values(list(table.primary_key))
        .reset_index(drop=True)
        for name, table in spec.tables.items()
    }


def lake_tokens(data_dir: Path, source: str) -> Counter[int]:
    """Lake files per fencing token (file names end in `-t<token>.parquet`)."""
    return Counter(
        int(path.stem.rsplit("-t", 1)[1])
        for path in (data_dir / "raw" / source).rglob("*.parquet")
        if not path.name.startswith(".")
    )


def exact(figures: dict[str, Any]) -> bool:
    total = figures["total"]
    return (
        total["rows_missing"] == total["rows_duplicated"] == 0
        and total["rows_extra"] == total["rows_stale"] == 0
        and total["lake_rows"] == total["source_rows"]
    )


def failed_extractions(run: PipelineRun, source: str) -> int:
    return ExtractionRun.objects.filter(
        stage_run__pipeline_run=run, source=source, status=RunStatus.FAILED
    ).count()


# --- (a) killed -------------------------------------------------------------------------------


def test_a_source_killed_mid_extraction_is_retried_with_backoff_and_catches_up_exactly(
    sources, api, settings, monkeypatch, tmp_path
):
    # Given a business source extracted once (every watermark at version 1)
    configure(settings, monkeypatch, sources)
    fresh_platform(settings, tmp_path / "faulted")
    first = run_stages((BUSINESS,))
    assert first.status == RunStatus.SUCCEEDED, first.error
    before = watermarks("business")
    assert {v for v, _ in before.values()} == {1}
    # and rows added, updated and deleted at the source since
    changes = change_business(sources, "s6a")

    # When the source's mariadbd is SIGKILLed right after the next run's first page is in
    # the lake, stays down for one retry, and restarts on the same data directory
    fault = FaultAtFirstPage(BUSINESS, sources.server.kill)
    refused: list[str] = []

    def probe_refused() -> None:
        try:
            sources.server.connect(timeout=1).close()
            refused.append("answered")
        except Exception as exc:
            refused.append(f"{type(exc).__name__}: {exc}")

    restarted_at: list[float] = []

    def restart() -> None:
        sources.server.start()
        restarted_at.append(time.monotonic())

    retries = Retries("business", {1: probe_refused, 2: restart})
    started = time.monotonic()
    run = run_stages((BUSINESS,), on_stage=fault, sleep=retries)
    seconds = time.monotonic() - started
    stage = stage_of(run, BUSINESS)
    figures = retry_figures(stage)
    caught_up = compare(services.lake(), sources, "business")
    after = watermarks("business")
    tokens = lake_tokens(settings.DATA_DIR, "business")
    api_window = api.window(fault.at or started, restarted_at[0] if restarted_at else started)

    # Control: an uninterrupted extraction of the same source into a fresh lake
    faulted_frames = lake_frames(services.lake(), "business")
    fresh_platform(settings, tmp_path / "control")
    control = run_stages((BUSINESS,))
    control_frames = lake_frames(services.lake(), "business")
    identical = (
        all(faulted_frames[t].equals(control_frames[t]) for t in faulted_frames)
        and faulted_frames.keys() == control_frames.keys()
    )

    report = {
        "what": "business mariadbd SIGKILLed after the first page of an incremental run; down "
        "for one more attempt (refused); restarted on the same data directory",
        "page_rows": PAGE_ROWS,
        "source_changes_since_last_run": changes,
        "fault": {
            "injected_after_rows_in_lake": fault.rows_before,
            "lake_files_of_the_killed_attempt": tokens.get(fault.token or -1, 0),
            "probe_while_down": refused[0] if refused else None,
            "mariadbd_starts": sources.server.starts,
        },
        **figures,
        "stage_status_at_each_retry": retries.stage_status,
        "failed_table_extractions_recorded": failed_extractions(run, "business"),
        "watermark_advanced_during_fault": any(w != before for w in retries.watermarks),
        "watermark_versions_before": sorted({v for v, _ in before.values()}),
        "watermark_versions_after": sorted({v for v, _ in after.values()}),
        "watermark_advances_by_the_run": sorted({after[t][0] - before[t][0] for t in after}),
        "catch_up": caught_up,
        "run_status": run.status,
        "run_seconds": round(seconds, 2),
        "control": {
            "what": "one uninterrupted extraction of the same source into a fresh lake",
            "status": control.status,
            "lake_equals_faulted_lake": identical,
            "rows": {t: len(f) for t, f in control_frames.items()},
        },
        "api_during_fault": api_window,
    }
    write_result("s6a_source_killed_mid_extraction", report)

    # Then the killed attempt had written a page and failed as transient, and so did the
    # attempt that found nothing listening; each retry waited longer than the one before
    assert fault.at is not None
    assert fault.rows_before == PAGE_ROWS
    assert report["fault"]["lake_files_of_the_killed_attempt"] >= 1, report
    assert refused, report
    assert refused[0].startswith("OperationalError"), report
    assert figures["attempts"] == 3, report
    assert figures["error_class"] == ["TransientSourceError"], report
    assert figures["driver_error_codes_by_failed_attempt"][1] == [2002], report  # refused
    assert set(figures["driver_error_codes_by_failed_attempt"][0]) <= {2006, 2013, 2002}, report
    assert figures["retry_in_grows"], report
    assert retries.stage_status == [RunStatus.PENDING, RunStatus.PENDING]
    # and no watermark moved while the source was down
    assert not report["watermark_advanced_during_fault"], report
    # and the retry caught up: exactly the source's rows, every watermark advanced once
    assert run.status == RunStatus.SUCCEEDED, run.error
    assert stage.status == RunStatus.SUCCEEDED
    assert exact(caught_up), caught_up
    assert report["watermark_advances_by_the_run"] == [1], report
    # and the control, never interrupted, ended with the very same lake
    assert control.status == RunStatus.SUCCEEDED, control.error
    assert identical, report
    # and the API answered every request sent while the source was down
    assert api_window["requests"] > 0, api_window
    assert api_window["http_200"] == api_window["requests"], api_window


# --- (b) hung ---------------------------------------------------------------------------------


def test_a_hung_source_fails_within_its_timeouts_and_the_retry_catches_up(
    sources, api, settings, monkeypatch, tmp_path
):
    configure(settings, monkeypatch, sources)

    # Control: with the read timeout disabled, a source hung (SIGSTOP) after the first page
    # blocks the stage for as long as it hangs; here CONTROL_HANG_S, then the test resumes it
    monkeypatch.setenv(db.READ_TIMEOUT_ENV, "0")
    fresh_platform(settings, tmp_path / "control")
    resumer = threading.Timer(CONTROL_HANG_S, sources.server.resume)
    control_fault = FaultAtFirstPage(BUSINESS, lambda: (sources.server.stop(), resumer.start()))
    try:
        control = run_stages((BUSINESS,), on_stage=control_fault)
    finally:
        resumer.join(CONTROL_HANG_S + 5)
    control_stage = stage_of(control, BUSINESS)
    control_blocked = time.monotonic() - (control_fault.at or 0.0)
    monkeypatch.setenv(db.READ_TIMEOUT_ENV, str(READ_TIMEOUT_S))

    # Given a business source extracted once
    fresh_platform(settings, tmp_path / "faulted")
    first = run_stages((BUSINESS,))
    assert first.status == RunStatus.SUCCEEDED, first.error
    before = watermarks("business")
    changes = change_business(sources, "s6b")

    # When the next run's source hangs (SIGSTOP) right after its first page, stays hung for
    # one more attempt, and is resumed (SIGCONT)
    fault = FaultAtFirstPage(BUSINESS, sources.server.stop)
    resumed_at: list[float] = []

    def resume() -> None:
        sources.server.resume()
        resumed_at.append(time.monotonic())

    retries = Retries("business", {2: resume})
    run = run_stages((BUSINESS,), on_stage=fault, sleep=retries)
    stage = stage_of(run, BUSINESS)
    figures = retry_figures(stage)
    assert fault.at is not None
    first_failure_s = round(retries.at[0] - fault.at, 2)
    second_failure_s = round(retries.at[1] - retries.at[0] - min(retries.delays[0], HOLD_S), 2)
    limit_s = READ_TIMEOUT_S + CONNECT_TIMEOUT_S + MARGIN_S
    caught_up = compare(services.lake(), sources, "business")
    after = watermarks("business")
    api_window = api.window(fault.at, resumed_at[0] if resumed_at else fault.at)

    report = {
        "what": "business mariadbd SIGSTOPped after the first page of an incremental run; hung "
        "for two attempts; SIGCONT",
        "page_rows": PAGE_ROWS,
        "read_timeout_s": READ_TIMEOUT_S,
        "connect_timeout_s": CONNECT_TIMEOUT_S,
        "production_defaults_s": {
            "connect": db.DEFAULT_CONNECT_TIMEOUT_S,
            "read": db.DEFAULT_READ_TIMEOUT_S,
        },
        "source_changes_since_last_run": changes,
        "first_attempt_failed_after_hang_s": first_failure_s,
        "second_attempt_failed_after_s": second_failure_s,
        "fail_within_limit_s": limit_s,
        **figures,
        "failed_table_extractions_recorded": failed_extractions(run, "business"),
        "watermark_advanced_during_fault": any(w != before for w in retries.watermarks),
        "watermark_advances_by_the_run": sorted({after[t][0] - before[t][0] for t in after}),
        "catch_up": caught_up,
        "run_status": run.status,
        "control": {
            "what": "same SIGSTOP with the read timeout disabled; the test resumes the source "
            f"after {CONTROL_HANG_S} s",
            "stage_blocked_s": round(control_blocked, 2),
            "attempts": control_stage.attempts,
            "status": control_stage.status,
        },
        "api_during_fault": api_window,
    }
    write_result("s6b_source_hung_mid_extraction", report)

    # Then the control shows the hang the timeout prevents: one attempt, blocked until resumed
    assert control_stage.attempts == 1, report
    assert control.status == RunStatus.SUCCEEDED, report
    assert control_blocked >= CONTROL_HANG_S - 0.5, report
    assert control_blocked > first_failure_s, report
    # and with the timeouts, each hung attempt failed within them, classified as transient
    assert first_failure_s <= limit_s, report
    assert second_failure_s <= CONNECT_TIMEOUT_S + MARGIN_S, report
    assert figures["attempts"] == 3, report
    assert figures["error_class"] == ["TransientSourceError"], report
    assert 2013 in figures["driver_error_codes_by_failed_attempt"][0], report
    assert figures["driver_error_codes_by_failed_attempt"][1] == [2013], report  # handshake
    assert figures["retry_in_grows"], report
    # and no watermark moved while the source hung; the retry caught up exactly
    assert not report["watermark_advanced_during_fault"], report
    assert run.status == RunStatus.SUCCEEDED, run.error
    assert exact(caught_up), caught_up
    assert report["watermark_advances_by_the_run"] == [1], report
    # and the API answered every request sent while the source hung
    assert api_window["requests"] > 0, api_window
    assert api_window["http_200"] == api_window["requests"], api_window


# --- (c) Matomo unreachable -------------------------------------------------------------------


def test_an_unreachable_matomo_fails_only_its_own_stage_and_catches_up(
    sources, api, settings, monkeypatch, tmp_path
):
    with fault_proxy(sources.server.port) as proxy:
        # Given Matomo reached through the fault proxy (passing traffic: the control), the
        # business database directly, and both extracted once
        configure(
            settings, monkeypatch, sources, matomo=sources.server.url("matomo", port=proxy.port)
        )
        fresh_platform(settings, tmp_path / "faulted")
        first = run_stages((BUSINESS, MATOMO))
        assert first.status == RunStatus.SUCCEEDED, first.error
        before = {s: watermarks(s) for s in ("business", "matomo")}
        changes = {**change_business(sources, "s6c"), **change_matomo(sources)}

        # When Matomo is unreachable: a blackhole (connections accepted, nothing answered),
        # then connections reset at once, then reachable again
        proxy.set_mode(BLACKHOLE)
        fault_at = time.monotonic()
        back_at: list[float] = []

        def back() -> None:
            proxy.set_mode(PASS)
            back_at.append(time.monotonic())

        retries = Retries("matomo", {1: lambda: proxy.set_mode(RESET), 2: back})
        matomo_started: list[float] = []

        def on_stage(stage: str) -> None:
            if stage == MATOMO:
                matomo_started.append(time.monotonic())

        run = run_stages((BUSINESS, MATOMO), on_stage=on_stage, sleep=retries)
        api_window = api.window(fault_at, back_at[0] if back_at else fault_at)

    business, matomo = stage_of(run, BUSINESS), stage_of(run, MATOMO)
    figures = retry_figures(matomo)
    after = {s: watermarks(s) for s in ("business", "matomo")}
    caught_up = {s: compare(services.lake(), sources, s) for s in ("business", "matomo")}
    first_failure_s = round(retries.at[0] - matomo_started[0], 2)

    report = {
        "what": "Matomo database unreachable through the fault proxy (blackhole, then reset), "
        "then reachable; business database healthy",
        "page_rows": PAGE_ROWS,
        "connect_timeout_s": CONNECT_TIMEOUT_S,
        "source_changes_since_last_run": changes,
        "matomo": {
            **figures,
            "blackholed_attempt_failed_after_s": first_failure_s,
            "failed_table_extractions_recorded": failed_extractions(run, "matomo"),
            "watermark_advanced_during_fault": any(
                w != before["matomo"] for w in retries.watermarks
            ),
            "watermark_advances_by_the_run": sorted(
                {after["matomo"][t][0] - before["matomo"][t][0] for t in after["matomo"]}
            ),
        },
        "business": {
            "attempts": business.attempts,
            "status": business.status,
            "watermark_advances_by_the_run": sorted(
                {after["business"][t][0] - before["business"][t][0] for t in after["business"]}
            ),
        },
        "catch_up": caught_up,
        "run_status": run.status,
        "control": {
            "what": "the first run went through the same proxy in pass mode",
            "status": first.status,
        },
        "api_during_fault": api_window,
    }
    write_result("s6c_matomo_unreachable", report)

    # Then the business stage was not affected: one attempt, its watermarks moved once
    assert business.attempts == 1, report
    assert business.status == RunStatus.SUCCEEDED, report
    assert report["business"]["watermark_advances_by_the_run"] == [1], report
    # and Matomo's stage failed as transient (no answer within the connect timeout, then a
    # reset handshake), was retried with growing delays, and never moved a watermark
    assert figures["attempts"] == 3, report
    assert figures["error_class"] == ["TransientSourceError"], report
    # (a reset handshake reads as 2013, or as 2002 when the reset beats the connect's end)
    codes = figures["driver_error_codes_by_failed_attempt"]
    assert codes[0] == [2013], report  # no handshake within the connect timeout
    assert codes[1] in ([2013], [2002]), report
    assert first_failure_s <= CONNECT_TIMEOUT_S + MARGIN_S, report
    assert figures["retry_in_grows"], report
    assert not report["matomo"]["watermark_advanced_during_fault"], report
    # and once Matomo was back, the run caught up: both sources exactly, each watermark once
    assert run.status == RunStatus.SUCCEEDED, run.error
    assert exact(caught_up["business"]), caught_up
    assert exact(caught_up["matomo"]), caught_up
    assert report["matomo"]["watermark_advances_by_the_run"] == [1], report
    # and the API answered every request sent while Matomo was unreachable
    assert api_window["requests"] > 0, api_window
    assert api_window["http_200"] == api_window["requests"], api_window
