"""oel/metrics.py: naming conventions, bounded labels, the helpers, and the /metrics endpoint."""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from oel import metrics
from oel.settings import MetricsSettings

# Label names a metric may carry; anything else (a user id, an episode id, free text) would make the
# series count unbounded.
ALLOWED_LABELS = {
    "namespace",
    "model_version",
    "topic",
    "partition",
    "reason",
    "outcome",
    "service",
    "version",
    "check",
    "condition",
    "route",
    "stage",
}  # route: one of oel.metrics.GATEWAY_ROUTES; stage: one of oel.metrics.ROUND_STAGES


def _families():
    return {m._name: m for m in metrics.all_metrics()}


def test_every_metric_follows_the_naming_conventions():
    fams = _families()
    assert len(fams) >= 35
    for name, m in fams.items():
        assert name.startswith("oel_"), name
        help_text = m._documentation
        assert len(help_text) >= 25 and (help_text[0].isupper() or help_text[0].isdigit()), f"{name}: help text must explain the metric"
        assert set(m._labelnames) <= ALLOWED_LABELS, f"{name}: unbounded label in {m._labelnames}"
        if m._type == "counter":
            # prometheus-client strips _total from the family name and adds it on exposition.
            assert not name.endswith("_total"), name
        if m._type == "histogram" and ("duration" in name or "latency" in name):
            assert name.endswith("_seconds"), f"{name}: durations are in seconds"
        for bad in ("_ms", "_milliseconds", "_kb", "_mb", "_percent"):
            assert not name.endswith(bad), f"{name}: use base units"


def test_every_metric_is_in_the_oel_registry_only():
    from prometheus_client import REGISTRY as GLOBAL

    exposed = {fam.name for fam in metrics.REGISTRY.collect()}
    for name in _families():
        assert name in exposed, name
    assert not any(fam.name.startswith("oel_") for fam in GLOBAL.collect())


def test_the_issue_metric_list_is_covered():
    names = metrics.exposed_names()
    for required in [
        "oel_events_consumed_total",
        "oel_events_dead_lettered_total",
        "oel_episodes_completed_total",
        "oel_episodes_abandoned_total",
        "oel_extraction_duration_seconds_bucket",
        "oel_kb_items_appended_total",
        "oel_kb_items_deduplicated_total",
        "oel_kb_items",
        "oel_consumer_lag_messages",
        "oel_rounds_started_total",
        "oel_rounds_finished_total",
        "oel_rounds_rejected_total",
        "oel_opcd_last_step_loss",
        "oel_opcd_last_step_kl",
        "oel_opcd_step_loss_bucket",
        "oel_opcd_step_kl_bucket",
        "oel_training_tokens_per_second",
        "oel_evaluation_pass_rate",
        "oel_evaluation_response_tokens",
        "oel_evaluation_ood_score",
        "oel_model_version_info",
        "oel_adapter_load_duration_seconds_bucket",
        "oel_recorder_events_sent_total",
        "oel_recorder_events_failed_total",
        "oel_model_rollbacks_total",
    ]:
        assert required in names, required


def test_core_rule_no_kafka_or_faust_import():
    code = (
        "import sys, oel.metrics\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('confluent_kafka', 'aiokafka', 'faust', 'mode'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bounded_reasons_fold_unknown_values_into_other():
    metrics.count_dead_letter("t.bounded", "schema")
    metrics.count_dead_letter("t.bounded", "user typed <anything> here")
    assert metrics.sample_value("oel_events_dead_lettered_total", {"topic": "t.bounded", "reason": "schema"}) == 1
    assert metrics.sample_value("oel_events_dead_lettered_total", {"topic": "t.bounded", "reason": "other"}) == 1
    metrics.count_rejected_round("ns-bounded", "ood")
    metrics.count_rejected_round("ns-bounded", "bad luck")
    assert metrics.sample_value("oel_rounds_rejected_total", {"namespace": "ns-bounded", "reason": "other"}) == 1


def test_per_version_series_stay_bounded():
    for i in range(metrics.EVALUATION_VERSIONS_KEPT + 5):
        metrics.observe_evaluation("ns-versions", f"v{i}", pass_rate=i / 100, response_tokens=40.0, ood_score=0.66)
    kept = [
        s
        for fam in metrics.REGISTRY.collect()
        if fam.name == "oel_evaluation_pass_rate"
        for s in fam.samples
        if s.labels["namespace"] == "ns-versions"
    ]
    assert len(kept) == metrics.EVALUATION_VERSIONS_KEPT
    assert metrics.sample_value("oel_evaluation_pass_rate", {"namespace": "ns-versions", "model_version": "v0"}) is None
    last = f"v{metrics.EVALUATION_VERSIONS_KEPT + 4}"
    assert metrics.sample_value("oel_evaluation_ood_score", {"namespace": "ns-versions", "model_version": last}) == 0.66


def test_current_version_is_one_series_per_namespace_and_counts_rollbacks():
    metrics.set_current_version("ns-current", "v1")
    metrics.set_current_version("ns-current", "v2")
    metrics.set_current_version("ns-current", "v1", rollback=True)
    current = [
        s.labels["model_version"]
        for fam in metrics.REGISTRY.collect()
        if fam.name == "oel_model_version_info"
        for s in fam.samples
        if s.labels["namespace"] == "ns-current"
    ]
    assert current == ["v1"]
    assert metrics.sample_value("oel_model_rollbacks_total", {"namespace": "ns-current"}) == 1


def test_init_namespace_creates_zero_series_so_the_first_increase_is_visible():
    metrics.init_namespace("ns-init")
    assert metrics.sample_value("oel_model_rollbacks_total", {"namespace": "ns-init"}) == 0
    assert metrics.sample_value("oel_rounds_started_total", {"namespace": "ns-init"}) == 0
    # Histograms too: a quantile over the first observation (one round, one adapter load) needs a rate.
    assert metrics.sample_value("oel_round_duration_seconds_count", {"namespace": "ns-init"}) == 0
    for stage in metrics.ROUND_STAGES:
        assert metrics.sample_value("oel_round_stage_seconds_count", {"namespace": "ns-init", "stage": stage}) == 0
    assert metrics.sample_value("oel_adapter_load_duration_seconds_bucket", {"namespace": "ns-init", "le": "+Inf"}) == 0
    assert metrics.sample_value("oel_adapter_loads_total", {"namespace": "ns-init", "outcome": "error"}) == 0


def test_opcd_step_helper_sets_gauges_histograms_and_throughput():
    metrics.observe_opcd_step("ns-opcd", loss=0.25, kl=0.3, tokens=256, seconds=2.0)
    assert metrics.sample_value("oel_opcd_last_step_loss", {"namespace": "ns-opcd"}) == 0.25
    assert metrics.sample_value("oel_opcd_step_kl_count", {"namespace": "ns-opcd"}) == 1
    assert metrics.sample_value("oel_training_tokens_per_second", {"namespace": "ns-opcd"}) == 128
    assert metrics.sample_value("oel_training_tokens_total", {"namespace": "ns-opcd"}) == 256


def test_exposed_names_match_the_exposition():
    # Touch every metric so each has a child, then compare with what /metrics really shows.
    for m in metrics.all_metrics():
        child = m.labels(*["x"] * len(m._labelnames)) if m._labelnames else m
        if m._type == "counter":
            child.inc()
        elif m._type == "gauge":
            child.set(1)
        elif m._type == "histogram":
            child.observe(1)
    text, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    seen = {s.name for fam in text_string_to_metric_families(text.decode()) for s in fam.samples if s.name.startswith("oel_")}
    assert seen == metrics.exposed_names()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_server_port_zero_is_off_and_a_port_serves_metrics_once():
    assert metrics.start_metrics_server(MetricsSettings(port=0), "test-off") is None
    port = _free_port()
    try:
        assert metrics.start_metrics_server(MetricsSettings(host="127.0.0.1", port=port), "test-a") == port
        # A second service in the same process: no second server, no "address in use".
        assert metrics.start_metrics_server(MetricsSettings(host="127.0.0.1", port=port), "test-b") == port
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        metrics.stop_metrics_servers(port)
    assert 'oel_service_info{service="test-a"' in body and 'oel_service_info{service="test-b"' in body
    assert "process_cpu_seconds_total" in body
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_metrics_server_unset_port_takes_the_service_default():
    port = _free_port()
    settings = MetricsSettings(host="127.0.0.1", port=None)
    try:
        assert metrics.start_metrics_server(settings, "test-default", default_port=port) == port
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    finally:
        metrics.stop_metrics_servers(port)
    with pytest.raises(ValueError, match="OEL_METRICS__PORT"):
        metrics.start_metrics_server(settings, "test-none")
