"""The seed's flow, end to end: jobs -> producer -> queue -> consumer -> SMTP -> status."""

import email
import email.policy

import pytest

from helpers import insert_jobs, query, recipients, status_counts, wait_until


def parse(content):
    return email.message_from_bytes(content, policy=email.policy.default)


@pytest.mark.parametrize("pipelining", [True, False])
def test_seed_example_insert_is_sent_and_completed(pipelining, db, smtp, make_config, scripts):
    smtp.pipelining = pipelining
    query(
        db,
        "INSERT INTO jobs(email, content_message) values ('wind2941999@example.com', 'test queue')",
    )
    config = make_config()

    produced = scripts.run("producer.py", "--config", config, "--once")
    assert produced.returncode == 0, produced.stderr
    assert query(db, "SELECT status, start_time IS NOT NULL FROM jobs") == [("queued", True)]

    consumed = scripts.run("consumer.py", "--config", config, "--drain")
    assert consumed.returncode == 0, consumed.stderr

    [(sender, rcpts, content, _)] = smtp.received
    assert sender == "noreply@example.com"
    assert rcpts == ["wind2941999@example.com"]
    message = parse(content)
    assert message["To"] == "wind2941999@example.com"
    assert message["Subject"] == "Message from Mail Queue"
    assert message.get_payload(decode=True) == b"test queue"
    [(status, attempts, last_error, ordered)] = query(
        db, "SELECT status, attempts, last_error, start_time <= end_time FROM jobs"
    )
    assert (status, attempts, last_error, ordered) == ("completed", 1, None, True)
    assert query(db, "SELECT count(*) FROM queue") == [(0,)]


def test_vietnamese_subject_and_body_arrive_byte_exact(db, smtp, make_config, scripts):
    subject = "Thông báo: đơn hàng #42 đã được giao — cảm ơn quý khách!"
    body = (
        "Kính gửi Nguyễn Văn Anh,\n\nĐơn hàng của bạn đã được giao thành công.\n"
        "Chữ có dấu: ắ ằ ẳ ẵ ặ ấ ầ ẩ ẫ ậ ế ề ể ễ ệ ố ồ ổ ỗ ộ ớ ờ ở ỡ ợ ứ ừ ử ữ ự\n"
    )
    insert_jobs(db, [("khach.hang@example.com", body, subject)])
    config = make_config()
    assert scripts.run("producer.py", "--config", config, "--once").returncode == 0
    assert scripts.run("consumer.py", "--config", config, "--drain").returncode == 0

    [(_, _, content, _)] = smtp.received
    message = parse(content)
    assert message["Subject"] == subject
    assert message.get_content_charset() == "utf-8"
    # Text travels in MIME's canonical form, lines ending in CRLF; every byte of
    # the text itself arrives unchanged.
    assert message.get_payload(decode=True) == body.replace("\n", "\r\n").encode("utf-8")
    assert content.isascii(), "the message itself is 7-bit: headers and body are encoded"


def test_four_consumers_and_two_producers_send_2000_mails_exactly_once(
    db, smtp, make_config, scripts
):
    config = make_config()
    consumers = [scripts.start("consumer.py", "--config", config) for _ in range(4)]
    producers = [scripts.start("producer.py", "--config", config) for _ in range(2)]
    expected = ["user%d@example.com" % i for i in range(2000)]
    for start in range(0, 2000, 100):  # 20 inserts: the producers are woken many times
        insert_jobs(
            db,
            [(address, "mail for %s" % address, None) for address in expected[start : start + 100]],
        )

    smtp.wait_for(2000, timeout=180)
    wait_until(lambda: status_counts(db) == {"completed": 2000}, what="2000 completed jobs")
    for proc in consumers + producers:
        assert scripts.stop(proc) == 0, scripts.log_of(proc)

    assert sorted(recipients(smtp)) == sorted(expected), "every mail exactly once"
    assert query(
        db, "SELECT count(*) FROM jobs WHERE NOT (start_time <= end_time) OR attempts <> 1"
    ) == [(0,)]
    assert query(db, "SELECT count(*) FROM queue") == [(0,)]
    for proc in consumers:
        assert "Traceback" not in scripts.log_of(proc)


def test_failing_smtp_server_leads_to_failed_then_successful_retry(db, smtp, make_config, scripts):
    tries = []

    def fail_the_first_try(envelope):
        tries.append(envelope.rcpt_tos)
        if len(tries) == 1:
            return "451 4.3.0 Temporary local problem, try again"

    smtp.behaviour = fail_the_first_try
    insert_jobs(db, [("retry@example.com", "second time lucky", None)])
    config = make_config(queue={"retry_delay": 0.5, "max_retry_delay": 1})

    assert scripts.run("producer.py", "--config", config, "--once").returncode == 0
    assert scripts.run("consumer.py", "--config", config, "--drain").returncode == 0
    [(status, attempts, last_error, delayed)] = query(  # created just before it failed
        db, "SELECT status, attempts, last_error, run_at >= created_at + interval '0.5 s' FROM jobs"
    )
    assert (status, attempts, delayed) == ("failed", 1, True)
    assert "451 4.3.0 Temporary local problem" in last_error
    assert smtp.received == []

    producer = scripts.start("producer.py", "--config", config)
    consumer = scripts.start("consumer.py", "--config", config)
    smtp.wait_for(1)
    wait_until(lambda: status_counts(db) == {"completed": 1}, what="the retry to complete")
    assert scripts.stop(producer) == 0 and scripts.stop(consumer) == 0
    assert query(db, "SELECT attempts, last_error FROM jobs") == [(2, None)]
    assert len(tries) == 2 and len(smtp.received) == 1


def test_permanent_rejection_marks_job_dead_with_the_server_reply(db, smtp, make_config, scripts):
    smtp.behaviour = lambda envelope: "550 5.1.1 Mailbox unavailable: no such user here"
    insert_jobs(db, [("nobody@example.com", "bounce me", None)])
    config = make_config()
    assert scripts.run("producer.py", "--config", config, "--once").returncode == 0
    assert scripts.run("consumer.py", "--config", config, "--drain").returncode == 0

    [(status, attempts, last_error, finished)] = query(
        db, "SELECT status, attempts, last_error, end_time IS NOT NULL FROM jobs"
    )
    assert (status, attempts, finished) == ("dead", 1, True)
    assert "550 5.1.1 Mailbox unavailable: no such user here" in last_error


def test_job_is_dead_once_max_attempts_are_spent(db, smtp, make_config, scripts):
    tries = []

    def always_busy(envelope):
        tries.append(1)
        return "421 4.7.0 Too busy, come back later"

    smtp.behaviour = always_busy
    insert_jobs(db, [("busy@example.com", "never lands", None)])
    config = make_config(queue={"max_attempts": 3, "retry_delay": 0, "max_retry_delay": 0})
    producer = scripts.start("producer.py", "--config", config)
    consumer = scripts.start("consumer.py", "--config", config)
    wait_until(lambda: status_counts(db) == {"dead": 1}, what="the job to be dead")
    assert scripts.stop(producer) == 0 and scripts.stop(consumer) == 0

    [(attempts, last_error)] = query(db, "SELECT attempts, last_error FROM jobs")
    assert attempts == 3 and len(tries) == 3
    assert "421 4.7.0 Too busy" in last_error
    assert smtp.received == []


def test_bad_address_is_dead_and_does_not_hold_up_the_others(db, smtp, make_config, scripts):
    insert_jobs(
        db,
        [
            ("good1@example.com", "one", None),
            ("not an address", "never sent", None),
            ("good2@example.com", "two", None),
        ],
    )
    config = make_config()
    assert scripts.run("producer.py", "--config", config, "--once").returncode == 0
    consumed = scripts.run("consumer.py", "--config", config, "--drain")
    assert consumed.returncode == 0 and "Traceback" not in consumed.stderr

    rows = query(db, "SELECT email, status, attempts, last_error FROM jobs ORDER BY job_id")
    assert [(r[0], r[1]) for r in rows] == [
        ("good1@example.com", "completed"),
        ("not an address", "dead"),
        ("good2@example.com", "completed"),
    ]
    assert rows[1][2] == 0, "no send was attempted"
    assert "not a valid address" in rows[1][3]
    assert sorted(recipients(smtp)) == ["good1@example.com", "good2@example.com"]


def test_sigterm_stops_an_idle_consumer_and_producer_with_exit_code_0(make_config, scripts):
    config = make_config()
    consumer = scripts.start("consumer.py", "--config", config)
    producer = scripts.start("producer.py", "--config", config)
    for proc, line in ((consumer, "consuming from"), (producer, "producing into")):
        wait_until(lambda: line in scripts.log_of(proc), what=line)
        assert scripts.stop(proc, timeout=10) == 0
        assert "stopped" in scripts.log_of(proc)
