"""infra/prometheus and infra/grafana: config and rules checked and unit-tested with promtool; every
dashboard query parses and names only OEL metrics. The end-to-end check (the real services scraped by
Prometheus, every panel returning data, alerts firing) is tests/test_dashboards.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from oel import metrics

pytestmark = [pytest.mark.tools]

REPO = Path(__file__).resolve().parent.parent
PROM_DIR = REPO / "infra" / "prometheus"
RULE_FILES = sorted((PROM_DIR / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROM_DIR / "tests").glob("*.yml"))
DASHBOARD = REPO / "infra" / "grafana" / "dashboards" / "oel.json"
PROMTOOL = "/usr/bin/promtool"
# Series that Prometheus itself makes, which dashboards and rules may use beside OEL's.
PROMETHEUS_OWN = {"up", "ALERTS", "ALERTS_FOR_STATE"}
# Series of other programs the dashboard and the rules rely on (names as vLLM 0.32's v1 metrics and MinIO's
# v2 cluster metrics expose them).
EXTERNAL = {
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:request_success_total",
    "vllm:e2e_request_latency_seconds_bucket",
    "vllm:time_to_first_token_seconds_bucket",
    "vllm:kv_cache_usage_perc",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "minio_cluster_nodes_offline_total",
}
PROMQL_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
    "Inf",
    "NaN",
    "atan2",
}


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
        url = alert["annotations"]["runbook_url"]
        assert re.fullmatch(r"https?://[^/\s]+/\S*operations\.md#[a-z0-9-]+", url), f"{alert['alert']}: runbook_url is no URL: {url}"
        anchor = url.split("#")[1]
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
        if s[m.end() :].lstrip().startswith("(") or m.group(0) in PROMQL_KEYWORDS:
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
    assert _dashboard() == json.loads(json.dumps(generate.build())), "run python infra/grafana/generate.py --write"


def test_dashboard_covers_rounds_pipeline_and_inference_through_a_datasource_variable():
    d = _dashboard()
    assert [p["title"] for p in d["panels"] if p["type"] == "row"] == ["Learning rounds", "Pipeline health", "Inference (vLLM)"]
    assert len(_panel_queries()) >= 30
    ds = yaml.safe_load((REPO / "infra/grafana/provisioning/datasources/oel-prometheus.yml").read_text())["datasources"][0]
    [var] = [v for v in d["templating"]["list"] if v["type"] == "datasource"]
    assert var["query"] == "prometheus" and var["current"]["value"] == ds["uid"]  # the provisioned one by default
    for panel in d["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == f"${{{var['name']}}}"
            assert all(t["datasource"]["uid"] == f"${{{var['name']}}}" for t in panel["targets"])
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            assert v["datasource"]["uid"] == f"${{{var['name']}}}"
    inference = " ".join(e for title, e in _panel_queries() if "vllm:" in e or "oel-adapter-sync" in e)
    for series in (
        "vllm:num_requests_running",
        "vllm:e2e_request_latency_seconds_bucket",
        "vllm:kv_cache_usage_perc",
        "oel_adapters_served",
        "oel_adapter_loads_total",
    ):
        assert series in inference, series
    provider = yaml.safe_load((REPO / "infra/grafana/provisioning/dashboards/oel.yml").read_text())["providers"][0]
    assert provider["type"] == "file" and provider["options"]["path"]


def test_dashboard_and_rules_name_only_oel_metrics():
    allowed = metrics.exposed_names() | PROMETHEUS_OWN | EXTERNAL
    exprs = [(t, e) for t, e in _panel_queries()]
    exprs += [("annotation " + a["name"], a["expr"]) for a in _dashboard()["annotations"]["list"]]
    for var in _dashboard()["templating"]["list"]:
        if var["type"] != "query":
            continue
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
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [{"record": f"dashboard:query:{i}", "expr": _substitute(expr)} for i, (_, expr) in enumerate(_panel_queries())]
                + [{"record": "dashboard:annotation", "expr": a["expr"]} for a in _dashboard()["annotations"]["list"]],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    out = _promtool("check", "rules", str(path))
    assert out.returncode == 0, out.stdout + out.stderr
