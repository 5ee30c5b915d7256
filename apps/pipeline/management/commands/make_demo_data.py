"""Write the demo business and Matomo databases (SQLite by default, or any MySQL/MariaDB URL)."""

from __future__ import annotations

import datetime as dt
import sys
from typing import Any

import sqlalchemy as sa
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from tqdm import tqdm

from apps.pipeline import demo
from apps.pipeline.sources.db import make_engine


class Command(BaseCommand):
    help = (
        "Simulate a data marketplace: business tables (user, dataset, task, api_order) and Matomo "
        "log tables with the real Matomo 5 layout, deterministic for a given --seed and --end."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        defaults = demo.DemoConfig()
        parser.add_argument("--users", type=int, default=defaults.users, help="business users")
        parser.add_argument("--items", type=int, default=defaults.items, help="datasets")
        parser.add_argument(
            "--actions",
            type=int,
            default=defaults.actions,
            help="target number of matomo_log_link_visit_action rows",
        )
        parser.add_argument("--days", type=int, default=defaults.days, help="days of activity")
        parser.add_argument("--seed", type=int, default=defaults.seed)
        parser.add_argument(
            "--end",
            default=None,
            help="ISO date-time (UTC) the data ends shortly before; default now",
        )
        parser.add_argument(
            "--noise",
            type=float,
            default=defaults.noise,
            help="share of rows given realistic defects (default 0: clean data)",
        )
        parser.add_argument("--reset", action="store_true", help="drop and recreate the tables")
        parser.add_argument(
            "--business-url", default=None, help="default: settings.BUSINESS_DB_URL"
        )
        parser.add_argument("--matomo-url", default=None, help="default: settings.MATOMO_DB_URL")
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")

    def handle(self, *args: Any, **opts: Any) -> None:
        try:
            config = demo.DemoConfig(
                users=opts["users"],
                items=opts["items"],
                actions=opts["actions"],
                days=opts["days"],
                seed=opts["seed"],
                end=_parse_end(opts["end"]),
                noise=opts["noise"],
                reset=opts["reset"],
            )
        except ValueError as exc:
            # DemoConfig messages start with the field name, which is also the flag's name.
            raise CommandError(f"--{exc}") from None
        business = _connect("business", opts["business_url"] or settings.BUSINESS_DB_URL)
        try:
            matomo = _connect("matomo", opts["matomo_url"] or settings.MATOMO_DB_URL)
        except CommandError:
            business.dispose()
            raise
        bars: list[tqdm] = []

        def progress(rows: int) -> None:
            # Opened on the first chunk, so a refused run prints no empty bar.
            if not bars:
                bars.append(
                    tqdm(
                        total=config.actions,
                        desc="matomo actions",
                        unit=" rows",
                        unit_scale=True,
                        file=sys.stderr,
                        disable=opts["no_progress"],
                    )
                )
            bars[0].update(rows)

        try:
            summary = demo.generate(business, matomo, config, progress=progress)
        except demo.DemoDataError as exc:
            raise CommandError(str(exc)) from None
        except sa.exc.SQLAlchemyError as exc:
            # A database that fails mid-load (disk full, lost connection): say so in one line.
            reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
            raise CommandError(f"writing the demo data failed: {reason}") from None
        finally:
            for bar in bars:
                bar.close()
            business.dispose()
            matomo.dispose()
        self.stdout.write(summary.line())


def _parse_end(value: str | None) -> dt.datetime | None:
    if value is None:
        return None
    try:
        return dt.datetime.fromisoformat(value)
    except ValueError:
        raise CommandError(
            f"--end must be an ISO date-time such as 2025-01-31T12:00:00 (got {value!r})"
        ) from None


def _connect(name: str, url: str) -> sa.Engine:
    """An engine whose database answers, or a one-line CommandError naming it."""
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        raise CommandError(f"the {name} database URL {url!r} cannot be parsed") from None
    shown = parsed.render_as_string(hide_password=True)
    if parsed.get_backend_name() not in ("sqlite", "mysql", "mariadb"):
        raise CommandError(f"the {name} database must be SQLite or MySQL/MariaDB (got {shown})")
    try:
        engine = make_engine(url)
        with engine.connect():
            pass
    except (sa.exc.SQLAlchemyError, ImportError) as exc:
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        raise CommandError(f"cannot connect to the {name} database {shown}: {reason}") from None
    return engine
