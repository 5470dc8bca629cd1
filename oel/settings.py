"""Configuration of every OEL service, as one typed object.

Sources, highest priority first:

1. keyword arguments (tests, embedding code);
2. environment variables ``OEL_<SECTION>__<FIELD>`` (for example ``OEL_KAFKA__BOOTSTRAP_SERVERS``);
3. a TOML config file named by ``OEL_CONFIG_FILE`` (sections ``[kafka]``, ``[s3]``, ...);
4. ``<state dir>/stack.env``, written by ``oel stack up`` with the local stack's endpoints and the
   credentials it generated, so a developer machine needs no configuration at all;
5. the defaults below.

A bad value stops start-up with :class:`SettingsError`, whose message names the environment
variable and says what was expected.
"""

from __future__ import annotations

import os
import re
from enum import Enum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from oel.logs import client_logger

ENV_PREFIX = "OEL_"
ENV_DELIMITER = "__"


class FromSettings(Enum):
    """The default of an argument that is built from the settings unless given (None often means "none")."""

    FROM_SETTINGS = "from settings"


FROM_SETTINGS = FromSettings.FROM_SETTINGS

KB_TOKEN_BUDGET = 2048
"""Default token budget of a KB snapshot and of the teacher's experience block; beyond it the oldest
items are dropped (the paper: 8192, and 2048 for small models)."""

TRUSTED_FEEDBACK = "house-rules*,frozenlake*,sokoban*"
"""Namespaces whose environment feedback is trusted by default: the reference environments', whose feedback
is written by the project's own graders."""

_HOST_PORT = re.compile(r"^[A-Za-z0-9._\-\[\]:]+:\d{1,5}$")


def default_state_dir() -> Path:
    """Where the local stack keeps data, logs and pid files (outside any checkout)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "oel"


def default_cache_dir() -> Path:
    """Where downloaded jars, built binaries and the converted default model are cached."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "oel"


def http_url(value: str) -> str:
    """An http(s):// base URL without its trailing '/' (the URL settings' one check)."""
    if not re.match(r"^https?://[^/\s]+", value):
        raise ValueError(f"expected an http(s):// URL, got {value!r}")
    return value.rstrip("/")


class Section(BaseModel):
    """A settings section; unknown keys are errors, so a typo never passes silently."""

    model_config = ConfigDict(extra="forbid")


def default_of(section: type[BaseModel], name: str) -> Any:
    """The default of setting ``name`` in ``section``: what a config built without settings falls back to,
    so that each default is declared once (in the settings)."""
    return section.model_fields[name].get_default(call_default_factory=True)


class PathSettings(Section):
    """Local directories."""

    state_dir: Path = Field(default_factory=default_state_dir, description="Local stack data, logs, pid files.")
    cache_dir: Path = Field(default_factory=default_cache_dir, description="Caches: Kafka jars, MinIO binary, models.")


class KafkaSettings(Section):
    """How to reach the Kafka cluster; passed to confluent-kafka/aiokafka as-is."""

    bootstrap_servers: str = Field("127.0.0.1:9092", description="Comma-separated host:port list.")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Kafka security protocol."
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, description="SASL mechanism (SASL_* protocols)."
    )
    sasl_username: str | None = Field(None, description="SASL user name.")
    sasl_password: SecretStr | None = Field(None, description="SASL password (secret).")
    ssl_ca_location: Path | None = Field(None, description="CA bundle for SSL/SASL_SSL.")
    client_id: str = Field("oel", description="Client id reported to the brokers.")

    @field_validator("bootstrap_servers")
    @classmethod
    def _host_ports(cls, value: str) -> str:
        parts = [p.strip() for p in value.split(",") if p.strip()]
        bad = [p for p in parts if not _HOST_PORT.match(p)]
        if not parts or bad:
            raise ValueError(f"expected a comma-separated list of host:port, got {value!r}")
        return ",".join(parts)

    @model_validator(mode="after")
    def _sasl_complete(self) -> KafkaSettings:
        if self.security_protocol.startswith("SASL"):
            missing = [n for n in ("sasl_mechanism", "sasl_username", "sasl_password") if getattr(self, n) is None]
            if missing:
                raise ValueError(
                    f"security_protocol={self.security_protocol} also needs " + ", ".join(_env_name("kafka", m) for m in missing)
                )
        return self

    def client_config(self) -> dict[str, Any]:
        """The librdkafka-style configuration shared by every producer, consumer and admin client."""
        conf = {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": self.security_protocol,
            "client.id": self.client_id,
            "logger": client_logger("oel.kafka"),  # a broker that is down: one line per 30 s, not several a second
        }
        if self.sasl_mechanism:
            conf["sasl.mechanism"] = self.sasl_mechanism
        if self.sasl_username:
            conf["sasl.username"] = self.sasl_username
        if self.sasl_password:
            conf["sasl.password"] = self.sasl_password.get_secret_value()
        if self.ssl_ca_location:
            conf["ssl.ca.location"] = str(self.ssl_ca_location)
        return conf


class TopicSettings(Section):
    """Topic names and sizing. Every input topic also gets ``<name>.dlq`` for events that fail validation."""

    trajectories: str = Field("oel.trajectories", description="Agents' trajectory events (key = episode id).")
    experience: str = Field("oel.experience", description="Knowledge-base updates (key = namespace).")
    model_versions: str = Field("oel.model-versions", description="Current model version per namespace (compacted).")
    episodes: str = Field("oel.episodes", description="Completed episodes and batch flushes, key = namespace (processor-internal).")
    episodes_partitions: int = Field(3, ge=1, le=10_000, description="Partitions of the episodes topic.")
    trajectories_partitions: int = Field(6, ge=1, le=10_000, description="Upper bound on processor workers.")
    experience_partitions: int = Field(3, ge=1, le=10_000, description="Upper bound on learner instances.")
    model_versions_partitions: int = Field(1, ge=1, le=10_000, description="Partitions of the model-versions topic.")
    replication_factor: int = Field(1, ge=1, le=32, description="3 in production.")
    trajectories_retention_ms: int = Field(7 * 24 * 3600 * 1000, ge=-1, description="-1 keeps forever.")
    experience_retention_ms: int = Field(30 * 24 * 3600 * 1000, ge=-1, description="Retention of KB updates.")
    dlq_retention_ms: int = Field(14 * 24 * 3600 * 1000, ge=-1, description="Retention of dead-letter topics.")
    max_event_bytes: int = Field(1_048_576, ge=1024, description="Larger events are dead-lettered.")
    max_episode_bytes: int = Field(
        8_388_608,
        ge=1024,
        description="An episode's events together; the event that would take an episode past it is dead-lettered "
        "and the episode is closed (abandoned) with the events before it.",
    )

    @model_validator(mode="after")
    def _episode_holds_an_event(self) -> TopicSettings:
        if self.max_episode_bytes < self.max_event_bytes:
            raise ValueError(f"max_episode_bytes ({self.max_episode_bytes}) must be at least max_event_bytes ({self.max_event_bytes})")
        return self

    @field_validator("trajectories", "experience", "model_versions", "episodes")
    @classmethod
    def _topic_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9._\-]{1,200}", value):
            raise ValueError(f"expected a Kafka topic name (letters, digits, '.', '_', '-'), got {value!r}")
        return value


class S3Settings(Section):
    """The object store that holds the knowledge base, training data and adapters."""

    endpoint: str = Field("127.0.0.1:9000", description="host:port, no scheme.")
    secure: bool = Field(False, description="Use HTTPS.")
    access_key: str | None = Field(None, description="Access key (the local stack generates one).")
    secret_key: SecretStr | None = Field(None, description="Secret key (secret).")
    region: str | None = Field(None, description="Region, if the server needs one.")
    bucket: str = Field("oel", description="Bucket for KBs, trajectories, adapters and manifests.")
    attempts: int = Field(5, ge=1, le=100, description="Tries per operation before the store counts as down.")
    backoff_s: float = Field(0.2, gt=0, le=60, description="First retry delay; doubles each try.")
    timeout_s: float = Field(10.0, gt=0, le=600, description="Read timeout of one request.")

    @field_validator("endpoint")
    @classmethod
    def _no_scheme(cls, value: str) -> str:
        if "://" in value or not _HOST_PORT.match(value):
            raise ValueError(f"expected host:port without a scheme (set secure=true for HTTPS), got {value!r}")
        return value

    @field_validator("bucket")
    @classmethod
    def _bucket_name(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", value):
            raise ValueError(f"expected an S3 bucket name (3-63 lowercase letters, digits, '.', '-'), got {value!r}")
        return value


class ModelSettings(Section):
    """Which model serves the agents and is trained by the learner."""

    path: Path | None = Field(None, description="A local Hugging Face model folder; unset = the bundled SmolLM2-135M-Instruct.")
    backend: Literal["transformers", "vllm"] = Field("transformers", description="In-process transformers+peft, or a vLLM server.")
    vllm_url: str = Field("http://127.0.0.1:8000", description="Base URL of the vLLM OpenAI-compatible server.")
    dtype: Literal["auto", "bfloat16", "float32", "float16"] = Field(
        "auto",
        description="Weights dtype of the in-process backend and the learner's frozen base; auto = bfloat16 on a GPU or a CPU with native bf16, else float32.",
    )
    adapters: Literal["load", "served"] = Field(
        "load",
        description="How agents get a version's adapter: load = download it and load it into their backend (in-process, "
        "or a vLLM server of their own); served = the vLLM servers load it themselves (oel adapters sync, Kubernetes): "
        "agents only switch once their server lists it.",
    )
    merge_adapters: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Whether the in-process backend runs a version's adapter merged into a copy of the weights (the base "
        "model's speed, one more copy of the weights in memory) or as separate LoRA matmuls (peft); auto = merged for "
        "float32 weights, unmerged for bfloat16/float16, where merging would round small LoRA deltas away.",
    )
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$",
        description="Where the in-process backend, the learner's student and teacher and the gates' model run: auto (cuda "
        "when torch sees a GPU, else cpu), cpu, cuda or cuda:N. A GPU that is not there stops start-up.",
    )

    _url = field_validator("vllm_url")(lambda value: http_url(value))

    @field_validator("path")
    @classmethod
    def _exists(cls, value: Path | None) -> Path | None:
        if value is not None and not (value / "config.json").is_file():
            raise ValueError(f"expected a Hugging Face model folder containing config.json, got {str(value)!r}")
        return value


class GroupMembership(Section):
    """How a service's Kafka consumer group notices a dead member (shared by the processor and the learner)."""

    session_timeout_s: float = Field(
        10.0,
        ge=6,
        le=300,
        description="A member that sends no heartbeat for this long is out of the group and its partitions move "
        "(Kafka's group.min.session.timeout.ms is 6 s by default).",
    )
    instance_id: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9._-]{1,200}$",
        description="Static group membership: a restarted member with the same id takes its partitions back at once, "
        "without a rebalance. Give each replica its own stable id (a StatefulSet pod name); unset = dynamic membership.",
    )


class ProcessorSettings(GroupMembership):
    """Episode assembly and extraction in the Faust processor."""

    app_id: str = Field("oel-processor", description="Faust app id: the consumer group and the prefix of its internal topics.")
    abandon_after_s: float = Field(300.0, gt=0, description="An episode with no event for this long is closed as abandoned.")
    batch_size: int = Field(8, ge=1, le=1024, description="Episodes of one namespace extracted together.")
    batch_window_s: float = Field(30.0, gt=0, description="A partial batch is extracted after waiting this long.")
    extraction_variant: Literal["auto", "grounded", "structured", "unstructured"] = Field(
        "auto",
        description="Extraction variant: grounded (rule statements from trusted feedback, no model call), structured or "
        "unstructured (the paper's prompts); auto = grounded for the bundled default model, structured for OEL_MODEL__PATH.",
    )
    trusted_feedback: str = Field(
        TRUSTED_FEEDBACK,
        description="Namespaces (comma-separated glob patterns) whose environment feedback is trusted; user and agent text never are. Empty = none.",
    )
    grounded_min_episodes: int = Field(
        2, ge=1, le=1024, description="Grounded variant: a statement must recur in this many episodes of a batch."
    )
    backend: Literal["auto", "transformers", "vllm"] = Field(
        "auto",
        description="Which model backend extracts (model-written variants): auto = the vLLM server when one is configured "
        "(OEL_MODEL__BACKEND=vllm or OEL_MODEL__VLLM_URL set) and answers at start-up, else in-process; vllm = the server "
        "or a start-up error; transformers = in-process.",
    )
    include_previous: bool = Field(True, description="Show the current KB in the extraction prompt.")
    max_new_tokens: int = Field(256, ge=8, le=8192, description="Longest extraction answer.")
    temperature: float = Field(0.7, ge=0, le=5, description="Extraction sampling temperature (seeded per batch).")
    token_budget: int = Field(KB_TOKEN_BUDGET, ge=16, description="KB snapshot budget in tokens; oldest items are dropped beyond it.")


class LearnerSettings(GroupMembership):
    """When a consolidation round starts and how it trains (OPCD)."""

    min_new_items: int = Field(
        1,
        ge=1,
        description="New KB items since the last round that trigger a round (the grounded variant adds few, exact items; raise it for the paper's variants).",
    )
    cooldown_s: float = Field(600.0, ge=0, description="Minimum time between two rounds of one namespace.")
    steps: int = Field(40, ge=1, le=100_000, description="Optimizer steps per round (paper: 20-100).")
    batch_size: int = Field(8, ge=1, le=4096, description="Samples per step (task prefixes plus anchor prompts).")
    learning_rate: float = Field(
        2e-3,
        gt=0,
        lt=1,
        description="Peak AdamW LR of the LoRA adapter (measured on the default model; the paper's 1e-6 is for full fine-tuning).",
    )
    prefix_turns: Literal["all", "first"] = Field(
        "first",
        description="Which training prefixes the student answers: each episode's first turn (measured better on the default model, bench/README) or every turn-prefix (all, the paper's).",
    )
    forward_kl_weight: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Share of forward KL mixed into the OPCD loss at the student's sampled tokens (0 = the paper's reverse KL; 0.5 measured on the default model, bench/README).",
    )
    lr_schedule: Literal["constant", "cosine"] = Field(
        "cosine", description="Learning-rate schedule: cosine down to 0 at the last step, or constant (the paper's)."
    )
    warmup_steps: int = Field(5, ge=0, le=100_000, description="Steps over which the learning rate rises linearly to its value first.")
    temperature: float = Field(0.7, gt=0, le=5, description="Sampling temperature; logits are divided by it in the loss.")
    top_k: int = Field(256, ge=1, description="Reverse KL over the student's top-k tokens.")
    max_new_tokens: int = Field(
        8,
        ge=1,
        le=32_768,
        description="Longest sampled response (short: the start of an answer carries what house rules teach; raise it for reasoning tasks).",
    )
    prompt_gradient: bool = Field(
        True,
        description="Backpropagate through the whole prompt; false = the prompt's keys and values are taken from sampling, without gradient (faster, approximate).",
    )
    check_every: int = Field(
        5,
        ge=0,
        le=100_000,
        description="Every this many OPCD steps, compare the student's greedy answers (no KB) with the teacher's (KB in context) and keep the best weights; 0 = no checks, keep the last step's.",
    )
    stop_agreement: float | None = Field(
        0.9, gt=0, le=1, description="Stop a round early once a check's agreement reaches this (0..1); unset = run every step."
    )
    experience_token_budget: int = Field(KB_TOKEN_BUDGET, ge=16, description="Experience beyond this is cut, oldest items first.")
    lora_rank: int = Field(16, ge=1, le=1024, description="LoRA rank of the student adapter.")
    experience_sets: int = Field(
        1,
        ge=1,
        le=100,
        description="Newest KB snapshots the teacher draws experience from, one per sample (the paper's K runs); 1 = the whole current KB.",
    )
    auto_promote: bool = Field(
        False,
        description="Promote a round's version at once if it passes the evaluation gate; false = a candidate for `oel models promote`.",
    )
    gate_enabled: bool = Field(
        True, description="Run the evaluation gate (held-out pass rate, OOD instruction following) before a version can be rolled out."
    )
    gate_pass_rate_tolerance: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Gate: largest allowed drop of the held-out pass rate (no experience) below the parent version's (0..1).",
    )
    gate_ood_tolerance: float = Field(
        0.15,
        ge=0,
        le=1,
        description="Gate: largest allowed drop of the OOD instruction-following score below the base model's (0..1; 0.15 = 3 of the 20 prompts).",
    )
    knowledge_gate_enabled: bool = Field(
        True,
        description="Before a round, check the KB in context (held-out pass rate and OOD score on the base model) and skip the round if it does not help.",
    )
    knowledge_gate_margin: float = Field(
        0.1,
        ge=-1,
        le=1,
        description="Knowledge gate: smallest held-out pass-rate gain (0..1) the KB must bring in context to be consolidated.",
    )
    anchor_fraction: float = Field(
        0.5,
        ge=0,
        lt=1,
        description="Share of each OPCD batch drawn from general prompts whose teacher sees no experience (keeps the adapter close to the base model elsewhere; 0.5 measured on the default model, bench/README).",
    )
    eval_env: str | None = Field(
        None,
        description="Reference environment for held-out evaluation (frozenlake, sokoban, house-rules, or none); unset = the namespace's own name if it names one.",
    )
    eval_rules: str | None = Field(
        None,
        description="House rules of house-rules evaluations, comma-separated (e.g. greeting,order-number); unset = the environment's default house.",
    )
    eval_episodes: int = Field(
        16, ge=1, le=100_000, description="Held-out episodes per evaluation (gate and `oel eval`; the paper uses 128)."
    )
    eval_mode: Literal["auto", "free", "short", "choice"] = Field(
        "auto", description="Agents' action mode in evaluations; auto = choice for the grid games, free for house rules."
    )
    eval_max_new_tokens: int | None = Field(
        None, ge=1, le=32_768, description="Answer budget per turn in evaluations; unset = the action mode's default."
    )
    ood_max_new_tokens: int = Field(64, ge=8, le=4096, description="Answer budget per prompt of the OOD instruction-following check.")
    group_id: str = Field("oel-learner", min_length=1, description="Kafka consumer group of the learner service.")

    @field_validator("eval_rules")
    @classmethod
    def _eval_rules(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from oel.envs.house_rules import RULE_NAMES

        rules = [r.strip() for r in value.split(",") if r.strip()]
        unknown = [r for r in rules if r not in RULE_NAMES]
        if not rules or unknown:
            raise ValueError(f"expected comma-separated house rules out of {', '.join(RULE_NAMES)}, got {value!r}")
        return ",".join(rules)

    @field_validator("eval_env")
    @classmethod
    def _eval_env(cls, value: str | None) -> str | None:
        known = ("frozenlake", "sokoban", "house-rules", "none")
        if value is not None and value not in known:
            raise ValueError(f"expected one of {', '.join(known)}, got {value!r}")
        return value


class MetricsSettings(Section):
    """Where services expose Prometheus metrics."""

    host: str = Field("127.0.0.1", description="Address of the /metrics endpoint.")
    port: int | None = Field(
        None, ge=0, le=65535, description="Unset = the service's default (processor 9101, learner 9102, agents 9103); 0 = off."
    )
    docs_url: str = Field(
        "https://oel.example.com/docs",
        description="Where docs/ is published; every alert's runbook_url is <docs_url>/operations.md#<alert> "
        "(set it, then python k8s/generate.py --write).",
    )

    _docs_url = field_validator("docs_url")(lambda value: http_url(value))

    def for_service(self, default_port: int) -> MetricsSettings:
        """These settings with the port resolved to the service's default when unset."""
        return self.model_copy(update={"port": default_port if self.port is None else self.port})


class RecorderSettings(Section):
    """The agents' trajectory recorder (producers.Recorder): batching, the bounded buffer, delivery."""

    compression: Literal["lz4", "zstd", "gzip", "snappy", "none"] = Field(
        "lz4", description="Batch compression; lz4 costs agents the least CPU."
    )
    linger_ms: float = Field(20.0, ge=0, le=10_000, description="How long a batch waits to fill; more = bigger batches, later delivery.")
    batch_max_kbytes: int = Field(1024, ge=1, le=1_048_576, description="Largest batch per partition, in KB.")
    buffer_max_events: int = Field(20_000, ge=1, le=10_000_000, description="Events buffered before back-pressure starts.")
    buffer_max_kbytes: int = Field(65_536, ge=1, le=2_097_151, description="KB buffered before back-pressure starts (bounds memory).")
    when_full: Literal["block", "raise"] = Field(
        "block", description="With a full buffer: block up to block_timeout_s, or raise BufferFull at once."
    )
    block_timeout_s: float = Field(10.0, ge=0, le=3600, description="Longest a send blocks on a full buffer before raising BufferFull.")
    delivery_timeout_s: float = Field(120.0, gt=0, le=86_400, description="An event not acknowledged within this long counts as failed.")
    close_timeout_s: float = Field(30.0, ge=0, le=3600, description="Longest close() flushes; what is left is reported as lost.")


class GatewaySettings(Section):
    """The recording gateway (`oel gateway`): an OpenAI-compatible front of the model server that records
    every call as a step of an episode."""

    host: str = Field("127.0.0.1", description="Address the gateway listens on (0.0.0.0 in a container).")
    port: int = Field(8090, ge=1, le=65535, description="Port of the OpenAI-compatible API (and /metrics, /healthz).")
    upstream_url: str | None = Field(
        None, description="Base URL of the OpenAI-compatible server answered from; unset = OEL_MODEL__VLLM_URL."
    )
    upstream_timeout_s: float = Field(600.0, gt=0, le=86_400, description="Longest wait for the upstream server's next bytes.")
    idle_end_s: float = Field(
        300.0,
        gt=0,
        le=86_400,
        description="An episode with no call, feedback or end for this long is ended by the gateway (outcome says so; success unknown).",
    )
    default_agent_id: str = Field(
        "gateway",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@+=-]{0,127}$",
        description="Agent id of calls that name none (no X-OEL-Agent-Id header, metadata or user field).",
    )
    max_request_bytes: int = Field(4_194_304, ge=1024, le=1_073_741_824, description="Largest request body accepted.")


class Settings(BaseSettings):
    """Everything a service needs to know, read once at start-up."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_DELIMITER,
        extra="forbid",
        validate_default=True,
    )

    paths: PathSettings = Field(default_factory=PathSettings)
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    topics: TopicSettings = Field(default_factory=TopicSettings)
    s3: S3Settings = Field(default_factory=S3Settings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    processor: ProcessorSettings = Field(default_factory=ProcessorSettings)
    learner: LearnerSettings = Field(default_factory=LearnerSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    recorder: RecorderSettings = Field(default_factory=RecorderSettings)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get(f"{ENV_PREFIX}CONFIG_FILE")
        if config_file:
            if not Path(config_file).is_file():
                raise SettingsError(f"{ENV_PREFIX}CONFIG_FILE: expected an existing TOML file, got {config_file!r}")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        stack_env = stack_env_file()
        if stack_env.is_file():
            sources.append(
                type(dotenv_settings)(settings_cls, env_file=stack_env, env_prefix=ENV_PREFIX, env_nested_delimiter=ENV_DELIMITER)
            )
        return tuple(sources)


class SettingsError(ValueError):
    """A configuration value is missing or invalid; the message names the setting."""


def stack_env_file() -> Path:
    """The file in which ``oel stack up`` records the local stack's endpoints and credentials."""
    state = os.environ.get(f"{ENV_PREFIX}PATHS{ENV_DELIMITER}STATE_DIR")
    return (Path(state) if state else default_state_dir()) / "stack.env"


def _env_name(*loc: Any) -> str:
    return ENV_PREFIX + ENV_DELIMITER.join(str(part).upper() for part in loc)


def load_settings(**overrides: Any) -> Settings:
    """Read the settings, turning validation errors into one readable :class:`SettingsError`."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = [p for p in err["loc"] if not isinstance(p, int)]
            name = _env_name(*loc) if loc else "OEL settings"
            got = err.get("input")
            shown = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
            lines.append(f"{name}: {err['msg']}{shown}")
        raise SettingsError("invalid configuration:\n  " + "\n  ".join(lines)) from None


def settings_reference() -> list[tuple[str, str, str]]:
    """Every setting as (environment variable, default, description), for the README and ``oel config docs``."""
    rows: list[tuple[str, str, str]] = []
    for section, field in Settings.model_fields.items():
        model = field.annotation
        assert isinstance(model, type) and issubclass(model, BaseModel)
        for name, sub in model.model_fields.items():
            if sub.default_factory is not None:
                default = "(derived)"
            elif sub.default is None:
                default = "(unset)"
            else:
                default = str(sub.default)
            rows.append((_env_name(section, name), default, sub.description or ""))
    return rows
