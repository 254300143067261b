"""Query plans: with a long history of finished jobs, neither script's queries scan
the jobs table (PgQueuer-style plan-regression guard)."""

import json

import pytest

from helpers import query
from mailqueue.db import QUERIES

PARAMS = {"limit": 100, "consumer": 1, "held": [1, 2, 3], "rate": 40.0, "burst": 2.0,
          "queue_ids": [1, 2], "job_ids": [10001, 10002], "kinds": ["sent", "failed"],
          "attempted": [1, 1], "errors": [None, "451 try later"], "delays": [0.0, 60.0],
          "codes": [250, 451], "started": [0.0, 0.0]}


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


@pytest.mark.parametrize("name", ["move_ready_jobs", "requeue_stranded_jobs", "claim_batch",
                                  "claim_paced_batch", "heartbeat", "record_outcomes"])
def test_hot_queries_use_indexes_not_a_scan_of_jobs(history, name):
    nodes = plan_nodes(history, QUERIES[name])  # EXPLAIN alone runs nothing
    scans = [n for n in nodes if n.get("Relation Name") == "jobs"]
    assert scans, "the query reads jobs"
    assert all(n["Node Type"] != "Seq Scan" for n in scans), [n["Node Type"] for n in scans]
    if name == "move_ready_jobs":
        assert any(n.get("Index Name") == "jobs_ready_by_priority_idx" for n in scans)
    if name == "requeue_stranded_jobs":
        assert any(n.get("Index Name") == "jobs_queued_idx" for n in scans)


def test_recording_outcomes_looks_jobs_up_by_key_even_with_stale_statistics(history):
    """A burst queues thousands of jobs after the last ANALYZE: the planner must
    still find the outcomes' jobs by their job_id, not walk every queued job."""
    query(history, "WITH q AS (UPDATE jobs SET status = 'queued' WHERE job_id <= 5000 "
                   "RETURNING job_id) INSERT INTO queue (job_id) SELECT job_id FROM q")
    nodes = plan_nodes(history, QUERIES["record_outcomes"])
    scans = [n for n in nodes if n.get("Relation Name") == "jobs" and "Scan" in n["Node Type"]]
    assert scans and all("job_id" in n.get("Index Cond", "") for n in scans), \
        [(n["Node Type"], n.get("Index Name"), n.get("Index Cond")) for n in scans]
