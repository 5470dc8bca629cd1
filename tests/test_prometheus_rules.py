"""infra/prometheus and infra/grafana: config and rules checked and unit-tested with promtool; every
dashboard query parses and names only OEL metrics; and, end to end against the local Prometheus, every
panel returns data from a scraped exporter of oel/metrics.py and an alert fires when provoked.

The end-to-end test uses a fixture exporter (a subprocess publishing sample values of every metric in
oel/metrics.py on 127.0.0.1:9109, job "oel-fixture" in infra/prometheus/prometheus.yml), because it
must not depend on the services' own tests; the same queries run against the real services once they
run under the local stack (docs/operations.md says how to look at them).
"""

from __future__ import annotations

import fcntl
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from oel import metrics

REPO = Path(__file__).resolve().parent.parent
PROM_DIR = REPO / "infra" / "prometheus"
RULE_FILES = sorted((PROM_DIR / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROM_DIR / "tests").glob("*.yml"))
DASHBOARD = REPO / "infra" / "grafana" / "dashboards" / "oel.json"
PROMTOOL = "/usr/bin/promtool"
FIXTURE_PORT = 9109
FIXTURE_JOB = "oel-fixture"
# Series that Prometheus itself makes, which dashboards and rules may use beside OEL's.
PROMETHEUS_OWN = {"up", "ALERTS", "ALERTS_FOR_STATE"}
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                   "offset", "inf", "nan", "Inf", "NaN", "atan2"}


def _promtool(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    if not Path(PROMTOOL).is_file():
        pytest.fail(f"{PROMTOOL} is missing: it comes with Debian's prometheus package (`oel stack install`)", pytrace=False)
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True)


# --- promtool ------------------------------------------------------------------------------------


def test_promtool_check_config():
    out = _promtool("check", "config", str(PROM_DIR / "prometheus.yml"))
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_check_rules():
    assert RULE_FILES
    out = _promtool("check", "rules", *map(str, RULE_FILES))
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_test_rules():
    assert RULE_TESTS
    out = _promtool("test", "rules", *map(str, RULE_TESTS), cwd=PROM_DIR / "tests")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def _alerts() -> list[dict]:
    return [r for f in RULE_FILES for g in yaml.safe_load(f.read_text())["groups"] for r in g["rules"] if "alert" in r]


def test_the_issue_alerts_exist_and_each_has_a_unit_test_and_a_runbook():
    names = {a["alert"] for a in _alerts()}
    for required in ("OELPipelineStalled", "OELConsumerLagGrowing", "OELDeadLetterRateHigh", "OELRoundRejected", "OELModelRollback"):
        assert required in names
    tested = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            tested |= {t["alertname"] for t in case.get("alert_rule_test", []) if t.get("exp_alerts")}
    assert names <= tested, f"alerts without a firing unit test: {names - tested}"
    ops = (REPO / "docs" / "operations.md").read_text().lower()
    for alert in _alerts():
        assert alert["labels"]["severity"] in {"info", "warning", "critical"}
        anchor = alert["annotations"]["runbook_url"].split("#")[1]
        assert re.search(rf"^#+ .*{anchor}|<a id=\"{anchor}\"", ops, re.M) or f"### {anchor}" in ops, f"no section for {anchor}"


# --- PromQL names ----------------------------------------------------------------------------------


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (a tokenizer sufficient for our queries: strings,
    label matchers, ranges, grouping clauses and offsets are removed; what is left that is not a
    function call, keyword or number is a metric name)."""
    s = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\boffset\s+-?\w+", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", s):
        if s[m.end():].lstrip().startswith("(") or m.group(0) in PROMQL_KEYWORDS:
            continue
        names.add(m.group(0))
    return names


def test_metric_name_tokenizer():
    assert metric_names('sum by (topic) (rate(oel_events_consumed_total{topic=~"a.b"}[5m])) > 0.05') == {"oel_events_consumed_total"}
    assert metric_names("a unless on (x) b offset 30m or histogram_quantile(0.5, c_bucket) * 1e-3") == {"a", "b", "c_bucket"}


def _substitute(expr: str, namespace: str = ".*") -> str:
    return expr.replace("$__rate_interval", "1m").replace("$namespace", namespace)


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panel_queries() -> list[tuple[str, str]]:
    """(panel title, expr) for every query of every panel."""
    out = []
    for panel in _dashboard()["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def test_dashboard_json_is_what_the_generator_makes():
    sys.path.insert(0, str(REPO / "infra" / "grafana"))
    try:
        import generate
    finally:
        sys.path.pop(0)
    assert _dashboard() == json.loads(json.dumps(generate.build())), "run python infra/grafana/generate.py"


def test_dashboard_covers_rounds_and_pipeline_and_uses_the_provisioned_datasource():
    d = _dashboard()
    assert [p["title"] for p in d["panels"] if p["type"] == "row"] == ["Learning rounds", "Pipeline health"]
    assert len(_panel_queries()) >= 30
    ds = yaml.safe_load((REPO / "infra/grafana/provisioning/datasources/oel-prometheus.yml").read_text())["datasources"][0]
    for panel in d["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == ds["uid"]
    provider = yaml.safe_load((REPO / "infra/grafana/provisioning/dashboards/oel.yml").read_text())["providers"][0]
    assert provider["type"] == "file" and provider["options"]["path"]


def test_dashboard_and_rules_name_only_oel_metrics():
    allowed = metrics.exposed_names() | PROMETHEUS_OWN
    exprs = [(t, e) for t, e in _panel_queries()]
    exprs += [("annotation " + a["name"], a["expr"]) for a in _dashboard()["annotations"]["list"]]
    for var in _dashboard()["templating"]["list"]:
        m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var["query"]["query"])
        assert m, var
        exprs.append(("variable " + var["name"], m.group(1)))
    exprs += [(a["alert"], a["expr"]) for a in _alerts()]
    for where, expr in exprs:
        names = metric_names(_substitute(expr))
        assert names, f"{where}: no metric found in {expr!r}"
        assert names <= allowed, f"{where}: unknown metric(s) {names - allowed}"


def test_dashboard_queries_parse(tmp_path):
    """promtool parses every query (as recording rules), with Grafana's variables substituted."""
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query:{i}", "expr": _substitute(expr)} for i, (_, expr) in enumerate(_panel_queries())
    ] + [{"record": "dashboard:annotation", "expr": a["expr"]} for a in _dashboard()["annotations"]["list"]]}]}
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    out = _promtool("check", "rules", str(path))
    assert out.returncode == 0, out.stdout + out.stderr


# --- end to end against the local Prometheus -------------------------------------------------------

FIXTURE_CODE = r"""
import sys, threading, time
from oel import metrics as m
from oel.settings import MetricsSettings

ns, port = sys.argv[1], int(sys.argv[2])
m.init_namespace(ns)
quiet = {m.MODEL_ROLLBACKS, m.ROUNDS_REJECTED, m.ROUNDS_FAILED, m.EVENTS_DEAD_LETTERED, m.EXTRACTION_FAILURES,
         m.RECORDER_EVENTS_FAILED}
values = {"namespace": ns, "topic": "oel.trajectories", "partition": "0", "reason": "schema", "outcome": "ok",
          "model_version": "v2", "service": "fixture", "version": "0"}

def child(metric):
    names = metric._labelnames
    return metric.labels(**{n: values[n] for n in names}) if names else metric

for metric in m.all_metrics():
    c = child(metric)
    if metric._type == "gauge":
        c.set(5)
m.count_dead_letter("oel.trajectories", "schema", 0)
m.observe_evaluation(ns, "v1", pass_rate=0.1, response_tokens=60, ood_score=0.66)
m.observe_evaluation(ns, "v2", pass_rate=0.2, response_tokens=45, ood_score=0.66)
m.set_current_version(ns, "v2")
m.ROUND_IN_PROGRESS.labels(namespace=ns).set(0)
m.start_metrics_server(MetricsSettings(host="127.0.0.1", port=port), "fixture")

def tick():
    while True:
        for metric in m.all_metrics():
            if metric in quiet:
                continue
            if metric._type == "counter":
                child(metric).inc()
            elif metric._type == "histogram":
                child(metric).observe(0.5)
        time.sleep(0.5)

threading.Thread(target=tick, daemon=True).start()
print("ready", flush=True)
for line in sys.stdin:
    if line.strip() == "rollback":
        m.set_current_version(ns, "v1", rollback=True)
        print("rolled back", flush=True)
"""


def _get(url: str, timeout: float = 10) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def _query(prom: str, expr: str) -> dict:
    return _get(f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))


def _poll(what: str, check, timeout: float, every: float = 1.0):
    """Call check() until it returns a truthy value; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}", pytrace=False)


def _ensure_loaded(prom: str) -> None:
    """The running Prometheus must have the fixture job and the OEL rules; reload it from disk if not."""

    def loaded() -> bool:
        config = _get(f"{prom}/api/v1/status/config")["data"]["yaml"]
        rules = {r["name"] for g in _get(f"{prom}/api/v1/rules")["data"]["groups"] for r in g["rules"]}
        return f"job_name: {FIXTURE_JOB}" in config and {a["alert"] for a in _alerts()} <= rules

    if loaded():
        return
    req = urllib.request.Request(f"{prom}/-/reload", method="POST")
    try:
        urllib.request.urlopen(req, timeout=30).close()
    except urllib.error.HTTPError as exc:
        pytest.fail(f"Prometheus refused /-/reload ({exc}); it must run with --web.enable-lifecycle", pytrace=False)
    _poll("Prometheus to load infra/prometheus (fixture job and OEL rules) after /-/reload", loaded, 30)


@pytest.fixture
def fixture_exporter():
    """The fixture exporter on 127.0.0.1:9109, one test run at a time on this machine."""
    namespace = "fixture-" + uuid.uuid4().hex[:8]
    with open("/tmp/oel-metrics-fixture.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = subprocess.Popen(
            [sys.executable, "-c", FIXTURE_CODE, namespace, str(FIXTURE_PORT)],
            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            line = proc.stdout.readline()
            if line.strip() != "ready":
                proc.kill()
                pytest.fail(f"fixture exporter did not start (port {FIXTURE_PORT} busy?): {proc.stderr.read()}", pytrace=False)
            yield namespace, proc
        finally:
            proc.kill()
            proc.wait(timeout=30)


@pytest.mark.stack
def test_every_panel_returns_data_and_a_provoked_rollback_fires(prometheus_url, fixture_exporter):
    prom = prometheus_url
    namespace, proc = fixture_exporter
    _ensure_loaded(prom)
    started = time.time()

    def scraped() -> bool:
        targets = _get(f"{prom}/api/v1/targets?state=active")["data"]["activeTargets"]
        for t in targets:
            if t["labels"].get("job") == FIXTURE_JOB and t["health"] == "up":
                return True
        return False

    _poll(f"Prometheus to scrape the fixture exporter (job {FIXTURE_JOB})", scraped, 60, every=0.5)

    # Every query must parse (status success) and return at least one series for our namespace.
    pending = {(title, expr) for title, expr in _panel_queries()}

    def all_have_data() -> bool:
        for title, expr in sorted(pending):
            result = _query(prom, _substitute(expr, namespace))
            assert result["status"] == "success", f"{title}: {expr}: {result}"
            if result["data"]["result"]:
                pending.discard((title, expr))
        return not pending

    deadline = 120
    try:
        _poll("every panel query to return data", all_have_data, deadline)
    except pytest.fail.Exception:
        pytest.fail("panels without data after %ds:\n  %s" % (deadline, "\n  ".join(f"{t}: {e}" for t, e in sorted(pending))), pytrace=False)
    for var in _dashboard()["templating"]["list"]:
        metric, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var["query"]["query"]).groups()
        values = _get(f"{prom}/api/v1/label/{label}/values?" + urllib.parse.urlencode({"match[]": metric}))["data"]
        assert namespace in values

    # Provoke a rollback; the alert has no `for`, so it fires at the next evaluations.
    proc.stdin.write("rollback\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "rolled back"

    def firing():
        for alert in _get(f"{prom}/api/v1/alerts")["data"]["alerts"]:
            labels = alert["labels"]
            if labels.get("alertname") == "OELModelRollback" and labels.get("namespace") == namespace and alert["state"] == "firing":
                return alert
        return None

    alert = _poll("OELModelRollback to fire for the provoked rollback", firing, 90)
    assert alert["labels"]["severity"] == "warning"
    assert namespace in alert["annotations"]["summary"]
    # The dashboard's alert annotation query now has data too.
    for ann in _dashboard()["annotations"]["list"]:
        assert _query(prom, ann["expr"])["data"]["result"]
    print(f"panels with data and alert firing {time.time() - started:.0f}s after the exporter started")


@pytest.mark.stack
def test_ensure_loaded_reloads_a_prometheus_that_lacks_the_fixture_job(tmp_path):
    """A Prometheus started before infra/prometheus gained the fixture job (or the rules) is reloaded
    from disk through its lifecycle endpoint, as the local stack enables it."""
    import shutil
    import socket

    conf_dir = tmp_path / "prometheus"
    shutil.copytree(PROM_DIR, conf_dir)
    full = (conf_dir / "prometheus.yml").read_text()
    stale = yaml.safe_load(full)
    stale["scrape_configs"] = [j for j in stale["scrape_configs"] if j["job_name"] != FIXTURE_JOB]
    stale["rule_files"] = []
    (conf_dir / "prometheus.yml").write_text(yaml.safe_dump(stale))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        ["/usr/bin/prometheus", f"--config.file={conf_dir / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        prom = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            try:
                return urllib.request.urlopen(f"{prom}/-/ready", timeout=2).status == 200
            except OSError:
                return False

        _poll("the temporary Prometheus to be ready", ready, 60, every=0.2)
        assert f"job_name: {FIXTURE_JOB}" not in _get(f"{prom}/api/v1/status/config")["data"]["yaml"]
        (conf_dir / "prometheus.yml").write_text(full)
        _ensure_loaded(prom)
        rules = {r["name"] for g in _get(f"{prom}/api/v1/rules")["data"]["groups"] for r in g["rules"]}
        assert "OELModelRollback" in rules
    finally:
        proc.terminate()
        proc.wait(timeout=30)
