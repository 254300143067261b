"""The CPU cost of building one mail, by kind: what mailqueue.message.Composer.build
spends per job before anything is sent (one core, no database, no SMTP).

    python bench/build_cost.py              # the table
    python bench/build_cost.py --quick      # fewer rounds
    python bench/build_cost.py --json       # the figures as JSON

From bench/bench.py: `from build_cost import build_costs` (bench/ is on sys.path
there), then build_costs(quick) -> [(kind, microseconds per mail, bytes)].

The last kind is not a build: a stored template rendered (mailqueue.templates,
as the producer does before queueing: a cached, compiled template of about 400
bytes in its sandbox; issue 21's target is <= 100 µs per mail); its bytes are
the rendered subject, text and HTML.

The kinds are measured in turns, several rounds, and the median round is shown:
on a shared machine, minutes apart can differ by a third. DKIM is a plain mail
signed with a 2048-bit RSA key (made here with `cryptography`, a test dependency).
"""

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mailqueue import signing, templates  # noqa: E402
from mailqueue.config import SmtpSettings  # noqa: E402
from mailqueue.message import Composer  # noqa: E402

CREATED = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
TEXT = (
    "Kính gửi quý khách, đơn hàng của bạn đã được xác nhận và sẽ được giao trong "
    "hai ngày làm việc. Cảm ơn bạn đã mua sắm cùng chúng tôi!\n"
) * 7  # ~1 KB, as bench.py
HTML = (
    "<!DOCTYPE html><html><head><meta charset='utf-8'><style>p{margin:0 0 1em}"
    "</style></head><body><img src='cid:logo' alt='Logo'><h1>Đơn hàng #42</h1>"
    + "<p>Kính gửi quý khách, đơn hàng của <b>bạn</b> đã được xác nhận và sẽ được giao "
    "trong hai ngày làm việc. <a href='https://example.org/o/42'>Xem đơn hàng</a></p>"
    * 7
    + "<table><tr><td>Bàn gỗ</td><td>1</td><td>2.500.000 ₫</td></tr></table>"
    "</body></html>"
)  # ~2 KB
PDF = bytes(range(256)) * 400  # 100 KB
LOGO = bytes(range(256)) * 16  # 4 KB


def _job(**columns):
    job = dict(
        job_id=42,
        email="khach.hang@example.com",
        subject="Đơn hàng #42 đã được xác nhận",
        content_message=TEXT,
        created_at=CREATED,
        html_message=None,
        sender=None,
        reply_to=None,
        cc=None,
        bcc=None,
        headers=None,
    )
    job.update(columns)
    return job


def _file(filename, content, content_type, content_id=None):
    return dict(
        filename=filename, content=content, content_type=content_type, content_id=content_id
    )


def _dkim_key(directory):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = os.path.join(directory, "dkim.pem")
    with open(path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )
    return signing.load_key(
        {"domain": "example.org", "selector": "bench", "private_key_file": path}
    )


# A stored template of a few hundred bytes (subject, text, HTML), as users write them.
TEMPLATE = templates.Template(
    "order-confirmed",
    "vi",
    "Đơn hàng #{{ order.id }} đã được xác nhận",
    "Kính gửi {{ name }},\n\nĐơn hàng #{{ order.id }} ({{ order.lines | length }} món, "
    "{{ order.total }} ₫) sẽ được giao trong {{ days }} ngày làm việc.\n"
    "{% for line in order.lines %}- {{ line.name }} x {{ line.qty }}\n{% endfor %}",
    "<p>Kính gửi <b>{{ name }}</b>,</p><p>Đơn hàng #{{ order.id }} sẽ được giao trong "
    "{{ days }} ngày.</p><ul>{% for line in order.lines %}<li>{{ line.name }} x "
    "{{ line.qty }}</li>{% endfor %}</ul>",
    CREATED,
)
CONTEXT = {
    "name": "Nguyễn Thị Lan <lan>",
    "days": 2,
    "order": {
        "id": 42,
        "total": "2.500.000",
        "lines": [{"name": "Bàn gỗ", "qty": 1}, {"name": "Ghế", "qty": 4}],
    },
}


class _Rendering:
    """A stored template rendered for one job, measured like a build."""

    def __init__(self):
        self.renderer = templates.Renderer()

    def build(self, job, attachments=()):
        rendered = self.renderer.render(TEMPLATE, CONTEXT)
        return _Sized(sum(len(p.encode("utf-8")) for p in rendered.__dict__.values()))


class _Sized:
    def __init__(self, size):
        self.data = b" " * size


def kinds(dkim_key):
    """(name, composer, job, attachments) for each kind of mail measured."""
    plain = Composer(SmtpSettings(sender="Cửa hàng <shop@example.org>"))
    signed = Composer(SmtpSettings(sender="Cửa hàng <shop@example.org>", dkim=dkim_key))
    extras = dict(
        sender="Cửa hàng <shop@example.org>",
        reply_to="help@example.org",
        cc=["ke.toan@example.com"],
        bcc=["archive@example.com"],
        headers={
            "List-Unsubscribe": "<https://example.org/u/42>",
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        },
    )
    return [
        ("plain text (the seed's job)", plain, _job(), ()),
        ("plain text + sender, Reply-To, Cc, Bcc, headers", plain, _job(**extras), ()),
        ("HTML + text", plain, _job(html_message=HTML), ()),
        ("HTML only (text derived)", plain, _job(content_message=None, html_message=HTML), ()),
        (
            "plain text + 100 KB attachment",
            plain,
            _job(),
            (_file("hoá đơn.pdf", PDF, "application/pdf"),),
        ),
        (
            "HTML + text + inline logo + 100 KB PDF",
            plain,
            _job(html_message=HTML),
            (
                _file("logo.png", LOGO, "image/png", "logo"),
                _file("hoá đơn.pdf", PDF, "application/pdf"),
            ),
        ),
        ("plain text, DKIM-signed", signed, _job(), ()),
        (
            "HTML + 100 KB PDF, DKIM-signed",
            signed,
            _job(html_message=HTML),
            (_file("hoá đơn.pdf", PDF, "application/pdf"),),
        ),
        ("template rendered (cached, ~400 B; not a build)", _Rendering(), None, ()),
    ]


def _round(composer, job, attachments, seconds):
    """Microseconds per build over about `seconds`."""
    count, started = 0, time.perf_counter()
    while True:
        for _ in range(10):
            composer.build(job, attachments)
        count += 10
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return elapsed / count * 1e6


def build_costs(quick=False):
    """[(kind, median microseconds per mail, message bytes)], measured in turns."""
    rounds, seconds = (3, 0.2) if quick else (7, 0.5)
    with tempfile.TemporaryDirectory() as directory:
        measured = kinds(_dkim_key(directory))
        times = {name: [] for name, _, _, _ in measured}
        for _ in range(rounds):
            for name, composer, job, attachments in measured:
                times[name].append(_round(composer, job, attachments, seconds))
        return [
            (name, statistics.median(times[name]), len(composer.build(job, attachments).data))
            for name, composer, job, attachments in measured
        ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    costs = build_costs(args.quick)
    if args.json:
        print(
            json.dumps(
                [{"kind": k, "us_per_mail": round(us, 1), "bytes": size} for k, us, size in costs],
                indent=2,
            )
        )
        return
    print("Cost of building one mail (median of rounds, one core)")
    print("%-50s %12s %10s %12s" % ("kind", "µs per mail", "mails/s", "bytes"))
    for kind, us, size in costs:
        print("%-50s %12.1f %10.0f %12d" % (kind, us, 1e6 / us, size))


if __name__ == "__main__":
    main()
