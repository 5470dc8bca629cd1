"""Every Prometheus metric OEL exposes, in one registry, plus the helper that serves ``/metrics``.

Conventions (https://prometheus.io/docs/practices/naming/):

* every name starts with ``oel_``; units are base units and are part of the name (``_seconds``,
  ``_bytes``); counters end in ``_total``; ratios are 0..1, never percent;
* labels are bounded: ``namespace`` (the unit of learning: a handful per deployment), ``topic`` and
  ``partition`` (the configured topics), a ``reason``/``outcome`` drawn from a fixed tuple below
  (anything else is counted as ``other``), and ``model_version`` only on the per-version evaluation
  gauges and the current-version info gauge, whose old versions are removed (see
  :func:`observe_evaluation` and :func:`set_current_version`), so a long-lived learner does not grow
  one series per version forever;
* in Kubernetes the scrape must keep our ``namespace`` label (the PodMonitors set
  ``honorLabels: true``); otherwise Prometheus renames it to ``exported_namespace``.

Every metric lives in :data:`REGISTRY` (not prometheus-client's global one), together with the
process and platform collectors; a process that runs several services (``oel demo``) shares it.
Services call :func:`start_metrics_server` once with their ``MetricsSettings``. Instrument code
with the objects below directly (``EVENTS_CONSUMED.labels(topic=t).inc()``) or through the small
helpers where a label must stay bounded (:func:`count_dead_letter`, :func:`count_rejected_round`,
:func:`observe_evaluation`, :func:`set_current_version`) or several series move together
(:func:`observe_opcd_step`, :func:`count_adapter_load`). Call :func:`init_namespace` when a service
first meets a namespace, so that the first increment of a counter (e.g. the first rollback) is visible
to ``increase()``.

Which service exposes what (default ports: processor 9101, learner 9102, agents 9103):

======================  ==========================================================================
processor               events consumed / dead-lettered, episodes, extraction latency, KB items and
                        size, consumer lag of ``oel.trajectories``
learner                 rounds, OPCD steps, training throughput, evaluation, the version it last
                        published, consumer lag of ``oel.experience``
agents (producers)      recorder events sent / failed / pending (Recorder), current version and
                        rollbacks (VersionFollower), adapter loads (producers.adapters.AdapterLoader)
gateway                 requests by route and outcome, the gateway's own time per call, steps
                        recorded, open episodes (plus the recorder's and adapter loads')
======================  ==========================================================================

This module is part of the core: it imports no Kafka or Faust client.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    gc_collector,
    generate_latest,
    make_wsgi_app,
    platform_collector,
    process_collector,
)
from prometheus_client.metrics import MetricWrapperBase

if TYPE_CHECKING:  # pragma: no cover
    from oel.settings import MetricsSettings

log = logging.getLogger(__name__)

#: The registry every OEL metric is registered in; serve it with :func:`start_metrics_server`.
REGISTRY = CollectorRegistry(auto_describe=True)
process_collector.ProcessCollector(registry=REGISTRY)
platform_collector.PlatformCollector(registry=REGISTRY)
gc_collector.GCCollector(registry=REGISTRY)

# --- bounded label values -------------------------------------------------------------------

#: Why an event went to a dead-letter topic (the ``reason`` label of ``oel_events_dead_lettered_total``).
DLQ_REASONS = ("not_json", "schema", "too_large", "out_of_order", "extraction", "other")
#: Why the evaluation gate rejected a round (the ``reason`` label of ``oel_rounds_rejected_total``).
REJECT_REASONS = ("pass_rate", "ood", "pass_rate_and_ood", "other")
#: Why the knowledge gate skipped a round (the ``check`` label of ``oel_rounds_skipped_total``).
SKIP_CHECKS = ("no_gain", "ood", "no_gain_and_ood", "other")
#: How an adapter load ended (the ``outcome`` label of ``oel_adapter_loads_total``).
LOAD_OUTCOMES = ("ok", "error")
#: How many versions per namespace keep their per-version evaluation series.
EVALUATION_VERSIONS_KEPT = 10
ROUND_STAGES = ("knowledge_gate", "opcd_setup", "opcd_sample", "opcd_update", "opcd_checks", "gate", "publish")
"""Label values of ``oel_round_stage_seconds{stage}`` (:data:`learner.rounds.STAGES` says what each covers)."""


def _bounded(value: str, allowed: tuple[str, ...]) -> str:
    return value if value in allowed else "other"


# --- buckets ---------------------------------------------------------------------------------

# A model call on 2 CPU cores takes seconds to minutes; on a GPU, 100 ms to seconds.
_MODEL_CALL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, float("inf"))
_ROUND_BUCKETS = (10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, float("inf"))
# Reverse KL per token, nats: ~1e-3 once consolidated, ~0.1-1 at the start of a round.
_KL_BUCKETS = (1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1, 3, 10, float("inf"))
_ADAPTER_LOAD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, float("inf"))

# --- stream: events and dead letters (processor, learner) -------------------------------------

EVENTS_CONSUMED = Counter(
    "oel_events_consumed_total",
    "Events read from an input topic by a stream worker, valid or not (so DLQ ratio = "
    "oel_events_dead_lettered_total / oel_events_consumed_total per topic).",
    ["topic"],
    registry=REGISTRY,
)
EVENTS_DEAD_LETTERED = Counter(
    "oel_events_dead_lettered_total",
    "Events sent to <topic>.dlq instead of being processed; topic is the source topic, reason one of "
    + ", ".join(DLQ_REASONS)
    + " (the full reason is in the DLQ record's oel.error header).",
    ["topic", "reason"],
    registry=REGISTRY,
)
LAST_EVENT_TIMESTAMP = Gauge(
    "oel_last_event_timestamp_seconds",
    "Unix time at which the worker last consumed an event from the topic (0 = none yet).",
    ["topic"],
    registry=REGISTRY,
)
CONSUMER_LAG = Gauge(
    "oel_consumer_lag_messages",
    "Messages between the consumer group's committed offset and the end of the partition, as last "
    "seen by the worker that owns the partition.",
    ["topic", "partition"],
    registry=REGISTRY,
)

# --- processor: episodes, extraction, knowledge base -----------------------------------------

EPISODES_COMPLETED = Counter(
    "oel_episodes_completed_total",
    "Episodes assembled from their trajectory events and handed to extraction.",
    ["namespace"],
    registry=REGISTRY,
)
EPISODES_ABANDONED = Counter(
    "oel_episodes_abandoned_total",
    "Episodes closed without their end event (no event for OEL_PROCESSOR__ABANDON_AFTER_S); they are stored and extracted like any other.",
    ["namespace"],
    registry=REGISTRY,
)
EXTRACTION_DURATION = Histogram(
    "oel_extraction_duration_seconds",
    "Wall time of one extraction call (a batch of episodes -> experience items), including retries.",
    ["namespace"],
    buckets=_MODEL_CALL_BUCKETS,
    registry=REGISTRY,
)
EXTRACTION_FAILURES = Counter(
    "oel_extraction_failures_total",
    "Extraction attempts that failed: a transient fault (store, model server) is retried; any other failure "
    "dead-letters the episode on oel.episodes.dlq. No episode is dropped.",
    ["namespace"],
    registry=REGISTRY,
)
REDELIVERIES = Counter(
    "oel_processor_redeliveries_total",
    "Partitions sought back because Faust read records from them that never reached the agent (after a rebalance).",
    ["topic"],
    registry=REGISTRY,
)
KB_ITEMS_APPENDED = Counter(
    "oel_kb_items_appended_total",
    "New experience items written to the namespace's knowledge base.",
    ["namespace"],
    registry=REGISTRY,
)
KB_ITEMS_DEDUPLICATED = Counter(
    "oel_kb_items_deduplicated_total",
    "Extracted items whose id (hash of namespace + normalised text) already existed, so were not appended.",
    ["namespace"],
    registry=REGISTRY,
)
KB_ITEMS = Gauge(
    "oel_kb_items",
    "Experience items in the namespace's knowledge base (all stored items, not only the current snapshot).",
    ["namespace"],
    registry=REGISTRY,
)
KB_SNAPSHOT_TOKENS = Gauge(
    "oel_kb_snapshot_tokens",
    "Tokens of the namespace's current KB snapshot (the items that fit the experience token budget).",
    ["namespace"],
    registry=REGISTRY,
)
KB_SIZE = Gauge(
    "oel_kb_size_bytes",
    "Bytes of the namespace's current KB snapshot text.",
    ["namespace"],
    registry=REGISTRY,
)

# --- learner: rounds, OPCD, evaluation, versions ---------------------------------------------

ROUNDS_STARTED = Counter(
    "oel_rounds_started_total",
    "Consolidation (OPCD) rounds started; a round resumed after a crash is not counted again.",
    ["namespace"],
    registry=REGISTRY,
)
ROUNDS_FINISHED = Counter(
    "oel_rounds_finished_total",
    "Rounds that trained, passed the evaluation gate and published a new model version.",
    ["namespace"],
    registry=REGISTRY,
)
ROUNDS_REJECTED = Counter(
    "oel_rounds_rejected_total",
    "Rounds whose new version the evaluation gate rejected (not rolled out); reason one of " + ", ".join(REJECT_REASONS) + ".",
    ["namespace", "reason"],
    registry=REGISTRY,
)
ROUNDS_SKIPPED = Counter(
    "oel_rounds_skipped_total",
    "Rounds the knowledge gate skipped before training: the KB did not help in context; check one of " + ", ".join(SKIP_CHECKS) + ".",
    ["namespace", "check"],
    registry=REGISTRY,
)
KNOWLEDGE_PASS_RATE = Gauge(
    "oel_knowledge_pass_rate",
    "Held-out pass rate (0..1) of the base model on the newest KB the knowledge gate checked: condition "
    "none (no experience) or in_context (the KB in the prompt).",
    ["namespace", "condition"],
    registry=REGISTRY,
)
ROUNDS_FAILED = Counter(
    "oel_rounds_failed_total",
    "Rounds that ended with an error before the gate (they are retried with the same round id).",
    ["namespace"],
    registry=REGISTRY,
)
ROUND_IN_PROGRESS = Gauge(
    "oel_round_in_progress",
    "1 while a round of the namespace is running, else 0.",
    ["namespace"],
    registry=REGISTRY,
)
ROUND_STAGE_SECONDS = Histogram(
    "oel_round_stage_seconds",
    "Wall time of one stage of a round (learner.rounds.STAGES: knowledge_gate, opcd_setup, opcd_sample, opcd_update, "
    "opcd_checks, gate, publish).",
    ["namespace", "stage"],
    buckets=_ROUND_BUCKETS,
    registry=REGISTRY,
)
ROUND_DURATION = Histogram(
    "oel_round_duration_seconds",
    "Wall time of a round from start to the gate's decision (finished or rejected).",
    ["namespace"],
    buckets=_ROUND_BUCKETS,
    registry=REGISTRY,
)
LAST_ROUND_TIMESTAMP = Gauge(
    "oel_last_round_end_timestamp_seconds",
    "Unix time at which the namespace's last round ended (finished or rejected).",
    ["namespace"],
    registry=REGISTRY,
)
OPCD_STEPS = Counter(
    "oel_opcd_steps_total",
    "OPCD optimizer steps taken.",
    ["namespace"],
    registry=REGISTRY,
)
OPCD_LAST_LOSS = Gauge(
    "oel_opcd_last_step_loss",
    "OPCD loss of the last optimizer step: mean over tokens of the student's top-k reverse KL to the teacher (nats per token).",
    ["namespace"],
    registry=REGISTRY,
)
OPCD_LAST_KL = Gauge(
    "oel_opcd_last_step_kl",
    "Reverse KL(student || teacher) per token of the last step, over the full vocabulary (nats).",
    ["namespace"],
    registry=REGISTRY,
)
OPCD_STEP_LOSS = Histogram(
    "oel_opcd_step_loss",
    "Distribution of the OPCD loss per optimizer step (nats per token).",
    ["namespace"],
    buckets=_KL_BUCKETS,
    registry=REGISTRY,
)
OPCD_STEP_KL = Histogram(
    "oel_opcd_step_kl",
    "Distribution of the full-vocabulary reverse KL per optimizer step (nats per token).",
    ["namespace"],
    buckets=_KL_BUCKETS,
    registry=REGISTRY,
)
TRAINING_TOKENS = Counter(
    "oel_training_tokens_total",
    "Response tokens the student sampled and trained on (rate() of this = training tokens/s).",
    ["namespace"],
    registry=REGISTRY,
)
TRAINING_TOKENS_PER_SECOND = Gauge(
    "oel_training_tokens_per_second",
    "Training throughput of the last optimizer step: response tokens / step wall time.",
    ["namespace"],
    registry=REGISTRY,
)
EVALUATION_PASS_RATE = Gauge(
    "oel_evaluation_pass_rate",
    "Held-out pass rate (0..1, no experience in context) of a model version, as measured by the gate "
    f"(the last {EVALUATION_VERSIONS_KEPT} versions per namespace are kept).",
    ["namespace", "model_version"],
    registry=REGISTRY,
)
EVALUATION_RESPONSE_TOKENS = Gauge(
    "oel_evaluation_response_tokens",
    "Mean response length in tokens of a model version on the held-out evaluation (falls as it learns).",
    ["namespace", "model_version"],
    registry=REGISTRY,
)
EVALUATION_OOD_SCORE = Gauge(
    "oel_evaluation_ood_score",
    "Out-of-distribution instruction-following score (0..1, IFEval-style checks) of a model version.",
    ["namespace", "model_version"],
    registry=REGISTRY,
)
MODEL_VERSION = Gauge(
    "oel_model_version_info",
    "1 for the model version currently rolled out to the namespace (exactly one series per namespace).",
    ["namespace", "model_version"],
    registry=REGISTRY,
)
MODEL_VERSIONS_PUBLISHED = Counter(
    "oel_model_versions_published_total",
    "ModelVersion events published to oel.model-versions (promotions and rollbacks included).",
    ["namespace"],
    registry=REGISTRY,
)
MODEL_ROLLBACKS = Counter(
    "oel_model_rollbacks_total",
    "Rollbacks observed: the namespace's current version was set back to an earlier version.",
    ["namespace"],
    registry=REGISTRY,
)

# --- agents: recorder and adapters --------------------------------------------------------------

RECORDER_EVENTS_SENT = Counter(
    "oel_recorder_events_sent_total",
    "Trajectory events the recorder SDK delivered to Kafka (acknowledged by the broker).",
    ["namespace"],
    registry=REGISTRY,
)
RECORDER_EVENTS_FAILED = Counter(
    "oel_recorder_events_failed_total",
    "Trajectory events the recorder could not deliver (broker down at close, delivery error).",
    ["namespace"],
    registry=REGISTRY,
)
RECORDER_PENDING_EVENTS = Gauge(
    "oel_recorder_pending_events",
    "Events buffered in the recorder awaiting delivery (bounded by its back-pressure limit).",
    ["namespace"],
    registry=REGISTRY,
)
AGENT_EPISODES = Counter(
    "oel_agent_episodes_total",
    "Episodes an agent played to the end.",
    ["namespace"],
    registry=REGISTRY,
)
ADAPTER_LOAD_DURATION = Histogram(
    "oel_adapter_load_duration_seconds",
    "Time to load a model version's LoRA adapter (download + load into the backend).",
    ["namespace"],
    buckets=_ADAPTER_LOAD_BUCKETS,
    registry=REGISTRY,
)
ADAPTER_LOADS = Counter(
    "oel_adapter_loads_total",
    "Adapter loads attempted, by outcome (" + ", ".join(LOAD_OUTCOMES) + ").",
    ["namespace", "outcome"],
    registry=REGISTRY,
)

ADAPTERS_SERVED = Gauge(
    "oel_adapters_served",
    "Adapters of the namespace that this pod's vLLM server serves, as counted by its adapter-sync sidecar "
    "(the current version and up to `--keep` - 1 earlier ones; 0 = not even the current one).",
    ["namespace"],
    registry=REGISTRY,
)

# --- the recording gateway (oel gateway) ----------------------------------------------------------

GATEWAY_ROUTES = ("chat", "completions", "models", "feedback", "end", "traces")
GATEWAY_OUTCOMES = ("ok", "bad_request", "upstream_error", "upstream_unreachable", "unknown_episode")
_GATEWAY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, float("inf"))

GATEWAY_REQUESTS = Counter(
    "oel_gateway_requests_total",
    "Requests the gateway answered, by route (" + ", ".join(GATEWAY_ROUTES) + ") and outcome (" + ", ".join(GATEWAY_OUTCOMES) + ").",
    ["route", "outcome"],
    registry=REGISTRY,
)
GATEWAY_OVERHEAD = Histogram(
    "oel_gateway_overhead_seconds",
    "Time a model call spent in the gateway itself: the whole call less the waits for the upstream server and the client.",
    ["route"],
    buckets=_GATEWAY_BUCKETS,
    registry=REGISTRY,
)
GATEWAY_STEPS = Counter(
    "oel_gateway_steps_recorded_total",
    "Answered calls the gateway recorded as steps of an episode.",
    ["namespace"],
    registry=REGISTRY,
)
GATEWAY_OPEN_EPISODES = Gauge(
    "oel_gateway_open_episodes",
    "Episodes the gateway holds open (ended by a call to /end, or after OEL_GATEWAY__IDLE_END_S).",
    registry=REGISTRY,
)


def count_gateway_request(route: str, outcome: str) -> None:
    GATEWAY_REQUESTS.labels(route=_bounded(route, GATEWAY_ROUTES), outcome=_bounded(outcome, GATEWAY_OUTCOMES)).inc()


# --- every process ----------------------------------------------------------------------------

SERVICE_INFO = Gauge(
    "oel_service_info",
    "1 for each OEL service running in this process (service name, OEL package version).",
    ["service", "version"],
    registry=REGISTRY,
)


# --- helpers that keep labels bounded ----------------------------------------------------------


def count_dead_letter(topic: str, reason: str, n: int = 1) -> None:
    """Count ``n`` events of ``topic`` sent to its DLQ; a reason outside :data:`DLQ_REASONS` counts as ``other``."""
    EVENTS_DEAD_LETTERED.labels(topic=topic, reason=_bounded(reason, DLQ_REASONS)).inc(n)


def count_rejected_round(namespace: str, reason: str) -> None:
    """Count a round the gate rejected; a reason outside :data:`REJECT_REASONS` counts as ``other``."""
    ROUNDS_REJECTED.labels(namespace=namespace, reason=_bounded(reason, REJECT_REASONS)).inc()


def count_skipped_round(namespace: str, check: str) -> None:
    """Count a round the knowledge gate skipped; a check outside :data:`SKIP_CHECKS` counts as ``other``."""
    ROUNDS_SKIPPED.labels(namespace=namespace, check=_bounded(check, SKIP_CHECKS)).inc()


def observe_knowledge(namespace: str, none: float | None, in_context: float | None) -> None:
    """Set the knowledge gate's pass-rate gauges of a namespace (nothing when it had no held-out evaluation)."""
    if none is not None and in_context is not None:
        KNOWLEDGE_PASS_RATE.labels(namespace=namespace, condition="none").set(none)
        KNOWLEDGE_PASS_RATE.labels(namespace=namespace, condition="in_context").set(in_context)


def count_adapter_load(namespace: str, seconds: float | None, ok: bool = True) -> None:
    """Record one adapter load: its duration (if it succeeded) and its outcome."""
    if ok and seconds is not None:
        ADAPTER_LOAD_DURATION.labels(namespace=namespace).observe(seconds)
    ADAPTER_LOADS.labels(namespace=namespace, outcome="ok" if ok else "error").inc()


def observe_round_stages(namespace: str, stages: dict[str, float]) -> None:
    """Record the seconds of each stage of a finished round."""
    for stage, seconds in stages.items():
        ROUND_STAGE_SECONDS.labels(namespace=namespace, stage=stage).observe(seconds)


def observe_opcd_step(namespace: str, loss: float, kl: float, tokens: int, seconds: float) -> None:
    """Record one OPCD optimizer step: last-step gauges, per-step histograms, tokens and tokens/s."""
    OPCD_STEPS.labels(namespace=namespace).inc()
    OPCD_LAST_LOSS.labels(namespace=namespace).set(loss)
    OPCD_LAST_KL.labels(namespace=namespace).set(kl)
    OPCD_STEP_LOSS.labels(namespace=namespace).observe(loss)
    OPCD_STEP_KL.labels(namespace=namespace).observe(kl)
    TRAINING_TOKENS.labels(namespace=namespace).inc(tokens)
    if seconds > 0:
        TRAINING_TOKENS_PER_SECOND.labels(namespace=namespace).set(tokens / seconds)


_lock = threading.Lock()
_evaluated: dict[str, OrderedDict[str, None]] = {}
_current: dict[str, str] = {}


def observe_evaluation(
    namespace: str,
    model_version: str,
    pass_rate: float | None = None,
    response_tokens: float | None = None,
    ood_score: float | None = None,
    keep: int = EVALUATION_VERSIONS_KEPT,
) -> None:
    """Set a version's evaluation gauges; the series of versions older than the last ``keep`` are removed."""
    gauges = (EVALUATION_PASS_RATE, EVALUATION_RESPONSE_TOKENS, EVALUATION_OOD_SCORE)
    with _lock:
        seen = _evaluated.setdefault(namespace, OrderedDict())
        seen[model_version] = None
        seen.move_to_end(model_version)
        while len(seen) > max(keep, 1):
            old, _ = seen.popitem(last=False)
            for gauge in gauges:
                _remove(gauge, namespace, old)
    for gauge, value in zip(gauges, (pass_rate, response_tokens, ood_score)):
        if value is not None:
            gauge.labels(namespace=namespace, model_version=model_version).set(value)


def set_current_version(namespace: str, model_version: str, rollback: bool = False) -> None:
    """Make ``model_version`` the namespace's one ``oel_model_version_info`` series; count a rollback if told."""
    with _lock:
        previous = _current.get(namespace)
        _current[namespace] = model_version
        if previous is not None and previous != model_version:
            _remove(MODEL_VERSION, namespace, previous)
    MODEL_VERSION.labels(namespace=namespace, model_version=model_version).set(1)
    if rollback:
        MODEL_ROLLBACKS.labels(namespace=namespace).inc()


def init_namespace(namespace: str) -> None:
    """Create the namespace's counter and histogram series at 0 (and ``oel_round_in_progress`` at 0).

    Call it when a service first meets a namespace: Prometheus's ``increase()`` cannot see the first
    increment of a series that is born at 1, so an alert on e.g. the first rollback would miss it, and
    a latency quantile over a single observation (one round) would have no rate to work with.
    """
    bounded = {"reason": REJECT_REASONS, "outcome": LOAD_OUTCOMES, "check": SKIP_CHECKS, "stage": ROUND_STAGES}
    for metric in all_metrics():
        names = metric._labelnames  # noqa: SLF001
        if metric._type not in ("counter", "histogram") or "namespace" not in names:  # noqa: SLF001
            continue
        others = [n for n in names if n != "namespace"]
        if not others:
            metric.labels(namespace=namespace)
        elif len(others) == 1 and others[0] in bounded:
            for value in bounded[others[0]]:
                metric.labels(**{"namespace": namespace, others[0]: value})
    ROUND_IN_PROGRESS.labels(namespace=namespace).set(0)


def _remove(metric: MetricWrapperBase, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:
        pass


# --- exposition -----------------------------------------------------------------------------------


def all_metrics() -> list[MetricWrapperBase]:
    """Every OEL metric object defined in this module, in definition order."""
    return [v for v in globals().values() if isinstance(v, MetricWrapperBase)]


def exposed_names() -> set[str]:
    """Every sample name OEL's metrics can expose (``_total``, ``_bucket``, ``_sum``, ``_count``,
    ``_created``, ``_info`` included): what dashboards and alert rules may reference."""
    names: set[str] = set()
    for metric in all_metrics():
        base = metric._name  # noqa: SLF001 (prometheus-client keeps the family name here)
        kind = metric._type  # noqa: SLF001
        if kind == "counter":
            names |= {base + "_total", base + "_created"}
        elif kind == "histogram":
            names |= {base + s for s in ("_bucket", "_sum", "_count", "_created")}
        elif kind == "info":
            names.add(base + "_info")
        else:
            names.add(base)
    return names


def render() -> tuple[bytes, str]:
    """The current exposition text and its content type, for a service that serves /metrics itself."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


_servers: dict[tuple[str, int], object] = {}

READINESS_CHECKS: dict[str, Callable[[], str | None]] = {}
"""What ``/readyz`` asks, by dependency: each returns None when it is reachable, else why not."""


def add_readiness_check(name: str, check: Callable[[], str | None]) -> None:
    """Make ``/readyz`` (next to ``/metrics``) answer 503 while ``check`` reports a problem, so that a pod
    whose broker or store is unreachable is not ready."""
    READINESS_CHECKS[name] = check


def readiness() -> tuple[bool, str]:
    """(ready, one line per dependency) from every registered check."""
    lines, ready = [], True
    for name, check in sorted(READINESS_CHECKS.items()):
        try:
            problem = check()
        except Exception as exc:  # a check that fails is a dependency that is not ready
            problem = f"{type(exc).__name__}: {exc}"
        ready = ready and problem is None
        lines.append(f"{name}: {'ok' if problem is None else problem}")
    return ready, "\n".join(lines or ["no dependencies"]) + "\n"


LIVENESS_CHECKS: dict[str, Callable[[], str | None]] = {}
"""What ``/livez`` asks: each returns None while that part of the process makes progress, else why not."""


def add_liveness_check(name: str, check: Callable[[], str | None]) -> None:
    """Make ``/livez`` answer 503 while ``check`` reports a problem (a consumer loop that stopped polling, a
    dead thread), so that Kubernetes restarts a process that is up but stuck. Unlike readiness, a broker or
    store that is down is not a liveness problem: restarting would not fix it."""
    LIVENESS_CHECKS[name] = check


def liveness() -> tuple[bool, str]:
    """(live, one line per check) from every registered liveness check."""
    lines, live = [], True
    for name, check in sorted(LIVENESS_CHECKS.items()):
        try:
            problem = check()
        except Exception as exc:  # noqa: BLE001 - a check that fails says the process is not well
            problem = f"{type(exc).__name__}: {exc}"
        live = live and problem is None
        lines.append(f"{name}: {'ok' if problem is None else problem}")
    return live, "\n".join(lines or ["no checks"]) + "\n"


class Heartbeat:
    """A loop's proof of progress for ``/livez``: the loop calls :meth:`beat` every iteration (a consumer's
    poll, even one that returned nothing); :meth:`problem` reports the loop as stuck once ``max_age_s`` passed
    without a beat. Before the first beat it reports nothing (start-up is the startup probe's business)."""

    def __init__(self, what: str, max_age_s: float = 120.0):
        self.what = what
        self.max_age_s = max_age_s
        self.last: float | None = None

    def beat(self) -> None:
        self.last = time.monotonic()

    def problem(self) -> str | None:
        if self.last is None:
            return None
        age = time.monotonic() - self.last
        return None if age <= self.max_age_s else f"{self.what}: no progress for {age:.0f}s (limit {self.max_age_s:.0f}s)"


_metrics_app = make_wsgi_app(REGISTRY)


def _app(environ: dict, start_response: Callable) -> list[bytes]:
    """``/readyz``: readiness; ``/livez``: liveness; any other path: the metrics (as prometheus_client serves them)."""
    if environ.get("PATH_INFO") == "/readyz":
        ready, text = readiness()
        start_response("200 OK" if ready else "503 Service Unavailable", [("Content-Type", "text/plain; charset=utf-8")])
        return [text.encode()]
    if environ.get("PATH_INFO") == "/livez":
        live, text = liveness()
        start_response("200 OK" if live else "503 Service Unavailable", [("Content-Type", "text/plain; charset=utf-8")])
        return [text.encode()]
    return _metrics_app(environ, start_response)


def start_metrics_server(settings: MetricsSettings, service: str, default_port: int | None = None) -> int | None:
    """Serve :data:`REGISTRY` on ``http://<host>:<port>/metrics`` in a daemon thread.

    ``port`` 0 means no endpoint (returns None); an unset port takes ``default_port`` (the service's
    default: processor 9101, learner 9102, agents 9103). Calling it again for an address this process already
    serves is a no-op, so several services in one process (``oel demo``) can each call it. Returns the
    port served. Sets ``oel_service_info{service=...}``.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        oel_version = version("oel")
    except PackageNotFoundError:  # pragma: no cover (source checkout without install)
        oel_version = "unknown"
    SERVICE_INFO.labels(service=service, version=oel_version).set(1)
    port = settings.port if settings.port is not None else default_port
    if port is None:
        raise ValueError(f"{service}: no metrics port (set OEL_METRICS__PORT, or pass the service's default_port)")
    if port == 0:
        log.info("metrics endpoint off (OEL_METRICS__PORT=0)")
        return None
    key = (settings.host, port)
    with _lock:
        if key not in _servers:
            from wsgiref.simple_server import make_server

            from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler

            server = make_server(settings.host, port, _app, ThreadingWSGIServer, handler_class=_SilentHandler)
            threading.Thread(target=server.serve_forever, name=f"oel-metrics-{port}", daemon=True).start()
            _servers[key] = server
            log.info("metrics on http://%s:%d/metrics, readiness on /readyz (%s)", settings.host, port, service)
    return port


def stop_metrics_servers(port: int | None = None) -> None:
    """Stop the endpoint on ``port``, or every endpoint :func:`start_metrics_server` started (tests,
    orderly shutdown)."""
    with _lock:
        for key in [k for k in _servers if port is None or k[1] == port]:
            server = _servers.pop(key)
            server.shutdown()  # type: ignore[attr-defined]
            server.server_close()  # type: ignore[attr-defined]


def sample_value(name: str, labels: dict[str, str] | None = None) -> float | None:
    """The current value of one sample of :data:`REGISTRY` (tests): e.g.
    ``sample_value("oel_events_consumed_total", {"topic": "oel.trajectories"})``."""
    return REGISTRY.get_sample_value(name, labels or {})
