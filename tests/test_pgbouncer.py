"""The queue behind PgBouncer in transaction pooling, its stock settings otherwise.

Under transaction pooling each transaction may run on another server connection:
startup `options` are refused, SQL-level PREPARE breaks, and LISTEN delivers
nothing to the client that asked. The queue must work all the same: by polling
alone when `database` is the pooler, with notifications too when
`listen_database` names a direct connection.
"""

import pytest

from helpers import (
    assert_every_job_completed_once,
    copies,
    queue_marked,
    start_queue,
    status_counts,
    stop_cleanly,
    wait_until,
)

MAILS = 2000


def listeners(rows):
    """The application names of the LISTEN connections among `rows`."""
    return sorted(r["application_name"] for r in rows if "(listen)" in r["application_name"])


@pytest.mark.parametrize("listen", ["through pgbouncer", "direct"])
def test_two_thousand_mails_through_pgbouncer_arrive_once_and_a_later_one_too(
    postgres, database, db, smtp, pgbouncer, make_config, scripts, listen
):
    sections = {"database": pgbouncer.settings_for(database)}
    if listen == "direct":
        sections["listen_database"] = postgres.settings_for(database)
    config = make_config(**sections)
    procs = start_queue(scripts, config)

    markers = queue_marked(db, MAILS)
    # A script that cannot work through the pooler exits (or keeps retrying, and
    # then the jobs never complete): say which, and its log, at once.
    wait_until(
        lambda: (
            status_counts(db) == {"completed": MAILS} or any(p.poll() is not None for p in procs)
        ),
        timeout=180,
        what="the mails sent through pgbouncer (now %s)" % status_counts(db),
    )
    for proc in procs:
        assert proc.poll() is None, scripts.log_of(proc)[-2000:]
    assert_every_job_completed_once(db, smtp, markers)

    # Inserted once all is quiet: without a direct LISTEN no notification can
    # reach the queue, and the consumers' and producer's polls must find it.
    later = queue_marked(db, 1, prefix="later")
    wait_until(lambda: copies(smtp)[later[0]] == 1, timeout=60, what="the later mail")
    wait_until(lambda: status_counts(db) == {"completed": MAILS + 1}, what="its job completed")

    # The LISTEN connections went where the configuration says.
    clients = [c for c in pgbouncer.admin("SHOW CLIENTS") if c["database"] == database]
    if listen == "direct":
        assert listeners(clients) == []
        with db.cursor() as cur:
            cur.execute(
                "SELECT application_name FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name LIKE %s",
                ("%(listen)%",),
            )
            assert len(cur.fetchall()) >= 3, "two consumers' and the producer's LISTEN, direct"
    else:
        assert len(listeners(clients)) >= 3, "two consumers' and the producer's LISTEN, pooled"
    pools = [p for p in pgbouncer.admin("SHOW POOLS") if p["database"] == database]
    assert [p["pool_mode"] for p in pools] == ["transaction"]
    assert len(clients) > 3, "the queue's connections all went through pgbouncer"
    assert "unsupported startup parameter" not in pgbouncer.log()

    stop_cleanly(scripts, procs)
    assert copies(smtp)[later[0]] == 1
