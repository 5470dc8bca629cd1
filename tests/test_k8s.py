"""k8s/: every overlay renders with kustomize and validates offline.

* Built-in kinds: ``kubernetes-validate --strict`` against a current Kubernetes version; any WARN (an
  unknown kind or a removed API version) fails like an ERROR, and every built-in resource must be
  reported as passed.
* Custom resources (Strimzi, Prometheus operator), which kubernetes-validate does not know: their
  ``spec`` against the openAPIV3Schema of the CRD versions vendored in k8s/crd-schemas, made strict
  (unknown fields rejected) the way kubernetes-validate's strict schemas are; their ``metadata``
  against Kubernetes' ObjectMeta schema. What the operators do at admission (CEL rules, defaults,
  webhooks) is not checked here.
* Consistency: KafkaTopics equal ``oel/topics.py`` under each overlay's OEL_TOPICS__* settings;
  processor replicas <= partitions; the PrometheusRule holds infra/prometheus/rules; the vLLM admin
  port is reachable from the learner only; probes, requests/limits, PDBs; no secret values.

Tools: kustomize and kubernetes-validate, installed by infra/local/k8s-tools.sh (idempotent).
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "k8s"
OVERLAYS = ["dev", "prod"]
KUBERNETES_VERSIONS = ["1.37.0", "1.35.0"]  # newest kubernetes-validate knows, and an older supported one
SCHEMAS = K8S / "crd-schemas"
SECRETS_OUT_OF_BAND = {"oel-s3-credentials"}  # created by the operator of the cluster (docs/operations.md)
SECRETS_FROM_STRIMZI = {"oel-cluster-ca-cert"}  # the cluster CA; KafkaUser secrets are checked below


@pytest.fixture(scope="module")
def kustomize() -> str:
    subprocess.run(["bash", str(REPO / "infra/local/k8s-tools.sh"), "install"], check=True)
    out = subprocess.run(["bash", str(REPO / "infra/local/k8s-tools.sh"), "path"], check=True, capture_output=True, text=True)
    return out.stdout.strip()


@cache
def _render(kustomize: str, path: str) -> tuple[dict, ...]:
    out = subprocess.run([kustomize, "build", str(K8S / path)], capture_output=True, text=True)
    assert out.returncode == 0, f"kustomize build {path} failed:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request, kustomize) -> tuple[str, list[dict]]:
    return request.param, [copy.deepcopy(d) for d in _render(kustomize, f"overlays/{request.param}")]


def _is_builtin(doc: dict) -> bool:
    group = doc["apiVersion"].split("/")[0] if "/" in doc["apiVersion"] else ""
    return "." not in group or group.endswith(".k8s.io")


def _kinds(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def _one(docs, kind, name):
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _config(docs) -> dict[str, str]:
    [cm] = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("oel-config")]
    return cm["data"]


# --- kubernetes-validate on the built-in kinds ---------------------------------------------------


def _kubernetes_validate(path: Path, version: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("kubernetes-validate")
    return subprocess.run([str(exe), "--strict", "-k", version, str(path)], capture_output=True, text=True)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_builtin_resources_pass_kubernetes_validate_strict(overlay, version, tmp_path):
    name, docs = overlay
    core = [d for d in docs if _is_builtin(d)]
    assert len(core) >= 15
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump_all(core))
    out = _kubernetes_validate(path, version)
    report = out.stdout + out.stderr
    assert out.returncode == 0, report
    assert "WARN" not in report and "ERROR" not in report and "FATAL" not in report, report
    assert report.count(" passed for resource ") == len(core), report


def test_kubernetes_validate_catches_what_it_must(tmp_path):
    """Negative controls: a misspelt field fails --strict, and an unknown kind only warns (so the test
    above must, and does, fail on WARN; that is also why custom resources are validated apart)."""
    bad = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
           "spec": {"replica": 1, "selector": {"matchLabels": {"a": "b"}},
                    "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    out = _kubernetes_validate(tmp_path / "bad.yaml", KUBERNETES_VERSIONS[0])
    assert out.returncode != 0 and "replica" in out.stdout
    (tmp_path / "cr.yaml").write_text(yaml.safe_dump({"apiVersion": "kafka.strimzi.io/v1", "kind": "KafkaTopic", "metadata": {"name": "t"}}))
    out = _kubernetes_validate(tmp_path / "cr.yaml", KUBERNETES_VERSIONS[0])
    assert "WARN" in out.stdout


# --- custom resources against the vendored CRD schemas ---------------------------------------------


def _strict(schema):
    """openAPIV3Schema -> JSON Schema that rejects unknown fields (unless the CRD preserves them)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if out.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    return out


@cache
def _cr_validator(kind: str, api_version: str):
    import jsonschema

    group, version = api_version.split("/")
    path = SCHEMAS / f"{kind.lower()}-{group}-{version}.json"
    assert path.is_file(), f"no vendored schema for {kind} {api_version} (k8s/crd-schemas/README.md)"
    schema = _strict(json.loads(path.read_text()))
    schema["properties"]["metadata"] = {"type": "object"}  # checked against ObjectMeta below
    return jsonschema.Draft7Validator(schema)


@cache
def _object_meta_validator():
    import jsonschema
    import kubernetes_validate
    from referencing import Registry, Resource

    root = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{KUBERNETES_VERSIONS[0]}-local-strict"
    defs = json.loads((root / "_definitions.json").read_text())
    registry = Resource.from_contents(defs) @ Registry()
    ref = {"$ref": defs["$id"] + "#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
    return jsonschema.Draft202012Validator(ref, registry=registry)


def _cr_errors(doc: dict) -> list[str]:
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in _cr_validator(doc["kind"], doc["apiVersion"]).iter_errors(doc)]
    errors += [f"metadata.{'.'.join(map(str, e.path))}: {e.message}" for e in _object_meta_validator().iter_errors(doc["metadata"])]
    return errors


def test_custom_resources_match_their_crd_schemas(overlay):
    name, docs = overlay
    crs = [d for d in docs if not _is_builtin(d)]
    kinds = {d["kind"] for d in crs}
    assert {"Kafka", "KafkaNodePool", "KafkaTopic", "PodMonitor", "PrometheusRule"} <= kinds
    for doc in crs:
        errors = _cr_errors(doc)
        assert not errors, f"{name}: {doc['kind']}/{doc['metadata']['name']}:\n  " + "\n  ".join(errors)


def test_crd_schema_check_catches_what_it_must(kustomize):
    docs = [copy.deepcopy(d) for d in _render(kustomize, "overlays/dev")]
    topic = _kinds(docs, "KafkaTopic")[0]
    topic["spec"]["partition"] = 3  # misspelt
    assert any("partition" in e for e in _cr_errors(topic))
    kafka = _kinds(docs, "Kafka")[0]
    kafka["spec"]["kafka"]["listeners"][0]["type"] = "intranet"  # not an enum value
    assert _cr_errors(kafka)
    monitor = _kinds(docs, "PodMonitor")[0]
    monitor["metadata"]["labelz"] = {}
    assert any("labelz" in e for e in _cr_errors(monitor))


# --- consistency with the rest of OEL --------------------------------------------------------------


def test_generated_files_are_current():
    out = subprocess.run([sys.executable, str(K8S / "generate.py"), "--check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_kafka_topics_match_oel_topics(overlay):
    from types import SimpleNamespace

    from oel.settings import TopicSettings
    from oel.topics import topic_specs

    name, docs = overlay
    settings = {k.removeprefix("OEL_TOPICS__").lower(): v for k, v in _config(docs).items() if k.startswith("OEL_TOPICS__")}
    specs = {s.name: s for s in topic_specs(SimpleNamespace(topics=TopicSettings(**settings)))}
    topics = {t["spec"]["topicName"]: t for t in _kinds(docs, "KafkaTopic")}
    assert set(topics) == set(specs), f"{name}: KafkaTopics differ from `oel topics`"
    for topic, spec in specs.items():
        cr = topics[topic]["spec"]
        assert cr["partitions"] == spec.partitions, topic
        assert cr["replicas"] == spec.replication_factor, topic
        assert {k: str(v) for k, v in cr["config"].items()} == spec.config, topic
        assert topics[topic]["metadata"]["labels"]["strimzi.io/cluster"] == _kinds(docs, "Kafka")[0]["metadata"]["name"]


def test_replicas_do_not_exceed_partitions(overlay):
    name, docs = overlay
    cfg = _config(docs)
    processor = _one(docs, "Deployment", "oel-processor")
    learner = _one(docs, "Deployment", "oel-learner")
    assert 1 <= processor["spec"]["replicas"] <= int(cfg["OEL_TOPICS__TRAJECTORIES_PARTITIONS"]), name
    assert 1 <= learner["spec"]["replicas"] <= int(cfg["OEL_TOPICS__EXPERIENCE_PARTITIONS"]), name


def test_replication_fits_the_brokers(overlay):
    name, docs = overlay
    brokers = sum(p["spec"]["replicas"] for p in _kinds(docs, "KafkaNodePool") if "broker" in p["spec"]["roles"])
    assert int(_config(docs)["OEL_TOPICS__REPLICATION_FACTOR"]) <= brokers
    kafka_cfg = _kinds(docs, "Kafka")[0]["spec"]["kafka"]["config"]
    assert kafka_cfg["min.insync.replicas"] <= min(t["spec"]["replicas"] for t in _kinds(docs, "KafkaTopic"))


def test_prometheus_rule_holds_the_local_rules(overlay):
    _, docs = overlay
    groups = []
    for path in sorted((REPO / "infra/prometheus/rules").glob("*.yml")):
        groups += yaml.safe_load(path.read_text())["groups"]
    [rule] = _kinds(docs, "PrometheusRule")
    assert rule["spec"]["groups"] == groups


def test_pod_monitors_use_the_local_job_names(overlay):
    _, docs = overlay
    local_jobs = {j["job_name"] for j in yaml.safe_load((REPO / "infra/prometheus/prometheus.yml").read_text())["scrape_configs"]}
    jobs = set()
    for monitor in _kinds(docs, "PodMonitor"):
        for ep in monitor["spec"]["podMetricsEndpoints"]:
            jobs |= {r["replacement"] for r in ep.get("relabelings", []) if r.get("targetLabel") == "job"}
            if monitor["metadata"]["name"].startswith("oel-"):
                assert ep.get("honorLabels") is True, "OEL's namespace label must survive the scrape"
    assert jobs == {"oel-processor", "oel-learner", "oel-agents", "vllm", "minio"} and jobs <= local_jobs


def test_vllm_serves_lora_with_runtime_loading_on_a_gpu_and_admin_only_for_the_learner(overlay, kustomize):
    _, docs = overlay
    vllm = _one(docs, "Deployment", "vllm")
    pod = vllm["spec"]["template"]["spec"]
    server = next(c for c in pod["containers"] if c["name"] == "vllm")
    assert "--enable-lora" in server["args"]
    assert {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"} in server["env"]
    assert server["resources"]["limits"]["nvidia.com/gpu"] == "1" and pod["nodeSelector"]["oel.io/gpu"] == "true"
    learner_pod = _one(docs, "Deployment", "oel-learner")["spec"]["template"]
    assert learner_pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert learner_pod["spec"]["nodeSelector"]["oel.io/gpu"] == "true"

    [policy] = [p for p in _kinds(docs, "NetworkPolicy") if p["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "vllm"}]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    admin_from = [r["from"] for r in policy["spec"]["ingress"] if any(p["port"] == 8000 for p in r["ports"])]
    assert admin_from == [[{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "oel-learner"}}}]]
    assert learner_pod["metadata"]["labels"]["app.kubernetes.io/name"] == "oel-learner"
    for name in ("oel-processor", "oel-agent"):
        labels = _one(docs, "Deployment", name)["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] != "oel-learner"
    # Port 8080 (everyone) is nginx, which refuses the adapter admin paths.
    conf = next(c for c in docs if c["kind"] == "ConfigMap" and c["metadata"]["name"].startswith("vllm-proxy"))["data"]["nginx.conf"]
    assert re.search(r"location ~ \^/v1/\(load\|unload\)_lora_adapter \{ return 403", conf)
    assert "listen 8080" in conf and "proxy_pass http://127.0.0.1:8000" in conf
    assert _config(docs)["OEL_MODEL__VLLM_URL"] == "http://vllm:8080"
    learner_env = {e["name"]: e.get("value") for e in learner_pod["spec"]["containers"][0]["env"]}
    assert learner_env["OEL_MODEL__VLLM_URL"] == "http://vllm-admin:8000"


def test_containers_have_resources_and_probes_and_workloads_have_pdbs(overlay):
    name, docs = overlay
    workloads = _kinds(docs, "Deployment") + _kinds(docs, "StatefulSet")
    pdb_selectors = [p["spec"]["selector"]["matchLabels"] for p in _kinds(docs, "PodDisruptionBudget")]
    for w in workloads:
        for c in w["spec"]["template"]["spec"]["containers"]:
            where = f"{name}: {w['metadata']['name']}/{c['name']}"
            assert c["resources"]["requests"].get("cpu") and c["resources"]["requests"].get("memory"), where
            assert c["resources"]["limits"].get("memory"), where
            assert "readinessProbe" in c and "livenessProbe" in c, where
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, where
        if w["metadata"]["name"] != "oel-learner":  # one learner per GPU, Recreate: nothing to budget
            labels = w["spec"]["template"]["metadata"]["labels"]
            assert any(sel.items() <= labels.items() for sel in pdb_selectors), f"{name}: no PDB for {w['metadata']['name']}"


def test_no_secret_values_and_every_secret_reference_is_accounted_for(overlay):
    name, docs = overlay
    assert not _kinds(docs, "Secret"), "no Secret may be rendered from the repository"
    for cm in _kinds(docs, "ConfigMap"):
        for key in cm.get("data", {}):
            assert not re.search(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN", key), f"{key} belongs in a Secret"
    users = {u["metadata"]["name"] for u in _kinds(docs, "KafkaUser")}
    refs = set()
    for w in _kinds(docs, "Deployment") + _kinds(docs, "StatefulSet"):
        spec = w["spec"]["template"]["spec"]
        for c in spec["containers"]:
            refs |= {e["valueFrom"]["secretKeyRef"]["name"] for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
        refs |= {v["secret"]["secretName"] for v in spec.get("volumes", []) if "secret" in v}
    assert "oel-s3-credentials" in refs
    assert refs <= SECRETS_OUT_OF_BAND | SECRETS_FROM_STRIMZI | users, refs
    doc = (REPO / "docs/operations.md").read_text()
    for secret in SECRETS_OUT_OF_BAND:
        assert re.search(rf"kubectl .*create secret generic {secret}", doc), f"docs/operations.md must say how to create {secret}"


def test_config_map_names_only_real_settings(overlay):
    from oel.settings import settings_reference

    _, docs = overlay
    known = {row[0] for row in settings_reference()}
    unknown = [k for k in _config(docs) if k.startswith("OEL_") and k not in known]
    assert not unknown, f"not OEL settings: {unknown}"


def test_images_are_pinned(overlay):
    _, docs = overlay
    for w in _kinds(docs, "Deployment") + _kinds(docs, "StatefulSet"):
        for c in w["spec"]["template"]["spec"]["containers"]:
            image = c["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), image
