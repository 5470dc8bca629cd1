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
  processor replicas (KEDA) <= partitions; the PrometheusRule holds infra/prometheus/rules; vLLM's admin
  API is reachable only from its own pod's adapter sync; probes, requests/limits, PDBs; no secret values.
* Hardening: a ServiceAccount per workload without a token, non-root containers with read-only roots,
  liveness on progress (/livez), a default-deny NetworkPolicy with the traffic each component needs,
  per-component KafkaUsers with ACLs under authorization: simple (prod).

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
    bad = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {
            "replica": 1,
            "selector": {"matchLabels": {"a": "b"}},
            "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}},
        },
    }
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    out = _kubernetes_validate(tmp_path / "bad.yaml", KUBERNETES_VERSIONS[0])
    assert out.returncode != 0 and "replica" in out.stdout
    (tmp_path / "cr.yaml").write_text(
        yaml.safe_dump({"apiVersion": "kafka.strimzi.io/v1", "kind": "KafkaTopic", "metadata": {"name": "t"}})
    )
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
    assert {"Kafka", "KafkaNodePool", "KafkaTopic", "PodMonitor", "PrometheusRule", "ScaledObject"} <= kinds
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
    assert "replicas" not in processor["spec"], f"{name}: KEDA's HPA owns the processor's replicas"
    scaler = _one(docs, "ScaledObject", "oel-processor")["spec"]
    assert scaler["scaleTargetRef"]["name"] == "oel-processor"
    assert 1 <= scaler["minReplicaCount"] <= scaler["maxReplicaCount"] == int(cfg["OEL_TOPICS__TRAJECTORIES_PARTITIONS"]), name
    assert 1 <= learner["spec"]["replicas"] <= int(cfg["OEL_TOPICS__EXPERIENCE_PARTITIONS"]), name


def test_processor_scales_on_its_consumer_lag_read_from_the_brokers(overlay):
    """KEDA's Kafka scaler on the processor's own consumer group and input topic, over the listener and
    credentials the overlay's clients use."""
    name, docs = overlay
    cfg = _config(docs)
    [trigger] = _one(docs, "ScaledObject", "oel-processor")["spec"]["triggers"]
    meta = trigger["metadata"]
    assert trigger["type"] == "kafka"
    assert meta["consumerGroup"] == "oel-processor" and meta["topic"] == "oel.trajectories"  # APP_ID, TOPICS__TRAJECTORIES defaults
    assert meta["bootstrapServers"] == cfg["OEL_KAFKA__BOOTSTRAP_SERVERS"], name
    assert int(meta["lagThreshold"]) > 0 and meta["allowIdleConsumers"] == "false"
    if cfg["OEL_KAFKA__SECURITY_PROTOCOL"] != "PLAINTEXT":
        auth = _one(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])["spec"]
        params = {r["parameter"] for r in auth["secretTargetRef"] + auth.get("configMapTargetRef", [])}
        assert {"username", "password", "sasl", "tls", "ca"} <= params
        assert _one(docs, "KafkaUser", "oel-keda")


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
    cluster_only = {"kafka", "kafka-exporter"}  # Strimzi's pods: no local counterpart
    assert jobs == {"oel-processor", "oel-learner", "oel-agents", "oel-adapter-sync", "vllm", "minio"} | cluster_only
    assert jobs - cluster_only <= local_jobs


def test_vllm_serves_lora_and_each_pod_syncs_its_own_adapters(overlay):
    """vLLM listens on the pod's loopback only; the pod's adapter-sync container loads promoted versions
    through it from a volume both mount at the same path; nothing else can reach the admin API; the
    learner trains and gates on its own GPU and never calls vLLM."""
    _, docs = overlay
    vllm = _one(docs, "Deployment", "vllm")
    pod = vllm["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    server, sync = containers["vllm"], containers["adapter-sync"]
    assert "--enable-lora" in server["args"] and "--host=127.0.0.1" in server["args"] and "--port=8000" in server["args"]
    assert {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"} in server["env"]
    assert server["resources"]["limits"]["nvidia.com/gpu"] == "1" and pod["nodeSelector"]["oel.io/gpu"] == "true"
    assert not server.get("ports"), "vLLM's own port is not exposed"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert "127.0.0.1:8000/health" in " ".join(server[probe]["exec"]["command"])
    # the sidecar: this pod's server, a volume shared at the same path, a readiness that means "in sync"
    assert sync["args"][:3] == ["oel", "adapters", "sync"] and sync["image"] == containers["adapter-sync"]["image"]
    sync_env = {e["name"]: e.get("value") for e in sync["env"]}
    assert sync_env["OEL_MODEL__VLLM_URL"] == "http://127.0.0.1:8000" and sync_env["OEL_ADAPTER_SYNC_NAMESPACES"]
    dir_arg = sync["args"][sync["args"].index("--dir") + 1]
    mounts = {c: {m["name"]: m for m in containers[c]["volumeMounts"]} for c in ("vllm", "adapter-sync")}
    assert mounts["vllm"]["adapters"]["mountPath"] == mounts["adapter-sync"]["adapters"]["mountPath"] == dir_arg
    assert mounts["vllm"]["adapters"].get("readOnly") is True and not mounts["adapter-sync"]["adapters"].get("readOnly")
    assert any(v["name"] == "adapters" and "emptyDir" in v for v in pod["volumes"])
    assert sync["readinessProbe"]["httpGet"]["path"] == "/readyz" and sync["livenessProbe"]["httpGet"]["path"] == "/livez"
    # no Service reaches port 8000; the proxy refuses the admin paths
    for svc in _kinds(docs, "Service"):
        assert all(p.get("targetPort") not in (8000, "api") and p["port"] != 8000 for p in svc["spec"]["ports"]), svc["metadata"]["name"]
    conf = next(c for c in docs if c["kind"] == "ConfigMap" and c["metadata"]["name"].startswith("vllm-proxy"))["data"]["nginx.conf"]
    assert re.search(r"location ~ \^/v1/\(load\|unload\)_lora_adapter \{ return 403", conf)
    assert "listen 8080" in conf and "proxy_pass http://127.0.0.1:8000" in conf
    assert _config(docs)["OEL_MODEL__VLLM_URL"] == "http://vllm:8080"
    assert _config(docs)["OEL_MODEL__ADAPTERS"] == "served", "agents must not call the admin API the proxy refuses"
    # the learner: the CUDA image, the in-process backend on its GPU
    learner = _one(docs, "Deployment", "oel-learner")["spec"]["template"]["spec"]
    lc = learner["containers"][0]
    learner_env = {e["name"]: e.get("value") for e in lc["env"]}
    assert learner_env["OEL_MODEL__BACKEND"] == "transformers" and learner_env["OEL_MODEL__DEVICE"] == "cuda"
    assert "OEL_MODEL__VLLM_URL" not in learner_env
    assert lc["image"].endswith("-cuda") and lc["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert learner["nodeSelector"]["oel.io/gpu"] == "true"
    images = {
        c["image"]
        for w in _kinds(docs, "Deployment")
        for c in w["spec"]["template"]["spec"]["containers"]
        if c["name"] in ("processor", "agent", "adapter-sync")
    }
    assert len(images) == 1 and lc["image"] == images.pop() + "-cuda", "one image, its CUDA variant for the learner"


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


# --- hardening (issue production-path) -------------------------------------------------------------


def _pods(docs):
    for w in _kinds(docs, "Deployment") + _kinds(docs, "StatefulSet"):
        yield w["metadata"]["name"], w["spec"]["template"]


def test_every_pod_has_its_own_service_account_without_a_token(overlay):
    name, docs = overlay
    accounts = {a["metadata"]["name"]: a for a in _kinds(docs, "ServiceAccount")}
    assert not _kinds(docs, "RoleBinding") and not _kinds(docs, "ClusterRoleBinding")
    for workload, tpl in _pods(docs):
        spec = tpl["spec"]
        sa = spec.get("serviceAccountName")
        assert sa in accounts, f"{name}: {workload} runs as {sa!r}, not one of its own ServiceAccounts"
        assert spec.get("automountServiceAccountToken") is False, f"{name}: {workload} mounts a token"
        assert accounts[sa].get("automountServiceAccountToken") is False, sa


def test_every_container_is_non_root_with_a_read_only_root(overlay):
    name, docs = overlay
    for workload, tpl in _pods(docs):
        spec = tpl["spec"]
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", workload
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c.get("securityContext", {})
            where = f"{name}: {workload}/{c['name']}"
            non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
            uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
            assert non_root is True and uid not in (None, 0), where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("allowPrivilegeEscalation") is False and sc.get("capabilities", {}).get("drop") == ["ALL"], where


def test_liveness_means_progress_not_an_open_metrics_port(overlay):
    """OEL's containers: liveness on /livez (the service's own progress), readiness on /readyz (its broker
    and store reachable, or, for the adapter sync, the server in sync); /metrics stays up when a consumer
    is stuck, so no probe of theirs may use it."""
    name, docs = overlay
    for workload, tpl in _pods(docs):
        for c in tpl["spec"]["containers"]:
            if not c["image"].startswith(("registry.example.com/oel/oel", "oel")):
                continue
            where = f"{name}: {workload}/{c['name']}"
            assert c["livenessProbe"]["httpGet"]["path"] == "/livez", where
            assert c["readinessProbe"]["httpGet"]["path"] == "/readyz", where
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert c.get(probe, {}).get("httpGet", {}).get("path") != "/metrics", where


def _selects(policy: dict, labels: dict) -> bool:
    sel = policy["spec"]["podSelector"]
    if not sel:
        return True
    if any(labels.get(k) != v for k, v in sel.get("matchLabels", {}).items()):
        return False
    for e in sel.get("matchExpressions", []):
        if e["operator"] == "In" and labels.get(e["key"]) not in e["values"]:
            return False
    return True


def _peers_allowed(policies, labels, direction) -> list[dict]:
    """Every (peer, ports) rule that lets traffic in or out of pods with ``labels``."""
    out = []
    for p in policies:
        if _selects(p, labels) and direction.capitalize() in p["spec"]["policyTypes"]:
            for rule in p["spec"].get(direction, []):
                out.append(rule)
    return out


def _pod_allows(rules, peer_labels: dict | None, port: int, namespace: str | None = None) -> bool:
    for rule in rules:
        ports = [p["port"] for p in rule.get("ports", [])]
        if ports and port not in ports:
            continue
        peers = rule.get("to", rule.get("from"))
        if peers is None:
            return True
        for peer in peers:
            ns_ok = (
                "namespaceSelector" not in peer
                or peer["namespaceSelector"].get("matchLabels", {}).get("kubernetes.io/metadata.name") == namespace
            )
            if "podSelector" in peer:
                pod_ok = peer_labels is not None and _selects({"spec": {"podSelector": peer["podSelector"]}}, peer_labels)
            else:
                pod_ok = namespace is not None
            if "namespaceSelector" not in peer and namespace is not None:
                continue
            if ns_ok and pod_ok:
                return True
    return False


def test_default_deny_with_exactly_the_traffic_each_component_needs(overlay):
    name, docs = overlay
    policies = _kinds(docs, "NetworkPolicy")
    deny = [p for p in policies if not p["spec"]["podSelector"] and not p["spec"].get("ingress") and not p["spec"].get("egress")]
    assert deny and set(deny[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}, f"{name}: no default deny"
    labels = {w: tpl["metadata"]["labels"] for w, tpl in _pods(docs)}
    kafka = {"strimzi.io/cluster": "oel", "strimzi.io/kind": "Kafka"}
    dns = {"k8s-app": "kube-dns"}

    def out(src, dst, port, ns=None):
        return _pod_allows(_peers_allowed(policies, labels[src], "egress"), dst, port, ns)

    def into(dst, src, port, ns=None):
        return _pod_allows(_peers_allowed(policies, labels[dst], "ingress"), src, port, ns)

    needs = {  # (source, destination, port): what each component must be able to do
        ("oel-processor", "kafka", 9093),
        ("oel-processor", "minio", 9000),
        ("oel-processor", "vllm", 8080),
        ("oel-learner", "kafka", 9093),
        ("oel-learner", "minio", 9000),
        ("oel-agent", "kafka", 9093),
        ("oel-agent", "minio", 9000),
        ("oel-agent", "vllm", 8080),
        ("vllm", "kafka", 9093),
        ("vllm", "minio", 9000),
        ("minio", "minio", 9000),
    }
    forbidden = {
        ("oel-learner", "vllm", 8080),
        ("oel-agent", "vllm", 8000),
        ("oel-processor", "vllm", 8000),
        ("oel-learner", "vllm", 8000),
        ("minio", "kafka", 9093),
        ("vllm", "vllm", 8080),
        ("oel-agent", "oel-learner", 9102),
    }
    for src, dst, port in needs | forbidden:
        dst_labels = kafka if dst == "kafka" else labels[dst]
        allowed = out(src, dst_labels, port) and (dst == "kafka" or into(dst, labels[src], port))
        assert allowed == ((src, dst, port) in needs), f"{name}: {src} -> {dst}:{port} {'blocked' if not allowed else 'allowed'}"
    for w in labels:  # everyone resolves names; Prometheus scrapes every metrics port
        assert _pod_allows(_peers_allowed(policies, labels[w], "egress"), dns, 53, "kube-system"), w
    for w, port in {"oel-processor": 9101, "oel-learner": 9102, "oel-agent": 9103, "vllm": 8080, "minio": 9000}.items():
        assert into(w, None, port, "monitoring"), f"{name}: monitoring cannot scrape {w}:{port}"
    assert into("vllm", None, 9104, "monitoring")
    assert not out("oel-processor", None, 443, "default"), "no OEL service talks to the outside"


def test_kafka_metrics_and_exporter_are_on(overlay):
    _, docs = overlay
    spec = _kinds(docs, "Kafka")[0]["spec"]
    assert spec["kafka"]["metricsConfig"]["type"] == "strimziMetricsReporter"
    assert spec["kafkaExporter"]["groupRegex"] and spec["kafkaExporter"]["topicRegex"]


def test_prod_kafka_authorizes_each_component_by_its_own_acls(kustomize):
    docs = [copy.deepcopy(d) for d in _render(kustomize, "overlays/prod")]
    kafka = _kinds(docs, "Kafka")[0]["spec"]["kafka"]
    assert kafka["authorization"] == {"type": "simple"}
    assert all(listener.get("authentication", {}).get("type") == "scram-sha-512" for listener in kafka["listeners"])
    users = {u["metadata"]["name"]: u["spec"] for u in _kinds(docs, "KafkaUser")}
    assert set(users) == {"oel-processor", "oel-learner", "oel-agent", "oel-adapter-sync", "oel-keda"}
    for user, spec in users.items():
        assert spec["authorization"]["type"] == "simple" and spec["authorization"]["acls"], user
        assert not any(
            a["resource"]["type"] == "topic" and a["resource"].get("name") in ("*", "") for a in spec["authorization"]["acls"]
        ), user

    def ops(user, rtype, name):
        out = set()
        for a in users[user]["authorization"]["acls"]:
            r = a["resource"]
            hit = r.get("name") == name if r.get("patternType", "literal") == "literal" else name.startswith(r["name"])
            if r["type"] == rtype and hit:
                out |= set(a["operations"])
        return out

    assert {"Write"} <= ops("oel-agent", "topic", "oel.trajectories") and "Read" not in ops("oel-agent", "topic", "oel.trajectories")
    assert "Read" in ops("oel-agent", "topic", "oel.model-versions") and "Write" not in ops("oel-agent", "topic", "oel.model-versions")
    assert not ops("oel-agent", "topic", "oel.experience")
    assert "Read" in ops("oel-processor", "topic", "oel.trajectories") and "Write" in ops("oel-processor", "topic", "oel.experience")
    assert "Write" not in ops("oel-processor", "topic", "oel.model-versions")
    assert "Read" in ops("oel-learner", "topic", "oel.experience") and "Write" in ops("oel-learner", "topic", "oel.model-versions")
    assert "Write" not in ops("oel-learner", "topic", "oel.trajectories")
    assert ops("oel-adapter-sync", "topic", "oel.model-versions") == {"Read", "Describe"}
    assert ops("oel-keda", "group", "oel-processor") == {"Describe"}
    # each client container authenticates as its own user, with that user's password Secret
    expected = {
        ("oel-processor", "processor"): "oel-processor",
        ("oel-learner", "learner"): "oel-learner",
        ("oel-agent", "agent"): "oel-agent",
        ("vllm", "adapter-sync"): "oel-adapter-sync",
    }
    for (deploy, container), user in expected.items():
        c = next(c for c in _one(docs, "Deployment", deploy)["spec"]["template"]["spec"]["containers"] if c["name"] == container)
        env = {e["name"]: e for e in c["env"]}
        assert env["OEL_KAFKA__SASL_USERNAME"]["value"] == user, (deploy, container)
        assert env["OEL_KAFKA__SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == user, (deploy, container)
        assert any(m["mountPath"] == "/etc/oel/kafka-ca" for m in c["volumeMounts"]), (deploy, container)
