"""The dashboard as a new user read it (issue 22): axis labels whole and inside
their chart in headless Chromium, charts as wide as the page, times that say
their zone, dead jobs not counted as failed attempts, display names masked, and
HEAD answered as uptime checkers send it."""

import json
import re
import shutil
import urllib.request

from helpers import query
from mailqueue.dashboard import STATIC, mask
from ops_helpers import Dashboard, delivery, finished_job
from test_dashboard import run_chromium

# Measures, in the rendered page, every label of every chart against the chart's
# box, and each chart's width against the page's (run where the page has no
# Content-Security-Policy: a copy of the served page, opened as a file).
MEASURE = """
<script>
(function () {
  var panel = document.getElementById("panel").getBoundingClientRect();
  var charts = [];
  document.querySelectorAll("svg.chart").forEach(function (svg) {
    var box = svg.getBoundingClientRect();
    var labels = [];
    svg.querySelectorAll(":scope > text").forEach(function (text) {
      var r = text.getBoundingClientRect();
      labels.push({text: text.textContent, left: r.left - box.left, right: box.right - r.right,
                   top: r.top - box.top, bottom: box.bottom - r.bottom, width: r.width});
    });
    charts.push({id: svg.id, width: box.width, panel: panel.width, labels: labels});
  });
  var out = document.createElement("pre");
  out.id = "measured";
  out.textContent = JSON.stringify(charts);
  document.body.appendChild(out);
}());
</script>
"""


def measured_in_chromium(page, tmp_path):
    folder = tmp_path / "page"
    (folder / "static").mkdir(parents=True)
    shutil.copy(STATIC + "/dashboard.css", str(folder / "static"))
    (folder / "index.html").write_text(page.replace("</body>", MEASURE + "</body>"), "utf-8")
    dom = run_chromium("--window-size=1000,1100", "--dump-dom", (folder / "index.html").as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    found = re.search(r'<pre id="measured">(.*?)</pre>', dom.stdout, re.S)
    assert found, dom.stdout[-2000:]
    return {c["id"]: c for c in json.loads(found.group(1).replace("&quot;", '"'))}


def test_long_axis_labels_are_whole_and_inside_their_chart_in_chromium(db, make_config, tmp_path):
    # 12,345 mails in one minute (a five-digit peak) and a lag of 10.44 s in
    # another: the labels a new user saw clipped to "2345" and ".0.44 s".
    query(
        db,
        "INSERT INTO jobs (email, content_message, status, attempts, start_time, end_time) "
        "SELECT 'bulk' || n || '@example.com', 'x', 'completed', 1, "
        "       date_trunc('minute', LOCALTIMESTAMP) - interval '5 minutes' + interval '10 s', "
        "       date_trunc('minute', LOCALTIMESTAMP) - interval '5 minutes' + interval '10.01 s' "
        "  FROM generate_series(1, 12345) AS n",
    )
    finished_job(db, "completed", "slow@example.com", lag=10.44, ago=120)
    with Dashboard(make_config(), tmp_path) as dashboard:
        status, _, page = dashboard.get("/")
    assert status == 200
    charts = measured_in_chromium(page, tmp_path)
    assert set(charts) == {"chart-throughput", "chart-lag"}
    throughput = [label["text"] for label in charts["chart-throughput"]["labels"]]
    lag = [label["text"] for label in charts["chart-lag"]["labels"]]
    assert "12345" in throughput, throughput
    assert "10.44 s" in lag, lag
    for chart in charts.values():
        # as wide as the page's panel, not half of it
        assert chart["width"] >= 0.95 * chart["panel"], chart
        for label in chart["labels"]:
            assert label["width"] > 0, label
            for side in ("left", "right", "top", "bottom"):
                assert label[side] >= -0.5, "%s: %r sticks out (%s)" % (chart["id"], label, side)
        # the time axis says its zone
        times = [label["text"] for label in chart["labels"] if ":" in label["text"]]
        assert len(times) == 2 and all(t.endswith(" UTC") for t in times), times


def test_dead_jobs_are_not_counted_as_failed_attempts_and_times_say_utc(db, make_config, tmp_path):
    bad_input = finished_job(db, "dead", "broken@example.com", ago=60)
    delivery(db, bad_input, "dead", "email 'broken' is not a valid address", None, ago=60)
    retried = finished_job(db, "failed", "later@example.com", ago=30)
    delivery(db, retried, "failed", "mail refused: 451 4.3.0 Try again later", 451, ago=30)
    with Dashboard(make_config(), tmp_path) as dashboard:
        page = dashboard.get("/")[2]
    assert re.search(r'id="failed-last-hour">.*?retried.*?<div class="value">1<', page)
    assert re.search(r'id="dead-last-hour">.*?<div class="value">1<', page)
    when = re.findall(r"<tr><td>([^<]*)</td>", page)
    assert len(when) == 2 and all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC$", w) for w in when)
    assert re.search(r'id="updated">updated \d\d:\d\d:\d\d UTC<', page)


def test_a_display_name_is_masked_with_its_address():
    assert mask("Someone <someone@example.com>") == "s***@example.com"
    assert mask("  <a.b@example.org> ") == "a***@example.org"
    assert mask("Nguyễn Văn An <an@example.com>") == "a***@example.com"


def test_head_is_answered_as_get_without_a_body(db, make_config, tmp_path):
    with Dashboard(make_config(), tmp_path) as dashboard:
        for path in ("/", "/metrics", "/static/dashboard.css"):
            request = urllib.request.Request(dashboard.url + path, method="HEAD")
            with urllib.request.urlopen(request, timeout=10) as response:
                assert response.status == 200
                assert response.read() == b""
                length = int(response.headers["Content-Length"])
            assert length > 0
        assert dashboard.get("/nothing-here")[0] == 404
