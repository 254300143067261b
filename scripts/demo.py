"""The demo: real consumer.py and producer.py against throwaway servers.

Starts a throwaway PostgreSQL and a local SMTP server that stores mail in a
Maildir, applies sql/schema.sql, inserts sample jobs (Vietnamese among them, a
few HTML mails with an inline logo and a PDF invoice, and a few bad addresses),
runs two consumers and a producer until every job is finished, and reports what
happened. Run it with scripts/demo.
"""

import argparse
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
import zlib

import psycopg2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # tests/devservers.py: throwaway servers

from devservers import SmtpSink, ThrowawayPostgres, apply_schema  # noqa: E402

SUBJECTS = [
    "Xác nhận đơn hàng của bạn",
    "Chào mừng bạn đến với cửa hàng",
    "Your order has shipped",
    "Nhắc lịch hẹn ngày mai",
    "Password reset requested",
    None,
]
BODIES = [
    "Xin chào {name},\n\nCảm ơn bạn đã đặt hàng. Đơn hàng số {n} đang được chuẩn bị.\n\n"
    "Trân trọng,\nCửa hàng",
    "Hello {name},\n\nYour parcel {n} left our warehouse today.\n\nRegards,\nThe shop",
    "Chào {name},\n\nBạn có lịch hẹn lúc 9 giờ sáng mai. Vui lòng đến sớm 10 phút.\n",
]
NAMES = ["Nguyễn Văn An", "Trần Thị Bình", "Lê Hoàng Cường", "Phạm Minh Dũng", "Alice", "Bob"]
BAD_ADDRESSES = ["not-an-address", "a@example.com\r\nBcc: victim@example.org", ""]


def sample_jobs(count):
    rng = random.Random(42)
    jobs = []
    for n in range(count - len(BAD_ADDRESSES)):
        name = rng.choice(NAMES)
        jobs.append(
            (
                "customer%d@example.com" % n,
                rng.choice(BODIES).format(name=name, n=n),
                rng.choice(SUBJECTS),
            )
        )
    jobs += [(address, "this one cannot be sent", "Bad address") for address in BAD_ADDRESSES]
    return jobs


HTML_INVOICE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Hoá đơn</title>
<style>body {{ font-family: sans-serif; }} td {{ padding: 4px 12px; }}</style></head>
<body><p><img src="cid:logo" alt="Cửa hàng Đồ Gỗ" width="48" height="48"></p>
<h1>Cảm ơn {name}!</h1>
<p>Đơn hàng số <b>{n}</b> đã được thanh toán. Hoá đơn ở tệp PDF đính kèm.</p>
<table><tr><td>Bàn gỗ sồi</td><td>1</td><td>2.500.000 ₫</td></tr>
<tr><td>Ghế đẩu</td><td>4</td><td>1.200.000 ₫</td></tr></table>
<p><a href="https://shop.example.org/orders/{n}">Xem đơn hàng</a></p></body></html>"""

# A job and its files in one statement: a consumer never sees one without the other.
INSERT_HTML_JOB = """
WITH job AS (
  INSERT INTO jobs (email, subject, html_message, sender, headers)
  VALUES (%(email)s, %(subject)s, %(html)s, 'Cửa hàng Đồ Gỗ <shop@example.org>',
          %(headers)s)
  RETURNING job_id
)
INSERT INTO attachments (job_id, filename, content_type, content, content_id)
SELECT job_id, f.filename, f.content_type, f.content, f.content_id
  FROM job, (VALUES ('logo.png', 'image/png', %(logo)s::bytea, 'logo'),
                    (%(pdf_name)s, 'application/pdf', %(pdf)s::bytea, NULL))
       AS f(filename, content_type, content, content_id)
"""


def logo_png(size=48):
    """A small real PNG: an amber disc on white."""
    rows = []
    for y in range(size):
        row = bytearray([0])  # filter: none
        for x in range(size):
            inside = (x - size / 2 + 0.5) ** 2 + (y - size / 2 + 0.5) ** 2 < (size / 2 - 2) ** 2
            row += bytes((201, 125, 32) if inside else (255, 255, 255))
        rows.append(bytes(row))

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"".join(rows)))
        + chunk(b"IEND", b"")
    )


def invoice_pdf(n):
    """A one-page PDF that says which order it is for."""
    text = b"BT /F1 24 Tf 72 720 Td (Invoice for order %d) Tj ET" % n
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
        b"/Resources << /Font << /F1 4 0 R >> >> /Contents 5 0 R >>",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        b"<< /Length %d >>\nstream\n%s\nendstream" % (len(text), text),
    ]
    pdf, offsets = b"%PDF-1.4\n", []
    for number, body in enumerate(objects, 1):
        offsets.append(len(pdf))
        pdf += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(pdf)
    pdf += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    pdf += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    pdf += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return pdf


def insert_html_jobs(cur, count):
    """HTML invoices with an inline logo and a PDF, one statement each."""
    logo = psycopg2.Binary(logo_png())
    for n in range(count):
        name = NAMES[n % len(NAMES)]
        cur.execute(
            INSERT_HTML_JOB,
            dict(
                email="html%d@example.com" % n,
                subject="Hoá đơn cho đơn hàng %d" % n,
                html=HTML_INVOICE.format(name=name, n=n),
                logo=logo,
                pdf_name="Hoá đơn %d.pdf" % n,
                pdf=psycopg2.Binary(invoice_pdf(n)),
                headers=json.dumps(
                    {
                        "List-Unsubscribe": "<https://shop.example.org/unsubscribe>",
                        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
                    }
                ),
            ),
        )


def progress(done, total, width=40):
    filled = int(width * done / total)
    sys.stdout.write("\r  [%s%s] %d/%d" % ("#" * filled, "." * (width - filled), done, total))
    sys.stdout.flush()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500, help="how many sample jobs")
    parser.add_argument("--consumers", type=int, default=2, help="consumer processes")
    parser.add_argument(
        "--dashboard",
        action="store_true",  # issue 13
        help="at the end, serve the dashboard on the demo's database until Ctrl-C",
    )
    parser.add_argument(
        "--output",
        default=os.path.join(ROOT, "demo-output"),
        help="folder for the Maildir, the config and the logs",
    )
    args = parser.parse_args()
    os.makedirs(args.output, exist_ok=True)
    maildir = os.path.join(args.output, "Maildir")
    if os.path.isdir(maildir):
        import shutil

        shutil.rmtree(maildir)

    print("Starting a throwaway PostgreSQL and a local SMTP server ...")
    with ThrowawayPostgres(settings=()) as pg, SmtpSink(maildir=maildir) as smtp:
        admin = psycopg2.connect(pg.dsn())
        admin.autocommit = True
        admin.cursor().execute("CREATE DATABASE mailqueue")
        admin.close()
        apply_schema(pg.dsn("mailqueue"))
        config_path = os.path.join(args.output, "config.json")
        with open(config_path, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "database": pg.settings_for("mailqueue"),
                    "smtp": {"host": "127.0.0.1", "port": smtp.port},
                },
                f,
                indent=2,
            )
        print(
            "  PostgreSQL %s on 127.0.0.1:%d, SMTP on 127.0.0.1:%d"
            % (pg.version(), pg.port, smtp.port)
        )

        db = psycopg2.connect(pg.dsn("mailqueue"))
        db.autocommit = True
        cur = db.cursor()
        # --jobs counts every job, the HTML ones included
        html_jobs = max(3, args.jobs // 50)
        jobs = sample_jobs(max(args.jobs - html_jobs, len(BAD_ADDRESSES) + 1))
        cur.execute(
            "INSERT INTO jobs (email, content_message, subject) VALUES "
            + ",".join(cur.mogrify("(%s, %s, %s)", job).decode() for job in jobs)
        )
        insert_html_jobs(cur, html_jobs)
        print(
            "Inserted %d jobs (%d HTML with an inline logo and a PDF, %d with a bad "
            "address, to show 'dead')." % (len(jobs) + html_jobs, html_jobs, len(BAD_ADDRESSES))
        )
        total = len(jobs) + html_jobs

        logs = open(os.path.join(args.output, "scripts.log"), "w")
        command = lambda script: [  # noqa: E731
            sys.executable,
            os.path.join(ROOT, script),  # noqa: E731
            "--config",
            config_path,
        ]
        started = time.monotonic()
        workers = [
            subprocess.Popen(command("consumer.py"), stderr=logs, cwd=ROOT)
            for _ in range(args.consumers)
        ]
        workers.append(subprocess.Popen(command("producer.py"), stderr=logs, cwd=ROOT))
        print("Running %d consumer(s) and a producer ..." % args.consumers)
        try:
            while True:
                cur.execute(
                    "SELECT count(*) FILTER (WHERE status IN ('completed', 'dead')) FROM jobs"
                )
                finished = cur.fetchone()[0]
                if sys.stdout.isatty():
                    progress(finished, total)
                if finished == total:
                    break
                if any(w.poll() is not None for w in workers):
                    raise SystemExit("a script stopped early; see %s" % logs.name)
                time.sleep(0.1)
            elapsed = time.monotonic() - started
        finally:
            for w in workers:
                w.send_signal(signal.SIGTERM)
            for w in workers:
                w.wait(timeout=60)
        if sys.stdout.isatty():
            print()

        cur.execute("SELECT status, count(*) FROM jobs GROUP BY status ORDER BY status")
        counts = cur.fetchall()
        cur.execute("SELECT email, last_error FROM jobs WHERE status = 'dead' ORDER BY job_id")
        dead = cur.fetchall()
        db.close()
        # Operating it (issue 13): the report now, the dashboard while the database is up.
        ops = [sys.executable, "-m", "mailqueue", "report", "--config", config_path]
        report = subprocess.run(ops, cwd=ROOT, capture_output=True, text=True)
        report = report.stdout or report.stderr
        if args.dashboard:
            print("\n%s\nThe dashboard: http://127.0.0.1:8025/ (Ctrl-C ends the demo)" % report)
            try:
                subprocess.run(ops[:3] + ["dashboard", "--config", config_path], cwd=ROOT)
            except KeyboardInterrupt:
                pass

    sent = dict(counts).get("completed", 0)
    print("\nDone in %.2f s: %d mails sent, %.0f mails/s." % (elapsed, sent, sent / elapsed))
    print("Jobs per status:")
    for status, count in counts:
        print("  %-10s %d" % (status, count))
    print("Why the dead ones are dead (jobs.last_error):")
    for address, error in dead:
        print("  %-45r %s" % (address, error))
    print(
        "The mails are in %s (e.g. mutt -f %s); the scripts' logs in %s."
        % (maildir, maildir, logs.name)
    )
    html_mail = _a_mail_with_attachments(maildir)
    if html_mail:
        print("An HTML mail with its logo and PDF: %s" % html_mail)
    print(
        "\npython -m mailqueue report --config %s said (its window is the last hour, "
        "so its per-minute rate is an hour's average):\n%s" % (config_path, report)
    )
    print(
        "To see the dashboard: ./scripts/demo --dashboard, then open http://127.0.0.1:8025/ "
        "(on your database: python -m mailqueue dashboard --config config.json)"
    )


def _a_mail_with_attachments(maildir):
    """The path of one stored mail that is multipart/mixed, or None."""
    folder = os.path.join(maildir, "new")
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else ():
        path = os.path.join(folder, name)
        with open(path, "rb") as f:
            if b"multipart/mixed" in f.read(4096):
                return path
    return None


if __name__ == "__main__":
    main()
