"""Generates infra/grafana/dashboards/oel.json, the OEL dashboard (learning rounds, pipeline health and inference).

The dashboard is code so that every panel stays consistent (datasource, units, legends) and the tests
can read each query back: ``python infra/grafana/generate.py --write`` rewrites the JSON (``--check`` only compares), and
tests/test_prometheus_rules.py fails when the committed JSON differs from what this script makes.
Every query may use only metric names from oel/metrics.py, vLLM's own ``vllm:*`` series (the inference row) and
Prometheus's ``up``, and the template variables ``$namespace`` and ``$__rate_interval``; the datasource is the
variable ``$datasource`` (default: the provisioned ``oel-prometheus``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards" / "oel.json"
PROVISIONED_UID = "oel-prometheus"
"""The uid of the datasource provisioned by infra/grafana/provisioning: the datasource variable's default."""
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
"""Every panel and query uses the dashboard's datasource variable, so the dashboard works with any
Prometheus datasource (kube-prometheus-stack's included) without editing."""
VLLM = 'job="vllm"'
SYNC = 'job="oel-adapter-sync"'

NS = 'namespace=~"$namespace"'
RI = "$__rate_interval"

_panels: list[dict] = []
_next_id = [1]
_cursor = {"x": 0, "y": 0, "h": 0}


def _place(w: int, h: int) -> dict:
    if _cursor["x"] + w > 24:
        _cursor["x"], _cursor["y"], _cursor["h"] = 0, _cursor["y"] + _cursor["h"], 0
    pos = {"x": _cursor["x"], "y": _cursor["y"], "w": w, "h": h}
    _cursor["x"] += w
    _cursor["h"] = max(_cursor["h"], h)
    return pos


def row(title: str) -> None:
    if _cursor["x"]:
        _cursor["x"], _cursor["y"], _cursor["h"] = 0, _cursor["y"] + _cursor["h"], 0
    _panels.append(
        {
            "type": "row",
            "title": title,
            "id": _next_id[0],
            "collapsed": False,
            "panels": [],
            "gridPos": {"x": 0, "y": _cursor["y"], "w": 24, "h": 1},
        }
    )
    _next_id[0] += 1
    _cursor["y"] += 1


def panel(
    title: str,
    description: str,
    targets: list[tuple[str, str]],
    unit: str = "short",
    kind: str = "timeseries",
    w: int = 8,
    h: int = 8,
    **options,
) -> None:
    p = {
        "type": kind,
        "title": title,
        "description": description,
        "id": _next_id[0],
        "datasource": DATASOURCE,
        "gridPos": _place(w, h),
        "fieldConfig": {"defaults": {"unit": unit, **options.pop("defaults", {})}, "overrides": []},
        "options": options.pop("panel_options", {}),
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "datasource": DATASOURCE,
                "expr": expr,
                "legendFormat": legend,
                **({"instant": True, "range": False, "format": "table"} if kind == "table" else {}),
            }
            for i, (expr, legend) in enumerate(targets)
        ],
    }
    p.update(options)
    _panels.append(p)
    _next_id[0] += 1


def build() -> dict:
    _panels.clear()
    _next_id[0] = 1
    _cursor.update(x=0, y=0, h=0)

    row("Learning rounds")
    panel(
        "Current model version",
        "The version each namespace runs now, as each service sees it (oel_model_version_info): "
        "the agents (oel-agents) follow oel.model-versions, rollbacks included; the learner shows the version it last published. "
        "Agents behind the learner have not picked up a new version yet.",
        [(f"max by (job, namespace, model_version) (oel_model_version_info{{{NS}}})", "")],
        kind="table",
        w=8,
        h=7,
        transformations=[{"id": "organize", "options": {"excludeByName": {"Time": True, "Value": True}}}],
    )
    panel(
        "Rounds (1 h)",
        "Rounds started, published (finished), rejected by the gate, failed, in the last hour.",
        [
            (f"sum(increase(oel_rounds_started_total{{{NS}}}[1h]))", "started"),
            (f"sum(increase(oel_rounds_finished_total{{{NS}}}[1h]))", "finished"),
            (f"sum(increase(oel_rounds_rejected_total{{{NS}}}[1h]))", "rejected"),
            (f"sum(increase(oel_rounds_failed_total{{{NS}}}[1h]))", "failed"),
        ],
        kind="stat",
        w=8,
        h=7,
        panel_options={"reduceOptions": {"calcs": ["lastNotNull"]}, "textMode": "value_and_name"},
    )
    panel(
        "Rounds in progress and rollbacks",
        "1 while a namespace's round runs; rollbacks seen in the last hour.",
        [
            (f"max by (namespace) (oel_round_in_progress{{{NS}}})", "running {{namespace}}"),
            (f"sum by (namespace) (increase(oel_model_rollbacks_total{{{NS}}}[1h]))", "rollbacks {{namespace}}"),
        ],
        w=8,
        h=7,
    )
    panel(
        "OPCD loss, last step",
        "Mean top-k reverse KL (student || teacher with KB) of the last optimizer step; "
        "falls within a round as the student absorbs the knowledge.",
        [(f"oel_opcd_last_step_loss{{{NS}}}", "loss {{namespace}}"), (f"oel_opcd_last_step_kl{{{NS}}}", "full KL {{namespace}}")],
        unit="none",
    )
    panel(
        "OPCD loss per step (p50, p90)",
        "Quantiles of the per-step loss over the window.",
        [
            (f"histogram_quantile(0.5, sum by (le, namespace) (rate(oel_opcd_step_loss_bucket{{{NS}}}[{RI}])))", "p50 {{namespace}}"),
            (f"histogram_quantile(0.9, sum by (le, namespace) (rate(oel_opcd_step_loss_bucket{{{NS}}}[{RI}])))", "p90 {{namespace}}"),
        ],
        unit="none",
    )
    panel(
        "Training throughput",
        "Response tokens trained on per second: the counter's rate, and the last step's figure.",
        [
            (f"sum by (namespace) (rate(oel_training_tokens_total{{{NS}}}[{RI}]))", "rate {{namespace}}"),
            (f"oel_training_tokens_per_second{{{NS}}}", "last step {{namespace}}"),
        ],
        unit="none",
    )
    panel(
        "Evaluation pass rate per version",
        "Held-out pass rate without experience in context, as measured by the gate.",
        [(f"oel_evaluation_pass_rate{{{NS}}}", "{{namespace}} {{model_version}}")],
        unit="percentunit",
        kind="bargauge",
        defaults={"min": 0, "max": 1},
    )
    panel(
        "OOD score per version",
        "Instruction-following checks (IFEval-style): should stay at the base model's level.",
        [(f"oel_evaluation_ood_score{{{NS}}}", "{{namespace}} {{model_version}}")],
        unit="percentunit",
        kind="bargauge",
        defaults={"min": 0, "max": 1},
    )
    panel(
        "Response length per version",
        "Mean response tokens on the evaluation; the paper sees it fall to ~70% in 3 rounds.",
        [(f"oel_evaluation_response_tokens{{{NS}}}", "{{namespace}} {{model_version}}")],
        unit="none",
        kind="bargauge",
    )
    panel(
        "Round duration (p50, p95)",
        "Start to the gate's decision.",
        [
            (f"histogram_quantile(0.5, sum by (le) (rate(oel_round_duration_seconds_bucket{{{NS}}}[1h])))", "p50"),
            (f"histogram_quantile(0.95, sum by (le) (rate(oel_round_duration_seconds_bucket{{{NS}}}[1h])))", "p95"),
        ],
        unit="s",
    )
    panel(
        "Where a round's time goes",
        "Seconds per stage of the rounds in the window (knowledge gate, OPCD setup/sampling/updates/checks, evaluation gate, publish).",
        [
            (
                f"sum by (stage) (increase(oel_round_stage_seconds_sum{{{NS}}}[6h]))",
                "{{stage}}",
            )
        ],
        unit="s",
        kind="bargauge",
    )
    panel(
        "Adapter loads",
        "Adapter load latency (p95) and failed loads, at agents and the inference server.",
        [
            (
                f"histogram_quantile(0.95, sum by (le, namespace) (rate(oel_adapter_load_duration_seconds_bucket{{{NS}}}[{RI}])))",
                "p95 {{namespace}}",
            ),
            (f"sum by (namespace) (increase(oel_adapter_loads_total{{{NS}}}[1h]))", "loads/h {{namespace}}"),
        ],
        unit="s",
    )
    panel(
        "Versions published (1 h)",
        "ModelVersion events on oel.model-versions (promotions and rollbacks).",
        [(f"sum by (namespace) (increase(oel_model_versions_published_total{{{NS}}}[1h]))", "{{namespace}}")],
    )

    row("Pipeline health")
    panel(
        "Services up",
        "1 when Prometheus can scrape the service's /metrics.",
        [('up{job=~"oel-.*"}', "{{job}} {{instance}}")],
        kind="stat",
        w=6,
        h=6,
        panel_options={"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "background"},
        defaults={
            "mappings": [],
            "thresholds": {"mode": "absolute", "steps": [{"color": "red", "value": None}, {"color": "green", "value": 1}]},
        },
    )
    panel(
        "Events consumed / s",
        "Events read from each input topic by the stream workers.",
        [(f"sum by (topic) (rate(oel_events_consumed_total[{RI}]))", "{{topic}}")],
        unit="ops",
        w=6,
        h=6,
    )
    panel(
        "Dead-lettered / s",
        "Events sent to <topic>.dlq, by reason.",
        [(f"sum by (topic, reason) (rate(oel_events_dead_lettered_total[{RI}]))", "{{topic}} {{reason}}")],
        unit="ops",
        w=6,
        h=6,
    )
    panel(
        "DLQ share",
        "Dead-lettered / consumed; OELDeadLetterRateHigh fires above 5%.",
        [
            (
                f"sum by (topic) (rate(oel_events_dead_lettered_total[{RI}])) / on (topic) sum by (topic) (rate(oel_events_consumed_total[{RI}]))",
                "{{topic}}",
            )
        ],
        unit="percentunit",
        w=6,
        h=6,
    )
    panel(
        "Consumer lag",
        "Messages waiting per topic and partition (the processor's and the learner's groups).",
        [("sum by (topic, partition) (oel_consumer_lag_messages)", "{{topic}}/{{partition}}")],
    )
    panel(
        "Episodes / s",
        "Episodes assembled (completed) and dropped without an end (abandoned).",
        [
            (f"sum by (namespace) (rate(oel_episodes_completed_total{{{NS}}}[{RI}]))", "completed {{namespace}}"),
            (f"sum by (namespace) (rate(oel_episodes_abandoned_total{{{NS}}}[{RI}]))", "abandoned {{namespace}}"),
        ],
        unit="ops",
    )
    panel(
        "Extraction latency (p50, p95)",
        "One extraction call (a batch of episodes to experience items), retries included.",
        [
            (
                f"histogram_quantile(0.5, sum by (le, namespace) (rate(oel_extraction_duration_seconds_bucket{{{NS}}}[{RI}])))",
                "p50 {{namespace}}",
            ),
            (
                f"histogram_quantile(0.95, sum by (le, namespace) (rate(oel_extraction_duration_seconds_bucket{{{NS}}}[{RI}])))",
                "p95 {{namespace}}",
            ),
            (f"sum by (namespace) (rate(oel_extraction_failures_total{{{NS}}}[{RI}]))", "failures/s {{namespace}}"),
        ],
        unit="s",
    )
    panel(
        "KB items / s",
        "Experience items appended, and extracted items that were duplicates of stored ones.",
        [
            (f"sum by (namespace) (rate(oel_kb_items_appended_total{{{NS}}}[{RI}]))", "appended {{namespace}}"),
            (f"sum by (namespace) (rate(oel_kb_items_deduplicated_total{{{NS}}}[{RI}]))", "deduplicated {{namespace}}"),
        ],
        unit="ops",
    )
    panel(
        "Knowledge base size",
        "Stored items, and the current snapshot's tokens (bounded by the experience token budget).",
        [
            (f"max by (namespace) (oel_kb_items{{{NS}}})", "items {{namespace}}"),
            (f"max by (namespace) (oel_kb_snapshot_tokens{{{NS}}})", "snapshot tokens {{namespace}}"),
        ],
    )
    panel(
        "Knowledge base snapshot bytes",
        "Bytes of the current snapshot text.",
        [(f"max by (namespace) (oel_kb_size_bytes{{{NS}}})", "{{namespace}}")],
        unit="bytes",
    )
    panel(
        "Recorder (agents)",
        "Trajectory events delivered to Kafka and failed per second; events buffered.",
        [
            (f"sum by (namespace) (rate(oel_recorder_events_sent_total{{{NS}}}[{RI}]))", "sent/s {{namespace}}"),
            (f"sum by (namespace) (rate(oel_recorder_events_failed_total{{{NS}}}[{RI}]))", "failed/s {{namespace}}"),
            (f"sum by (namespace) (oel_recorder_pending_events{{{NS}}})", "pending {{namespace}}"),
        ],
    )
    panel(
        "Agent episodes / s",
        "Episodes the agents played to the end.",
        [(f"sum by (namespace) (rate(oel_agent_episodes_total{{{NS}}}[{RI}]))", "{{namespace}}")],
        unit="ops",
    )

    row("Inference (vLLM)")
    panel(
        "vLLM requests",
        "Requests running and waiting per vLLM replica: waiting > 0 for long means the replicas are saturated.",
        [
            (f"sum by (instance) (vllm:num_requests_running{{{VLLM}}})", "running {{instance}}"),
            (f"sum by (instance) (vllm:num_requests_waiting{{{VLLM}}})", "waiting {{instance}}"),
        ],
        w=6,
        h=7,
    )
    panel(
        "vLLM requests / s",
        "Finished requests per second, by why they finished (stop, length, abort).",
        [(f"sum by (finished_reason) (rate(vllm:request_success_total{{{VLLM}}}[{RI}]))", "{{finished_reason}}")],
        unit="reqps",
        w=6,
        h=7,
    )
    panel(
        "vLLM latency (p50, p95)",
        "End-to-end request latency and time to first token.",
        [
            (f"histogram_quantile(0.5, sum by (le) (rate(vllm:e2e_request_latency_seconds_bucket{{{VLLM}}}[{RI}])))", "e2e p50"),
            (f"histogram_quantile(0.95, sum by (le) (rate(vllm:e2e_request_latency_seconds_bucket{{{VLLM}}}[{RI}])))", "e2e p95"),
            (f"histogram_quantile(0.95, sum by (le) (rate(vllm:time_to_first_token_seconds_bucket{{{VLLM}}}[{RI}])))", "TTFT p95"),
        ],
        unit="s",
        w=6,
        h=7,
    )
    panel(
        "vLLM KV cache",
        "Share of the KV cache in use per replica; near 1 means requests queue or get preempted.",
        [(f"max by (instance) (vllm:kv_cache_usage_perc{{{VLLM}}})", "{{instance}}")],
        unit="percentunit",
        w=6,
        h=7,
        defaults={"min": 0, "max": 1},
    )
    panel(
        "vLLM tokens / s",
        "Prompt and generated tokens per second, all replicas.",
        [
            (f"sum(rate(vllm:prompt_tokens_total{{{VLLM}}}[{RI}]))", "prompt"),
            (f"sum(rate(vllm:generation_tokens_total{{{VLLM}}}[{RI}]))", "generated"),
        ],
        unit="none",
        w=8,
        h=7,
    )
    panel(
        "LoRA adapters served",
        "Per vLLM replica and namespace, the adapters its adapter-sync sidecar keeps loaded "
        "(current version + --keep - 1 earlier ones): 0 on a replica that should serve a version is a replica that missed it.",
        [(f"max by (instance, namespace) (oel_adapters_served{{{SYNC}, {NS}}})", "{{namespace}} {{instance}}")],
        w=8,
        h=7,
    )
    panel(
        "LoRA loads at the servers (1 h)",
        "Adapter downloads + loads by the vLLM pods' adapter sync, by outcome "
        "(OELAdapterLoadFailures fires on repeated errors), and the p95 load time.",
        [
            (f"sum by (namespace, outcome) (increase(oel_adapter_loads_total{{{SYNC}, {NS}}}[1h]))", "{{outcome}} {{namespace}}"),
            (
                f"histogram_quantile(0.95, sum by (le, namespace) (rate(oel_adapter_load_duration_seconds_bucket{{{SYNC}, {NS}}}[1h])))",
                "p95 s {{namespace}}",
            ),
        ],
        w=8,
        h=7,
    )

    return {
        "uid": "oel-overview",
        "title": "OEL: learning rounds, pipeline health and inference",
        "description": "Generated by infra/grafana/generate.py; metrics are defined in oel/metrics.py.",
        "tags": ["oel"],
        "timezone": "browser",
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "regex": "",
                    "refresh": 1,
                    "hide": 0,
                    "current": {"selected": True, "text": PROVISIONED_UID, "value": PROVISIONED_UID},
                },
                {
                    "name": "namespace",
                    "label": "namespace",
                    "type": "query",
                    "datasource": DATASOURCE,
                    "query": {"query": "label_values(oel_model_version_info, namespace)", "refId": "namespace"},
                    "definition": "label_values(oel_model_version_info, namespace)",
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "refresh": 2,
                    "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
                },
            ]
        },
        "annotations": {
            "list": [
                {
                    "name": "Alerts",
                    "datasource": DATASOURCE,
                    "enable": True,
                    "iconColor": "red",
                    "expr": 'ALERTS{alertname=~"OEL.*", alertstate="firing"}',
                    "titleFormat": "{{alertname}}",
                    "textFormat": "{{namespace}} {{topic}}",
                    "step": "1m",
                },
            ]
        },
        "panels": list(_panels),
    }


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Generate infra/grafana/dashboards/oel.json from this file.")
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="exit 1 if the committed dashboard differs; write nothing")
    mode.add_argument("--write", action="store_true", help="write the dashboard")
    args = ap.parse_args(argv)
    text = json.dumps(build(), indent=2) + "\n"
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"stale: {OUT.name} (run python infra/grafana/generate.py --write)", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
