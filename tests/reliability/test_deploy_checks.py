"""Production configuration: Django's deploy checks, the OpenAPI schema, bandit, committed
secrets, and what is reachable without authentication.

Supply-chain audit (pip-audit) is deliberately absent: offline it cannot reach its
vulnerability database and still prints "No known vulnerabilities found" with exit 0
(RELIABILITY.md), so a test around it would be green without having checked anything.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from django.core.management import call_command
from django.test import Client

from recoplatform.metrics import DEFAULT_ALLOWED_NETWORKS

ROOT = Path(__file__).resolve().parents[2]
PRODUCTION_HOST = "reco.example.com"


def _manage(
    args: list[str], env_overrides: dict[str, str], tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    """Run manage.py in a fresh process with only the given configuration."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DJANGO_", "DATABASE_URL", "REDIS_URL", "CELERY_", "RECO_"))
    }
    env.update(
        {"DATA_DIR": str(tmp_path / "data"), "DJANGO_SETTINGS_MODULE": "recoplatform.settings"}
    )
    env.update(env_overrides)
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def production_env(**overrides: str) -> dict[str, str]:
    """What an operator sets in production: debug off, a real secret, the host name. The
    HTTPS settings are left to their production defaults."""
    return {
        "DJANGO_DEBUG": "0",
        "DJANGO_SECRET_KEY": secrets.token_urlsafe(64),
        "DJANGO_ALLOWED_HOSTS": PRODUCTION_HOST,
        **overrides,
    }


# -- manage.py check --deploy -------------------------------------------------------------


def test_production_settings_pass_the_deploy_checks(tmp_path: Path) -> None:
    result = _manage(["check", "--deploy", "--fail-level", "WARNING"], production_env(), tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "no issues" in result.stdout


@pytest.mark.parametrize(
    ("override", "warning"),
    [
        ({"DJANGO_SECURE_SSL_REDIRECT": "0"}, "security.W008"),
        ({"DJANGO_SESSION_COOKIE_SECURE": "0"}, "security.W012"),
        ({"DJANGO_CSRF_COOKIE_SECURE": "0"}, "security.W016"),
        ({"DJANGO_SECURE_HSTS_SECONDS": "0"}, "security.W004"),
        ({"DJANGO_SECRET_KEY": "short-and-weak"}, "security.W009"),
    ],
)
def test_the_deploy_checks_catch_a_weakened_setting(tmp_path: Path, override, warning) -> None:  # type: ignore[no-untyped-def]
    # The control: the same check fails when one protection is turned off.
    result = _manage(
        ["check", "--deploy", "--fail-level", "WARNING"], production_env(**override), tmp_path
    )
    assert result.returncode != 0
    assert warning in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("RECO_METRICS_ALLOWED_NETWORKS", "10.0.0.0/8,not-a-network"),
        ("RECO_ADMIN_THROTTLE_RATE", "lots"),
        ("RECO_API_TOKEN_MAX_AGE_DAYS", "-1"),
        ("DJANGO_NUM_PROXIES", "-1"),
    ],
)
def test_a_bad_security_variable_stops_start_up_with_its_name(
    tmp_path: Path, variable: str, value: str
) -> None:
    result = _manage(["check"], {variable: value}, tmp_path)
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert variable in result.stderr


def test_plain_http_still_reaches_the_probes_and_metrics_in_production(settings) -> None:  # type: ignore[no-untyped-def]
    # Given production's HTTPS redirect
    settings.SECURE_SSL_REDIRECT = True
    browser = Client()
    # Then the admin is redirected to HTTPS, but probes and the scraper speak plain HTTP
    admin = browser.get("/admin/")
    assert admin.status_code == 301
    assert admin["Location"].startswith("https://")
    assert browser.get("/health").status_code == 200
    assert browser.get("/metrics").status_code == 200


# -- OpenAPI schema -----------------------------------------------------------------------


def test_the_schema_validates_and_documents_the_admin_errors(tmp_path: Path) -> None:
    out = tmp_path / "schema.json"
    call_command(
        "spectacular",
        "--validate",
        "--fail-on-warn",
        "--format",
        "openapi-json",
        "--file",
        str(out),
    )
    schema = json.loads(out.read_text())
    admin_paths = [
        "/api/v1/admin/reload",
        "/api/v1/admin/models/{version}/promote",
        "/api/v1/admin/models/rollback",
        "/api/v1/admin/pipeline/retrain",
    ]
    for path in admin_paths:
        post = schema["paths"][path]["post"]
        assert {"401", "403", "429"} <= set(post["responses"]), path
        assert post["security"] == [{"tokenAuth": []}, {"cookieAuth": []}], path
        assert "get" not in schema["paths"][path]
    promote = schema["paths"]["/api/v1/admin/models/{version}/promote"]["post"]["responses"]
    assert {"404", "409", "413", "415"} <= set(promote)
    feedback = schema["paths"]["/api/v1/feedback"]["post"]
    assert {"400", "413", "415"} <= set(feedback["responses"])
    assert "multipart/form-data" not in feedback["requestBody"]["content"]


# -- bandit -------------------------------------------------------------------------------


def test_bandit_finds_no_high_severity_issue() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bandit", "-r", "apps", "recoplatform", "-f", "json", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = json.loads(result.stdout)
    assert report["errors"] == []
    scanned = report["metrics"]["_totals"]["loc"]
    assert scanned > 5000  # it did read the code
    high = [
        f"{r['filename']}:{r['line_number']} {r['test_id']} {r['issue_text']}"
        for r in report["results"]
        if r["issue_severity"] == "HIGH"
    ]
    assert high == []


# -- committed secrets --------------------------------------------------------------------

# Values documented as demo defaults (docs/CONFIGURATION.md, .env.example, README): they are
# placeholders, and production refuses to start without its own DJANGO_SECRET_KEY.
DEMO_VALUES = {
    "insecure-dev-key-change-me",
    "change-me-to-a-long-random-string",
    "change-me",
    "local-serve-key-change-me",
    "benchmark-only-secret-key-0123456789",
    "pw",
    "***",
}
KEY_PATTERNS = {
    "private key": re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"),
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret access key": re.compile(
        r"aws_secret_access_key\s*[=:]\s*[\"']?[A-Za-z0-9/+=]{40}", re.IGNORECASE
    ),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b"),
    "Slack token": re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),
}
# user:password@ in a URL; the password group is checked against the demo values.
URL_CREDENTIALS = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s:/@\"'`]+:([^\s@\"'`/]+)@")
# NAME=value / NAME: value / "NAME": "value" for secret-looking names in configuration; in
# Python only a string literal counts (`token = str(...)` is code, not a secret).
_SECRET_NAME = r"(?i)[\w.]*(?:secret|password|passwd|api_key|token)[\w.]*[\"']?\s*[:=]\s*"
SECRET_ASSIGNMENT = re.compile(_SECRET_NAME + r"[\"']?([^\s\"',)]*)")
PY_SECRET_ASSIGNMENT = re.compile(_SECRET_NAME + r"[\"']([^\"']*)[\"']")
CONFIG_FILES = re.compile(
    r"^(recoplatform/.*\.py|\.env.*|.*\.ya?ml|.*\.toml|.*\.ini|.*\.cfg|Makefile|Dockerfile|"
    r"gunicorn\.conf\.py|\.ci/.*)$"
)
PLACEHOLDER = re.compile(r"^(\$|env_|os\.environ|\{|<|$)")


def scan(path: str, text: str) -> list[str]:
    """Findings in one file: `path:line: what`."""
    findings = []
    config = CONFIG_FILES.match(path) is not None
    for number, line in enumerate(text.splitlines(), start=1):
        for name, pattern in KEY_PATTERNS.items():
            if pattern.search(line):
                findings.append(f"{path}:{number}: {name}")
        if path.startswith("tests/"):
            continue  # test fixtures use throw-away passwords on purpose
        for match in URL_CREDENTIALS.finditer(line):
            password = match.group(1)
            if password not in DEMO_VALUES and not PLACEHOLDER.match(password):
                findings.append(f"{path}:{number}: password in a URL")
        if config:
            assignment = PY_SECRET_ASSIGNMENT if path.endswith(".py") else SECRET_ASSIGNMENT
            for match in assignment.finditer(line):
                value = match.group(1)
                if value and value not in DEMO_VALUES and not PLACEHOLDER.match(value):
                    findings.append(f"{path}:{number}: hard-coded secret {value[:4]}...")
    return findings


def test_the_secret_scan_finds_planted_secrets() -> None:
    # The control: each rule fires on a planted example (built here so that this file itself
    # holds no match).
    planted = {
        "recoplatform/settings.py": 'DATABASE_PASSWORD = "' + "hunter" + '2"',
        ".env.prod": "DJANGO_SECRET_KEY=" + "q8Zk3v" * 8,
        "apps/x.py": "URL = 'mysql://app:" + "s3cr3t" + "@db/x'",
        "docs/key.pem": "-----BEGIN " + "RSA PRIVATE KEY-----",
        "tests/y.py": "key = '" + "AKIA" + "ABCDEFGHIJKLMNOP" + "'",
    }
    for path, text in planted.items():
        assert scan(path, text), path
    # and stays quiet on the documented demo defaults and placeholders
    quiet = {
        "recoplatform/settings.py": 'SECRET_KEY = env_str("DJANGO_SECRET_KEY", "insecure-dev-key-change-me")',
        ".env.example": "MYSQL_ROOT_PASSWORD=change-me",
        "docker-compose.yml": "MARIADB_ROOT_PASSWORD: ${MYSQL_ROOT_PASSWORD:?set it}",
    }
    for path, text in quiet.items():
        assert scan(path, text) == [], path


def test_no_secret_is_committed() -> None:
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    findings: list[str] = []
    scanned = 0
    for path in filter(None, tracked):
        file = ROOT / path
        if not file.is_file() or file.stat().st_size > 2_000_000:
            continue
        text = file.read_text(encoding="utf-8", errors="ignore")
        findings.extend(scan(path, text))
        scanned += 1
    assert scanned > 100
    assert findings == []


# -- what is reachable without authentication ---------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(
    "path",
    ["/admin/", "/admin/dashboard/", "/admin/registry/modelversion/", "/reports/features/"],
)
def test_the_admin_and_its_pages_need_a_staff_login(path: str) -> None:
    response = Client().get(path)
    assert response.status_code == 302
    assert response["Location"].startswith("/admin/login/")


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("10.1.2.3", True),
        ("172.20.0.5", True),  # a docker compose network
        ("192.168.1.9", True),
        ("::ffff:127.0.0.1", True),
        ("203.0.113.5", False),
        ("8.8.8.8", False),
        ("2001:db8::1", False),
        ("172.32.0.1", False),  # just outside 172.16.0.0/12
    ],
)
@pytest.mark.django_db
def test_metrics_answer_only_internal_addresses_by_default(address: str, allowed: bool) -> None:
    response = Client(REMOTE_ADDR=address).get("/metrics")
    assert response.status_code == (200 if allowed else 403)
    if allowed:
        assert b"recommendation_requests_total" in response.content
    else:
        assert b"recommendation_" not in response.content


def test_the_default_metrics_networks_are_loopback_and_private(settings) -> None:  # type: ignore[no-untyped-def]
    assert tuple(settings.RECO["METRICS_ALLOWED_NETWORKS"]) == DEFAULT_ALLOWED_NETWORKS


@pytest.mark.django_db
def test_metrics_accept_a_bearer_token_from_anywhere(settings) -> None:  # type: ignore[no-untyped-def]
    # Given a token and no network allowed
    token = secrets.token_urlsafe(32)
    settings.RECO = {**settings.RECO, "METRICS_TOKEN": token, "METRICS_ALLOWED_NETWORKS": []}
    # Then only the token opens /metrics, even from loopback
    assert Client().get("/metrics").status_code == 403
    assert Client().get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 403
    assert Client().get("/metrics", HTTP_AUTHORIZATION=f"Token {token}").status_code == 403
    public = Client(REMOTE_ADDR="203.0.113.5")
    assert public.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {token}").status_code == 200


@pytest.mark.django_db
def test_a_forged_forwarded_for_does_not_open_metrics(settings) -> None:  # type: ignore[no-untyped-def]
    public = Client(REMOTE_ADDR="203.0.113.5")
    # With no trusted proxy (the default), the header is ignored
    assert public.get("/metrics", HTTP_X_FORWARDED_FOR="127.0.0.1").status_code == 403
    # Behind one trusted proxy, the client is the last X-Forwarded-For entry
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "NUM_PROXIES": 1}
    proxy = Client(REMOTE_ADDR="10.0.0.2")
    assert proxy.get("/metrics", HTTP_X_FORWARDED_FOR="203.0.113.5").status_code == 403
    assert proxy.get("/metrics", HTTP_X_FORWARDED_FOR="203.0.113.5, 10.0.0.9").status_code == 200


def test_the_server_binds_loopback_unless_told_otherwise() -> None:
    # gunicorn.conf.py's own default, and compose publishes the web port on loopback only.
    source = (ROOT / "gunicorn.conf.py").read_text()
    assert 'os.environ.get("RECO_BIND", "127.0.0.1:8000")' in source
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
