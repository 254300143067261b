"""Query plans: with a long history of finished jobs, neither script's queries scan
the jobs table (PgQueuer-style plan-regression guard)."""

import json

import pytest

from helpers import query
from mailqueue.db import QUERIES

PARAMS = {
    "limit": 100,
    "consumer": 1,
    "held": [1, 2, 3],
    "rate": 40.0,
    "burst": 2.0,
    "queue_ids": [1, 2],
    "job_ids": [10001, 10002],
    "kinds": ["sent", "failed"],
    "attempted": [1, 1],
    "errors": [None, "451 try later"],
    "delays": [0.0, 60.0],
    "codes": [250, 451],
    "elapsed": [0.0, 0.0],
    "deferred": [0, 0],
    "pending": [None, None],
    "deliveries": ["sent", "failed"],
    "relays": ["default", "default"],
    "budget": 256 * 1024 * 1024,
    "alone": True,
}


@pytest.fixture
def history(db):
    """10,000 completed jobs, a few ready ones, some queued; statistics up to date."""
    query(
        db,
        "INSERT INTO jobs (email, content_message, status, start_time, end_time, attempts) "
        "SELECT 'old' || i || '@example.com', 'sent long ago', 'completed', now(), now(), 1 "
        "FROM generate_series(1, 10000) i",
    )
    query(
        db,
        "INSERT INTO jobs (email, content_message) "
        "SELECT 'new' || i || '@example.com', 'ready' FROM generate_series(1, 20) i",
    )
    query(
        db,
        "WITH q AS (UPDATE jobs SET status = 'queued' WHERE job_id IN "
        "(SELECT job_id FROM jobs WHERE status = 'available' LIMIT 10) RETURNING job_id) "
        "INSERT INTO queue (job_id) SELECT job_id FROM q",
    )
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


@pytest.mark.parametrize(
    "name",
    [
        "move_ready_jobs",
        "requeue_stranded_jobs",
        "claim_batch",
        "claim_paced_batch",
        "heartbeat",
        "record_outcomes",
    ],
)
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
    query(
        history,
        "WITH q AS (UPDATE jobs SET status = 'queued' WHERE job_id <= 5000 "
        "RETURNING job_id) INSERT INTO queue (job_id) SELECT job_id FROM q",
    )
    nodes = plan_nodes(history, QUERIES["record_outcomes"])
    scans = [n for n in nodes if n.get("Relation Name") == "jobs" and "Scan" in n["Node Type"]]
    assert scans and all("job_id" in n.get("Index Cond", "") for n in scans), [
        (n["Node Type"], n.get("Index Name"), n.get("Index Cond")) for n in scans
    ]


# ---------------------------------------------------------------- operating the queue

OPS_PARAMS = {
    "since": 3600.0,
    "limit": 10,
    "status": "dead",
    "after": 0,
    "job_ids": None,
    "older_than": 30 * 86400.0,
}
OPS_QUERIES = [
    "ops_status_counts",
    "ops_finished_since",
    "ops_waiting",
    "ops_failure_reasons",
    "ops_latest_failures",
    "ops_per_minute",
    "ops_deliveries_since",
    "ops_requeue_count",
    "ops_requeue",
    "ops_prune_count",
    "ops_prune_batch",
    "ops_relays",
    "ops_relay_deliveries_since",
]


@pytest.fixture(scope="module")
def long_history(postgres, template_database):
    """1,000,000 finished jobs over 60 days, each with its attempt in deliveries (1 in
    50 a failure), a few waiting ones; statistics and visibility map up to date.
    Bodies of about 1 KB, as real mails (and the bench's): with tiny rows the
    table is small enough that scanning it whole is the planner's right choice,
    which a real history never is. Built once for the module (about 25 s), in a
    database of its own."""
    import psycopg2

    name = postgres.create_database(template=template_database)
    conn = psycopg2.connect(postgres.dsn(name))
    conn.autocommit = True
    query(
        conn,
        "INSERT INTO jobs (email, content_message, status, start_time, end_time, attempts) "
        "SELECT 'old' || i || '@example.com', repeat('Nội dung thư ', 60), "
        "       CASE WHEN i % 50 = 0 THEN 'dead' ELSE 'completed' END, "
        "       LOCALTIMESTAMP - i * interval '5 seconds' - interval '2 seconds', "
        "       LOCALTIMESTAMP - i * interval '5 seconds', 1 "
        "FROM generate_series(1, 1000000) i",
    )
    query(
        conn,
        "INSERT INTO deliveries (job_id, attempt, started_at, finished_at, outcome, "
        "smtp_code, detail) "
        "SELECT job_id, 1, end_time::timestamptz - interval '1 second', end_time, "
        "       CASE WHEN status = 'dead' THEN 'dead' ELSE 'sent' END, "
        "       CASE WHEN status = 'dead' THEN 550 ELSE 250 END, "
        "       CASE WHEN status = 'dead' THEN 'recipient refused: 550 5.1.1 <' || email "
        "            || '>: no such user' END FROM jobs",
    )
    query(
        conn,
        "INSERT INTO jobs (email, content_message) "
        "SELECT 'new' || i || '@example.com', 'ready' FROM generate_series(1, 20) i",
    )
    query(
        conn,
        "WITH q AS (UPDATE jobs SET status = 'queued' WHERE job_id IN "
        "(SELECT job_id FROM jobs WHERE status = 'available' LIMIT 10) RETURNING job_id) "
        "INSERT INTO queue (job_id) SELECT job_id FROM q",
    )
    query(conn, "VACUUM ANALYZE jobs")
    query(conn, "VACUUM ANALYZE deliveries")
    query(conn, "ANALYZE queue")
    yield conn
    conn.close()
    postgres.drop_database(name)


def ops_plan_nodes(db, name, **params):
    with db.cursor() as cur:
        explained = cur.mogrify(
            "EXPLAIN (FORMAT JSON) " + QUERIES[name], dict(OPS_PARAMS, **params)
        ).decode()
    [(plan,)] = query(db, explained)
    plan = plan if isinstance(plan, list) else json.loads(plan)
    nodes, todo = [], [plan[0]["Plan"]]
    while todo:
        node = todo.pop()
        nodes.append(node)
        todo.extend(node.get("Plans", []))
    return nodes


@pytest.mark.parametrize("name", OPS_QUERIES)
def test_report_dashboard_and_prune_use_indexes_at_a_million_finished_jobs(long_history, name):
    params = {"after": "-infinity"} if name == "ops_prune_batch" else {}
    nodes = ops_plan_nodes(long_history, name, **params)  # EXPLAIN alone runs nothing
    big = [n for n in nodes if n.get("Relation Name") in ("jobs", "deliveries")]
    assert big, "the query reads jobs or deliveries"
    assert all(n["Node Type"] != "Seq Scan" for n in big), [
        (n["Relation Name"], n["Node Type"]) for n in big
    ]
    finished = {
        "ops_finished_since",
        "ops_prune_count",
        "ops_prune_batch",
        "ops_requeue_count",
        "ops_requeue",
        "ops_per_minute",
        "ops_status_counts",
    }
    if name in finished:
        assert any(n.get("Index Name") == "jobs_finished_idx" for n in big), name
    if name in ("ops_finished_since", "ops_per_minute", "ops_prune_batch"):
        # the window bounds the scan: a condition on end_time in the index's range
        jobs = [n for n in big if n.get("Index Name") == "jobs_finished_idx"]
        assert jobs and all("end_time" in n.get("Index Cond", "") for n in jobs), [
            (n["Node Type"], n.get("Index Cond")) for n in jobs
        ]
    if name in (
        "ops_failure_reasons",
        "ops_latest_failures",
        "ops_deliveries_since",
        "ops_per_minute",
    ):
        assert any(n.get("Index Name") == "deliveries_finished_idx" for n in big), name


def test_requeue_of_failed_jobs_and_of_named_jobs_uses_indexes(long_history):
    for params in ({"status": "failed"}, {"job_ids": [5, 6, 7]}, {"since": None}):
        nodes = ops_plan_nodes(long_history, "ops_requeue", **params)
        scans = [n for n in nodes if n.get("Relation Name") == "jobs"]
        assert scans and all(n["Node Type"] != "Seq Scan" for n in scans), (params, scans)
