"""The source contract: structural validation and comparison with a live schema."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from apps.pipeline.sources.contract import (
    ContractError,
    load_contract,
    parse_contract,
    validate_live,
)

CONTRACT = Path(__file__).resolve().parents[2] / "config" / "sources.yaml"


@pytest.fixture
def raw_contract() -> dict:
    return yaml.safe_load(CONTRACT.read_text())


def test_the_default_contract_loads_with_both_sources():
    contract = load_contract(CONTRACT)
    assert set(contract.sources) == {"business", "matomo"}
    assert set(contract.sources["business"].tables) == {"user", "dataset", "task", "api_order"}
    visits = contract.table("matomo.log_visit")
    assert visits.physical == "matomo_log_visit"
    assert visits.cursor.kind == "timestamp"
    assert contract.table("matomo.log_link_visit_action").cursor.kind == "id"
    assert contract.table("matomo.log_conversion").replace_by == "idvisit"


def test_every_structural_problem_is_reported_at_once(raw_contract):
    # Given a contract with three independent mistakes
    broken = copy.deepcopy(raw_contract)
    broken["sources"]["business"]["tables"]["user"]["cursor"]["column"] = "modified"
    broken["sources"]["business"]["tables"]["dataset"]["columns"]["price"] = "money"
    broken["canonical"]["items"]["columns"]["title"] = "name"
    # When it is parsed
    with pytest.raises(ContractError) as excinfo:
        parse_contract(broken)
    # Then one error lists all three, each naming its place
    text = str(excinfo.value)
    assert len(excinfo.value.problems) == 3
    assert "sources.business.tables.user.cursor column 'modified'" in text
    assert "sources.business.tables.dataset.columns.price: unknown type 'money'" in text
    assert "canonical.items: column 'name' is not listed in business.dataset" in text


def test_a_timestamp_cursor_on_a_non_datetime_column_is_refused(raw_contract):
    broken = copy.deepcopy(raw_contract)
    broken["sources"]["business"]["tables"]["user"]["cursor"]["column"] = "username"
    with pytest.raises(ContractError, match="has kind timestamp but type string"):
        parse_contract(broken)


def test_a_missing_file_and_bad_yaml_are_one_line_errors(tmp_path):
    with pytest.raises(ContractError, match="file not found"):
        load_contract(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sources: [unclosed")
    with pytest.raises(ContractError, match="not valid YAML"):
        load_contract(bad)


def _business_db(
    path: Path, *, drop_table: str | None = None, user_ddl: str | None = None
) -> sa.Engine:
    engine = sa.create_engine(f"sqlite:///{path}")
    ddl = {
        "user": user_ddl
        or "CREATE TABLE user (id INTEGER PRIMARY KEY, username VARCHAR(64), company_name VARCHAR(128), "
        "industry VARCHAR(64), province VARCHAR(32), city VARCHAR(32), created_at DATETIME, updated_at DATETIME)",
        "dataset": "CREATE TABLE dataset (id INTEGER PRIMARY KEY, dataset_name VARCHAR(255), description TEXT, "
        "tag VARCHAR(255), industry VARCHAR(64), price DECIMAL(12,2), create_company_name VARCHAR(128), "
        "status TINYINT, created_at DATETIME, updated_at DATETIME)",
        "task": "CREATE TABLE task (id INTEGER PRIMARY KEY, user_id BIGINT, dataset_id BIGINT, task_type VARCHAR(32), "
        "status VARCHAR(16), created_at DATETIME, updated_at DATETIME)",
        "api_order": "CREATE TABLE api_order (id INTEGER PRIMARY KEY, order_no VARCHAR(64), user_id BIGINT, "
        "dataset_id BIGINT, amount DECIMAL(12,2), status VARCHAR(16), created_at DATETIME, updated_at DATETIME)",
    }
    with engine.begin() as conn:
        for name, sql in ddl.items():
            if name != drop_table:
                conn.execute(sa.text(sql))
    return engine


def test_a_matching_live_schema_passes(tmp_path):
    contract = load_contract(CONTRACT)
    business_only = type(contract)(sources={"business": contract.sources["business"]})
    validate_live(business_only, {"business": _business_db(tmp_path / "b.sqlite3")})


def test_live_mismatches_are_explained_in_one_error(tmp_path):
    # Given a business database without the task table, without user.city and with a text created_at
    engine = _business_db(
        tmp_path / "b.sqlite3",
        drop_table="task",
        user_ddl="CREATE TABLE user (id INTEGER PRIMARY KEY, username VARCHAR(64), company_name VARCHAR(128), "
        "industry VARCHAR(64), province VARCHAR(32), created_at VARCHAR(20), updated_at DATETIME)",
    )
    contract = load_contract(CONTRACT)
    # When the contract is validated against it (Matomo not configured at all)
    with pytest.raises(ContractError) as excinfo:
        validate_live(contract, {"business": engine})
    # Then each mismatch is one readable line
    problems = excinfo.value.problems
    assert "business.task: table 'task' is missing from the business database" in problems
    assert "business.user: column 'city' is missing from user" in problems
    assert any(
        p.startswith(
            "business.user.created_at: contract says datetime but the database has VARCHAR(20)"
        )
        for p in problems
    )
    assert "source 'matomo': no database configured (MATOMO_DB_URL)" in problems
