"""Query plans: with a long history of finished jobs, neither script's queries scan
the jobs table (PgQueuer-style plan-regression guard)."""

import json
import re

import pytest

from helpers import query
from mailqueue import db as database_module
from mailqueue.db import PREPARED, QUERIES

PARAMS = {"limit": 100, "job_id": 5000, "error": "x", "delay": 60, "attempted": 1}


@pytest.fixture
def history(db):
    """10,000 completed jobs, a few ready ones, some queued; statistics up to date."""
    query(db, "INSERT INTO jobs (email, content_message, status, start_time, end_time, attempts) "
              "SELECT 'old' || i || '@example.com', 'sent long ago', 'completed', now(), now(), 1 "
              "FROM generate_series(1, 10000) i")
    query(db, "INSERT INTO jobs (email, content_message) "
              "SELECT 'new' || i || '@example.com', 'ready' FROM generate_series(1, 20) i")
    query(db, "WITH q AS (UPDATE jobs SET status = 'queued' WHERE job_id IN "
              "(SELECT job_id FROM jobs WHERE status = 'available' LIMIT 10) RETURNING job_id) "
              "INSERT INTO queue (job_id) SELECT job_id FROM q")
    query(db, "ANALYZE jobs; ANALYZE queue")
    return db


def plan_nodes(db, sql):
    with db.cursor() as cur:
        explained = cur.mogrify("EXPLAIN (FORMAT JSON) " + sql, PARAMS).decode()
    [(plan,)] = query(db, explained)
    plan = plan if isinstance(plan, list) else json.loads(plan)
    nodes, todo = [], [plan[0]["Plan"]]
    while todo:
        node = todo.pop()
        nodes.append(node)
        todo.extend(node.get("Plans", []))
    return nodes


@pytest.mark.parametrize("name", ["move_ready_jobs", "claim_batch", "mark_sent",
                                  "schedule_retry", "mark_dead"])
def test_hot_queries_use_indexes_not_a_scan_of_jobs(history, name):
    sql = re.sub(r"(?m)^BEGIN;$", "", QUERIES[name])  # claim_batch begins its transaction
    nodes = plan_nodes(history, sql)  # EXPLAIN alone runs nothing
    scans = [n for n in nodes if n.get("Relation Name") == "jobs"]
    assert scans, "the query reads jobs"
    assert all(n["Node Type"] != "Seq Scan" for n in scans), [n["Node Type"] for n in scans]
    if name == "move_ready_jobs":
        assert any(n.get("Index Name") == "jobs_ready_idx" for n in scans)


@pytest.mark.parametrize("name", PREPARED)
def test_prepared_plans_cached_while_jobs_was_empty_still_use_indexes(
        postgres, database, name):
    # A prepared query's generic plan is made once and kept until the tables'
    # statistics change; a fresh installation makes it while jobs is empty.
    conn = database_module.connect(postgres.settings_for(database), "plan test",
                                   autocommit=True)
    try:
        if conn.server_version < 120000:
            pytest.skip("plan_cache_mode is new in PostgreSQL 12")
        query(conn, "SET plan_cache_mode = force_generic_plan")
        database_module.run(conn, name, **{k: v for k, v in PARAMS.items()
                                          if "%%(%s)s" % k in QUERIES[name]})
        query(conn, "INSERT INTO jobs (email, content_message, status) "
                    "SELECT 'old' || i || '@example.com', 'sent', 'completed' "
                    "FROM generate_series(1, 10000) i")
        nodes = plan_nodes(conn, database_module.prepared_forms(name, QUERIES[name])[1])
    finally:
        conn.close()
    scans = [n["Node Type"] for n in nodes if n.get("Relation Name") == "jobs"]
    assert scans and "Seq Scan" not in scans, scans
