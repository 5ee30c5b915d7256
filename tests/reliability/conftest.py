"""Fixtures of the serving reliability scenarios (real gunicorn, private Redis, fault proxy).

Only fixtures are added here, none autouse: a test gets a server or a Redis only when it asks.
They live in `serving_fixtures.py` so other reliability modules can import the helpers too.
"""

from tests.reliability.serving_fixtures import demo_site, redis_server

__all__ = ["demo_site", "redis_server"]
