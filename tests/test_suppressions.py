"""The suppression list: rows typed in pgAdmin, python -m mailqueue suppress,
the batch screen the consumer runs (one look-up per batch), and the SQL the
consumer runs on a 5.1.x at RCPT."""

import datetime

import psycopg2
import pytest

from helpers import query
from mailqueue import db as mqdb
from mailqueue.suppressions import Screened, Suppression, addresses_of, screen, screen_against
from ops_helpers import mailqueue

WHEN = datetime.datetime(2026, 12, 4, 20, 31, tzinfo=datetime.timezone.utc)


def job(job_id, email, cc=None, bcc=None, ignore=False):
    return dict(job_id=job_id, email=email, cc=cc, bcc=bcc, ignore_suppression=ignore)


def test_a_row_typed_by_hand_is_stored_lower_cased_and_checked(db):
    query(db, "INSERT INTO suppressions (email) VALUES ('  Someone@Example.COM ')")
    assert query(db, "SELECT email, reason, source FROM suppressions") == [
        ("someone@example.com", "manual", "manual")
    ]
    with pytest.raises(psycopg2.errors.UniqueViolation):
        query(db, "INSERT INTO suppressions (email) VALUES ('SOMEONE@example.com')")
    with pytest.raises(psycopg2.errors.CheckViolation):
        query(db, "INSERT INTO suppressions (email, reason) VALUES ('x@example.com', 'dislike')")


def test_the_screen_suppresses_whole_jobs_and_drops_cc_and_bcc_from_one_lookup(db):
    query(
        db,
        "INSERT INTO suppressions (email, reason, source, expires_at) VALUES "
        "('gone@example.com', 'hard_bounce', 'dsn', NULL), "
        "('angry@example.org', 'complaint', 'arf', NULL), "
        "('old@example.com', 'manual', 'cli', now() - interval '1 day')",
    )
    jobs = [
        job(1, "Gone@Example.com"),
        job(2, "fine@example.com", cc=["Kế toán <angry@example.org>", "ok@example.org"]),
        job(3, "fine2@example.com", bcc=["ok@example.org", "gone@example.com"]),
        job(4, "gone@example.com", ignore=True),  # a password reset: sent anyway
        job(5, "old@example.com"),  # its suppression has expired
        job(6, "not an address"),  # left for the Composer to refuse
    ]
    verdict = screen(db, jobs)
    assert set(verdict.suppressed) == {1}
    assert verdict.suppressed[1].startswith(
        "suppressed: gone@example.com is on the suppression list (hard_bounce from dsn, since "
    )
    assert verdict.dropped == {2: {"cc": [0]}, 3: {"bcc": [1]}}
    assert "cc[1] angry@example.org is on the suppression list (complaint" in verdict.notes[2]
    assert verdict.job_to_send(jobs[1])["cc"] == ["ok@example.org"]
    assert verdict.job_to_send(jobs[2])["bcc"] == ["ok@example.org"]
    assert jobs[1]["cc"] == ["Kế toán <angry@example.org>", "ok@example.org"], "unchanged"
    assert verdict.job_to_send(jobs[4]) == jobs[4]


def test_the_screen_reads_the_primary_key_once_per_batch(db):
    query(
        db,
        "INSERT INTO suppressions (email) SELECT 'x' || i || '@example.com' "
        "FROM generate_series(1, 5000) i",
    )
    query(db, "ANALYZE suppressions")
    wanted = addresses_of([job(i, "x%d@example.com" % i) for i in range(20)])
    with db.cursor() as cur:
        cur.execute("EXPLAIN " + mqdb.QUERIES["suppressed_among"], {"addresses": wanted})
        plan = "\n".join(row[0] for row in cur.fetchall())
    assert "suppressions_pkey" in plan and "Seq Scan" not in plan, plan


def test_the_pure_screen_without_suppressions_is_empty_and_a_dropped_last_cc_is_null():
    assert screen_against([job(1, "a@example.com")], {}) == Screened()
    hit = Suppression("c@example.com", "unsubscribe", "link", WHEN)
    verdict = screen_against([job(1, "a@example.com", cc=["c@example.com"])], {hit.email: hit})
    assert verdict.job_to_send(job(1, "a@example.com", cc=["c@example.com"]))["cc"] is None
    assert hit.describe().endswith("(unsubscribe from link, since 2026-12-04 20:31 UTC)")


def test_a_rejected_recipient_is_suppressed_once_with_its_event(db):
    [(job_id,)] = query(
        db,
        "INSERT INTO jobs (email, content_message) VALUES ('x@example.com', 'b') RETURNING job_id",
    )
    for _ in range(2):
        mqdb.run(
            db,
            "suppress_rejected_recipient",
            email="X@example.com",
            job_id=job_id,
            status="5.1.1",
            detail="550 5.1.1 <X@example.com>: Recipient address rejected: User unknown",
        )
    assert query(db, "SELECT email, reason, source, job_id FROM suppressions") == [
        ("x@example.com", "hard_bounce", "smtp", job_id)
    ]
    assert query(db, "SELECT kind, status, source FROM mail_events") == [
        ("rejected", "5.1.1", "smtp")
    ]


def test_the_suppress_command_adds_lists_imports_and_removes(db, make_config, tmp_path):
    config = make_config()

    def run(*args):
        result = mailqueue("suppress", args[0], "--config", config, *args[1:])
        assert "Traceback" not in result.stderr
        return result

    result = run("add", "A@example.com", "b@example.org", "not an address", "--expires", "90d")
    assert result.returncode == 0
    assert result.stdout.strip() == "added 2 (0 already there, 1 refused)"
    assert result.stderr.count("\n") == 1 and "'not an address'" in result.stderr
    assert run("add", "a@example.com").stdout.strip() == "added 0 (1 already there, 0 refused)"

    csv_file = tmp_path / "list.csv"
    csv_file.write_text(
        "name,email\nAn,c@example.com\nBad,c@@example.com\nDee,D@example.org\n", encoding="utf-8"
    )
    result = run("import", str(csv_file), "--reason", "unsubscribe")
    assert result.stdout.strip() == "added 2 (0 already there, 1 refused)"
    assert "line 2:" in result.stderr and result.stderr.count("\n") == 1
    plain = tmp_path / "list.txt"
    plain.write_text("e@example.com\n\n# a comment\nE@example.com\n", encoding="utf-8")
    assert run("import", str(plain)).stdout.strip() == "added 1 (0 already there, 0 refused)"

    rows = dict(query(db, "SELECT email, reason FROM suppressions"))
    assert rows == {
        "a@example.com": "manual",
        "b@example.org": "manual",
        "c@example.com": "unsubscribe",
        "d@example.org": "unsubscribe",
        "e@example.com": "manual",
    }
    [(expires,)] = query(
        db, "SELECT expires_at - now() FROM suppressions WHERE email = 'a@example.com'"
    )
    assert datetime.timedelta(days=89) < expires <= datetime.timedelta(days=90)

    import json

    listed = json.loads(run("list", "--json").stdout)
    assert {r["email"] for r in listed} == set(rows) and listed[0]["source"] == "cli"
    assert run("list").stdout.splitlines()[-1] == "5 suppressed address(es)"

    assert run("remove", "A@EXAMPLE.com", "nobody@example.com").stdout.strip() == "removed 1"
    assert query(db, "SELECT count(*) FROM suppressions") == [(4,)]

    result = run("add", "x@example.com", "--expires", "soon")
    assert result.returncode != 0 and result.stderr.startswith("error: --expires 'soon'")
    result = run("import", str(tmp_path / "missing.txt"))
    assert result.returncode != 0 and result.stderr.startswith("error: cannot read")
