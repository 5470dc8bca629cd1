"""End to end: Prometheus scrapes the real services during a short real loop; every query of every
dashboard panel returns data through Prometheus's HTTP API, and provoked alerts fire.

The test starts, on topics, a consumer group, a bucket and a namespace of its own:

* the processor (``oel processor``, real extraction with the default model; helpers of
  tests/test_processor.py),
* the learner service (``python -m learner.service``) with a tiny round (2 OPCD steps of 2 prefixes,
  8-token samples), the evaluation gate on a 2-task held-out set (tolerances 1: it measures, and
  accepts) and ``auto_promote`` on, so that a version is published,
* an agent process (:data:`AGENT`): the load generator's synthetic episodes through the recorder SDK,
  a :class:`~producers.versions.VersionFollower` and an :class:`~producers.adapters.AdapterLoader`
  that loads each new version's adapter into the default model,
* a Prometheus of its own (Debian's binary, a free port, 1 s scrape and evaluation interval) whose
  config is infra/prometheus/prometheus.yml with the OEL jobs pointed at the services' ports and the
  alert rules of infra/prometheus/rules loaded unchanged.

It then sends invalid events until OELDeadLetterRateHigh is pending (its ``for`` is 5 minutes), waits
until every panel query of every dashboard in infra/grafana/dashboards returns a finite value (range
queries over the test's span as Grafana sends them, instant queries for instant targets), and every one
that counts activity this loop causes must be above 0 at some point (:data:`MAY_BE_ZERO` lists the
others), rolls the
published version back with ``oel models rollback`` and waits for OELModelRollback to fire.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import yaml
from test_processor import WORKERS, Env, as_records, episode_events, wait_for

from oel.versions import BASE_VERSION

REPO = Path(__file__).resolve().parent.parent
PROM_DIR = REPO / "infra" / "prometheus"
DASHBOARDS = sorted((REPO / "infra" / "grafana" / "dashboards").glob("*.json"))
PROMETHEUS = "/usr/bin/prometheus"
SCRAPE_S = 1
STEP_S = 2
# Grafana's $__rate_interval: max(4 x scrape interval, step + scrape interval).
RATE_INTERVAL = f"{max(4 * SCRAPE_S, STEP_S + SCRAPE_S)}s"
SERVICES = ("oel-processor", "oel-learner", "oel-agents")
# Panel targets that may stay at 0 in this loop (every other one must show activity, > 0, at some point):
MAY_BE_ZERO = {
    ("Rounds (1 h)", "C"): "the gate accepts the round (tolerances 1)",
    ("Rounds (1 h)", "D"): "no round fails",
    ("Rounds in progress and rollbacks", "B"): "the rollback comes after the panels are checked (then OELModelRollback must fire)",
    ("Evaluation pass rate per version", "A"): "the default model may pass none of 2 held-out tasks",
    ("Extraction latency (p50, p95)", "C"): "no extraction fails",
    ("KB items / s", "B"): "the model may extract no duplicate",
    ("Recorder (agents)", "B"): "no event fails delivery",
    ("Recorder (agents)", "C"): "nothing stays buffered",
}

AGENT = r"""
import random, sys
from oel import metrics
from oel.model.factory import make_backend
from oel.settings import load_settings
from oel.store import S3Store
from reference import loadgen
from producers.adapters import AdapterLoader
from producers.recorder import Recorder
from producers.versions import VersionFollower

namespace = sys.argv[1]
settings = load_settings()
metrics.init_namespace(namespace)
metrics.start_metrics_server(settings.metrics, "agents", default_port=9103)
loader = AdapterLoader(make_backend(settings), S3Store(settings.s3))
follower = VersionFollower(namespace, settings, on_change=loader).start()
recorder = Recorder(settings)
print("ready", flush=True)
for line in sys.stdin:
    command, n = line.split()
    if command == "episodes":
        source = loadgen.synthetic_episodes(random.Random(int(n)), [namespace], max_turns=2)
        report = loadgen.run(recorder, source, rate=4, episodes=int(n), concurrency=2)
        print(report.summary(), flush=True)
recorder.close()
follower.stop()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 10) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def _api(prom: str, path: str, **params) -> dict:
    doc = _get(f"{prom}/api/v1/{path}?" + urllib.parse.urlencode(params, doseq=True))
    assert doc["status"] == "success", doc
    return doc["data"]


# --- the dashboards' queries ------------------------------------------------------------------------


def panel_targets() -> list[tuple[str, str, dict]]:
    """(dashboard file, panel title, target) for every target of every panel (rows' panels included)."""
    out = []
    for path in DASHBOARDS:
        doc = json.loads(path.read_text())
        panels = list(doc["panels"])
        while panels:
            panel = panels.pop(0)
            panels.extend(panel.get("panels", []))
            for target in panel.get("targets", []):
                if "vllm:" in target["expr"] or "oel-adapter-sync" in target["expr"]:
                    continue  # the inference row: this loop runs no vLLM traffic and no adapter sync (parsed and name-checked in test_prometheus_rules)
                out.append((path.name, panel["title"], target))
    return out


def substitute(expr: str, namespace: str) -> str:
    """Grafana's variables as Grafana would fill them for this test: the test's namespace selected,
    $__rate_interval for a 1 s scrape interval and a 2 s step."""
    out = expr.replace("$__rate_interval", RATE_INTERVAL).replace("${namespace}", namespace).replace("$namespace", namespace)
    assert "$" not in out, f"unknown Grafana variable in {expr!r}"
    return out


def finite_values(result: list[dict]) -> list[float]:
    values = []
    for series in result:
        points = series.get("values") or [series["value"]]
        values += [float(v) for _, v in points if not math.isnan(float(v)) and not math.isinf(float(v))]
    return values


def run_target(prom: str, target: dict, namespace: str, start: float) -> list[dict]:
    """Run one panel target as Grafana does: an instant query for instant targets, else a range query
    over the test's span."""
    expr = substitute(target["expr"], namespace)
    if target.get("instant"):
        return _api(prom, "query", query=expr)["result"]
    return _api(prom, "query_range", query=expr, start=f"{start:.3f}", end=f"{time.time():.3f}", step=f"{STEP_S}s")["result"]


# --- processes --------------------------------------------------------------------------------------


@contextmanager
def service(args: list[str], env: dict[str, str], log: Path, **popen):
    """A service as a subprocess, registered with test_processor's wait_for (which fails at once when a
    watched process dies); SIGTERM at the end, SIGKILL if it does not stop."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(args, env={**os.environ, **env}, stdout=popen.pop("stdout", out), stderr=out, cwd=REPO, **popen)
    WORKERS.append((proc, log))
    try:
        yield proc
    finally:
        WORKERS.remove((proc, log))
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)


def prometheus_config(ports: dict[str, int]) -> dict:
    """infra/prometheus/prometheus.yml with the OEL jobs pointed at this test's ports, only those jobs,
    1 s intervals, and the repository's rule files."""
    base = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in base["scrape_configs"]}
    assert set(ports) <= set(jobs), f"infra/prometheus/prometheus.yml lacks the jobs {set(ports) - set(jobs)}"
    rules = [str(p) for pattern in base["rule_files"] for p in sorted(PROM_DIR.glob(pattern))]
    assert rules, "no rule file matched infra/prometheus/prometheus.yml's rule_files"
    return {
        "global": {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"},
        "rule_files": rules,
        "scrape_configs": [{**jobs[job], "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]} for job, port in ports.items()],
    }


@pytest.mark.stack
def test_every_panel_returns_data_from_the_real_services_and_alerts_fire(kafka, s3_store, unique, tmp_path):
    t0 = time.monotonic()
    namespace = f"dash-{unique}"
    # The grounded variant reads the rules that the (trusted) reviewer states: the knowledge does not depend
    # on what the 135M model happens to write (the unstructured variant's items may all be rejected).
    env = Env(
        f"d-{unique}",
        BATCH_SIZE="2",
        BATCH_WINDOW_S="5",
        ABANDON_AFTER_S="5",
        MAX_NEW_TOKENS="24",
        EXTRACTION_VARIANT="grounded",
        TRUSTED_FEEDBACK="dash-*",
        GROUNDED_MIN_EPISODES="1",
    )
    ports = {job: _free_port() for job in SERVICES}
    prom_port = _free_port()
    prom = f"http://127.0.0.1:{prom_port}"
    # A round needs 3 new items (the grounded extraction gives at most 2 per batch), so the learner meets
    # the namespace (and zeroes its series) an update before the round starts: a counter born at 1 is
    # invisible to increase(). The agent's 8 episodes (loadgen seed 8) state 5 different rules.
    learner_env = {
        "OEL_LEARNER__GROUP_ID": f"d-{unique}-learner",
        "OEL_LEARNER__MIN_NEW_ITEMS": "3",
        "OEL_LEARNER__COOLDOWN_S": "3600",
        "OEL_LEARNER__STEPS": "2",
        "OEL_LEARNER__BATCH_SIZE": "2",
        "OEL_LEARNER__MAX_NEW_TOKENS": "8",
        # every step runs (no agreement checks, so no early stop): the OPCD panels need the steps' series
        "OEL_LEARNER__CHECK_EVERY": "0",
        "OEL_LEARNER__EXPERIENCE_SETS": "1",
        "OEL_LEARNER__AUTO_PROMOTE": "true",
        # The evaluation gate runs (its numbers feed the evaluation panels) on a tiny held-out set of the
        # house-rules tasks, and accepts whatever it measures, so that the version is published.
        "OEL_LEARNER__GATE_ENABLED": "true",
        "OEL_LEARNER__EVAL_ENV": "house-rules",
        "OEL_LEARNER__EVAL_EPISODES": "2",
        "OEL_LEARNER__EVAL_MAX_NEW_TOKENS": "16",
        "OEL_LEARNER__OOD_MAX_NEW_TOKENS": "8",
        "OEL_LEARNER__GATE_PASS_RATE_TOLERANCE": "1",
        "OEL_LEARNER__GATE_OOD_TOLERANCE": "1",
        "OEL_LEARNER__KNOWLEDGE_GATE_MARGIN": "-1",
    }
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(prometheus_config(ports)))
    check = subprocess.run(["/usr/bin/promtool", "check", "config", str(config)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr

    with ExitStack() as stack:
        stack.enter_context(
            service(
                [
                    PROMETHEUS,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}",
                    "--web.enable-lifecycle",
                ],
                {},
                tmp_path / "prometheus.log",
            )
        )
        stack.enter_context(
            service(
                [sys.executable, "-m", "oel.cli", "processor"],
                {**env.vars, "OEL_METRICS__PORT": str(ports["oel-processor"])},
                tmp_path / "processor.log",
            )
        )
        stack.enter_context(
            service(
                [sys.executable, "-m", "learner.service"],
                {**env.vars, **learner_env, "OEL_METRICS__PORT": str(ports["oel-learner"])},
                tmp_path / "learner.log",
            )
        )
        agent = stack.enter_context(
            service(
                [sys.executable, "-c", AGENT, namespace],
                {**env.vars, "OEL_METRICS__PORT": str(ports["oel-agents"])},
                tmp_path / "agent.log",
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        )
        assert agent.stdout.readline().strip() == "ready", (tmp_path / "agent.log").read_text()[-3000:]

        def all_up() -> bool:
            try:
                targets = _api(prom, "targets", state="active")["activeTargets"]
            except OSError:
                return False
            return {t["labels"]["job"] for t in targets if t["health"] == "up"} >= set(SERVICES)

        wait_for(all_up, 120, f"Prometheus to scrape {', '.join(SERVICES)}")
        start = time.time() - 5

        # Real traffic: episodes through the recorder, one episode whose agent died (no end event: abandoned).
        agent.stdin.write("episodes 8\n")
        agent.stdin.flush()
        env.produce(as_records(episode_events(f"{namespace}-dead-agent", namespace)[:-1]))
        print(agent.stdout.readline().strip())

        # Invalid events (not JSON, wrong schema) until the DLQ-share alert is pending (for: 5m).
        def dlq_alert() -> dict | None:
            env.produce([(b"bad", b"{not json"), (b"bad", json.dumps({"namespace": namespace}).encode())])
            for alert in _api(prom, "alerts")["alerts"]:
                if (
                    alert["labels"].get("alertname") == "OELDeadLetterRateHigh"
                    and alert["labels"].get("topic") == env.settings.topics.trajectories
                ):
                    return alert
            return None

        alert = wait_for(dlq_alert, 90, "OELDeadLetterRateHigh to be pending or firing", interval=1.0)
        assert alert["state"] in ("pending", "firing") and alert["labels"]["severity"] == "warning"
        print(f"OELDeadLetterRateHigh {alert['state']} at {time.monotonic() - t0:.0f}s")

        # A version is published (auto-promote) and the agent follows it; then every panel has data.
        targets = panel_targets()
        assert len(targets) >= 30
        pending = {i for i in range(len(targets))}
        answers: dict[int, list[dict]] = {}

        def panels_have_data() -> bool:
            for i in sorted(pending):
                _, title, target = targets[i]
                result = run_target(prom, target, namespace, start)
                answers[i] = result
                values = finite_values(result)
                if values and (max(values) > 0 or (title, target["refId"]) in MAY_BE_ZERO):
                    pending.discard(i)
            return not pending

        try:
            wait_for(panels_have_data, 200, "every panel query to return data", interval=2.0)
        except AssertionError:
            missing = "\n  ".join(
                f"{targets[i][0]} / {targets[i][1]}: {targets[i][2]['expr']}  -> {answers.get(i)}" for i in sorted(pending)
            )
            logs = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(tmp_path.glob("*.log")))
            pytest.fail(f"panel queries without data (or never above 0) after 200 s:\n  {missing}\n{logs}", pytrace=False)
        print(f"all {len(targets)} panel queries have data at {time.monotonic() - t0:.0f}s:")
        for name, title, target in targets:
            result = run_target(prom, target, namespace, start)
            values = finite_values(result) or [math.nan]
            print(f"  {name} / {title} [{target['refId']}]: {len(result)} series, max {max(values):.4g}  {target['expr']}")
        # Both stream consumers report their lag (the processor on the trajectories, the learner on the experience topic).
        lagging = {s["metric"]["topic"] for s in _api(prom, "query", query="oel_consumer_lag_messages")["result"]}
        assert {env.settings.topics.trajectories, env.settings.topics.experience} <= lagging, lagging
        for path in DASHBOARDS:
            for var in json.loads(path.read_text()).get("templating", {}).get("list", []):
                if var["type"] != "query":
                    continue  # the datasource variable
                metric, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var["query"]["query"]).groups()
                assert namespace in _api(prom, f"label/{label}/values", **{"match[]": metric})

        # Roll the published version back by hand: the agent's follower falls back, OELModelRollback fires.
        rollback = subprocess.run(
            [sys.executable, "-m", "oel.cli", "models", "rollback", "--namespace", namespace, "--reason", "dashboard test"],
            env={**os.environ, **env.vars},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert rollback.returncode == 0, rollback.stdout + rollback.stderr

        def rollback_alert() -> dict | None:
            for alert in _api(prom, "alerts")["alerts"]:
                if (
                    alert["labels"].get("alertname") == "OELModelRollback"
                    and alert["labels"].get("namespace") == namespace
                    and alert["state"] == "firing"
                ):
                    return alert
            return None

        fired = wait_for(rollback_alert, 60, "OELModelRollback to fire")
        assert namespace in fired["annotations"]["summary"]
        # The scrape that saw the rollback saw the agents' current version go back to the base model.
        rows = _api(prom, "query", query=f'oel_model_version_info{{job="oel-agents", namespace="{namespace}"}}')["result"]
        assert [r["metric"]["model_version"] for r in rows] == [BASE_VERSION]
        # ... and the panel target that waited for it (MAY_BE_ZERO) shows the rollback once a range step reaches it.
        [rollbacks] = [t for _, title, t in targets if (title, t["refId"]) == ("Rounds in progress and rollbacks", "B")]
        wait_for(
            lambda: max(finite_values(run_target(prom, rollbacks, namespace, start))) > 0, 20, "the rollbacks panel to show the rollback"
        )
        for path in DASHBOARDS:
            for ann in json.loads(path.read_text())["annotations"]["list"]:
                assert _api(prom, "query", query=ann["expr"])["result"], f"annotation {ann['name']}: no data"
        agent.stdin.close()
        print(f"OELModelRollback firing at {time.monotonic() - t0:.0f}s")
