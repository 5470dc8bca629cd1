"""Held-out evaluation of a policy (base model or a model version) on a reference environment.

:func:`evaluate_policy` plays the environment's fixed held-out seeds (:func:`oel.envs.eval_seeds`,
never trained on) with the reference agents (:func:`oel.rollout.run_episodes`), one greedy
rollout per seed, and reports the pass rate, the mean response tokens per turn and the valid-action
rate. Without experience it measures what the weights know (the gate's condition and the paper's
"none" / "consolidated" columns); with experience (a KB snapshot's items) it measures the same
weights with the knowledge in context (the paper's "in context" column).

:class:`EvalSpec` says how: which environment, how many held-out episodes, the action mode, the
answer budget. Defaults are small enough for a CPU: 16 episodes, greedy decoding, the action mode the
default model can follow (``choice`` for the grid games, ``free`` text for house rules).

:class:`EvalCache` keeps results in the object store under ``evals/``, keyed by what determines them
(the spec and the experience, the model: base model hash or version name plus adapter digest), so the
base model's and a parent version's scores are measured once, not once per round. Decoding is greedy,
so a repeated measurement would give the same numbers (up to bf16 batch effects, see
:mod:`oel.model.hf_backend`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evaluation.ood import OOD_MAX_NEW_TOKENS, OOD_PROMPTS, OODPrompt, ood_score, prompts_fingerprint
from oel.envs import ENV_NAMES, eval_seeds, make_env
from oel.model.backend import Backend
from oel.rollout import ActionMode, AgentConfig, Episode, run_episodes, summarize
from oel.settings import LearnerSettings, Settings, default_of
from oel.store import ImmutableObjectConflict, ObjectNotFound, ObjectStore

if TYPE_CHECKING:  # pragma: no cover
    from learner.versions import ModelRegistry

log = logging.getLogger(__name__)

EVALS_PREFIX = "evals"


@dataclass(frozen=True)
class EvalSpec:
    """How a policy is evaluated on a reference environment.

    ``env``: ``frozenlake``, ``sokoban`` or ``house-rules``; ``env_options`` go to its constructor
    (e.g. ``{"rules": [...]}`` for house rules). ``episodes``: how many of the fixed held-out seeds
    (the paper uses 128). ``mode``: the agents' action mode; None = ``choice`` for the grid games (the
    only mode the default 135M model can follow) and ``free`` for free-text environments.
    ``max_new_tokens`` / ``max_turns``: None = the mode's and the environment's defaults.
    ``temperature`` 0 = greedy (one deterministic rollout per seed). ``batch_size``: episodes per
    generation call."""

    env: str
    episodes: int = default_of(LearnerSettings, "eval_episodes")
    mode: ActionMode | None = None
    max_new_tokens: int | None = None
    max_turns: int | None = None
    temperature: float = 0.0
    batch_size: int = 16
    env_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.env not in ENV_NAMES:
            raise ValueError(f"unknown environment {self.env!r}; known: {', '.join(ENV_NAMES)}")
        if self.episodes < 1:
            raise ValueError("episodes must be >= 1")

    @classmethod
    def from_settings(cls, settings: Settings, env: str, **overrides: Any) -> EvalSpec:
        """The spec the learner's settings describe (``learner.eval_*``) for ``env``."""
        ls = settings.learner
        values: dict[str, Any] = {
            "env": env,
            "episodes": ls.eval_episodes,
            "mode": None if ls.eval_mode == "auto" else ActionMode(ls.eval_mode),
            "max_new_tokens": ls.eval_max_new_tokens,
        }
        if env == "house-rules" and ls.eval_rules:
            values["env_options"] = {"rules": tuple(ls.eval_rules.split(","))}
        values.update(overrides)
        return cls(**values)

    def options(self) -> dict[str, Any]:
        """Constructor options of the environment (``max_turns`` included when set)."""
        opts = dict(self.env_options)
        if self.max_turns is not None:
            opts["max_turns"] = self.max_turns
        return opts

    def make_env(self):
        return make_env(self.env, **self.options())

    def resolved_mode(self) -> ActionMode:
        if self.mode is not None:
            return ActionMode(self.mode)
        return ActionMode.choice if self.make_env().discrete else ActionMode.free

    def agent_config(self, adapter: str | None = None) -> AgentConfig:
        return AgentConfig(
            mode=self.resolved_mode(),
            temperature=self.temperature,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            seed=0,
            adapter=adapter,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "env": self.env,
            "episodes": self.episodes,
            "mode": self.resolved_mode().value,
            "max_new_tokens": self.max_new_tokens,
            "max_turns": self.max_turns,
            "temperature": self.temperature,
            "env_options": {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in sorted(self.env_options.items())},
        }

    def fingerprint(self, experience: Sequence[str] | None = None) -> str:
        """16 hex characters over everything that determines a result except the model (batch size
        left out: under greedy decoding it does not change the result)."""
        payload = {**self.to_dict(), "experience": list(experience or [])}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class EvalResult:
    """What :func:`evaluate_policy` measured. Rates are 0..1; ``mean_response_tokens`` is per turn;
    ``episodes`` holds every played episode (empty for a result read back from the cache)."""

    env: str
    n_episodes: int
    passed: int
    pass_rate: float
    valid_action_rate: float
    mean_response_tokens: float
    mean_turns: float
    adapter: str | None
    with_experience: bool
    seconds: float
    episodes: list[Episode] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, Any]:
        """The numbers, without the episodes (what the cache stores and the table prints)."""
        return {
            "env": self.env,
            "n_episodes": self.n_episodes,
            "passed": self.passed,
            "pass_rate": self.pass_rate,
            "valid_action_rate": self.valid_action_rate,
            "mean_response_tokens": self.mean_response_tokens,
            "mean_turns": self.mean_turns,
            "adapter": self.adapter,
            "with_experience": self.with_experience,
            "seconds": round(self.seconds, 2),
        }

    @classmethod
    def from_summary(cls, data: Mapping[str, Any]) -> EvalResult:
        return cls(
            **{
                k: data[k]
                for k in (
                    "env",
                    "n_episodes",
                    "passed",
                    "pass_rate",
                    "valid_action_rate",
                    "mean_response_tokens",
                    "mean_turns",
                    "adapter",
                    "with_experience",
                    "seconds",
                )
            }
        )


def evaluate_policy(
    backend: Backend,
    spec: EvalSpec,
    *,
    adapter: str | None = None,
    experience: list[str] | None = None,
    on_episode: Callable[[Episode], None] | None = None,
) -> EvalResult:
    """Play ``spec.episodes`` held-out seeds with ``adapter`` (a name loaded in ``backend``; None = the
    base model), with ``experience`` in the agent prompt or none, and summarise (module docstring)."""
    t0 = time.monotonic()
    episodes = run_episodes(
        backend, spec.make_env, eval_seeds(spec.episodes), spec.agent_config(adapter), experience=experience or None, on_episode=on_episode
    )
    stats = summarize(episodes, time.monotonic() - t0)
    return EvalResult(
        env=spec.env,
        n_episodes=stats.episodes,
        passed=stats.passed,
        pass_rate=stats.pass_rate,
        valid_action_rate=stats.valid_action_rate,
        mean_response_tokens=stats.mean_response_tokens,
        mean_turns=stats.mean_turns,
        adapter=adapter,
        with_experience=bool(experience),
        seconds=stats.seconds,
        episodes=episodes,
    )


def env_for_namespace(namespace: str, settings: Settings | None = None) -> str | None:
    """The reference environment a namespace is evaluated on: ``learner.eval_env`` when set (``none``
    = no environment), else the namespace's own name when it is an environment name or starts with one
    followed by ``-`` or ``.`` (``house-rules``, ``frozenlake-qwen3``); else None (no held-out
    evaluation: the gate then runs its OOD check only)."""
    configured = settings.learner.eval_env if settings is not None else None
    if configured:
        return None if configured == "none" else configured
    for env in ENV_NAMES:
        if namespace == env or namespace.startswith((f"{env}-", f"{env}.")):
            return env
    return None


# --- model identities and the result cache ------------------------------------------------------


def base_subject(model_hash: str) -> str:
    """Cache subject of a base model, from ``oel.model.prepare.model_hash`` (``sha256:<hex>``)."""
    return "base-" + model_hash.split(":")[-1][:16]


def files_digest(adapter_files: Mapping[str, str]) -> str:
    """16 hex characters over an adapter's file names and sha256s (a manifest's ``adapter_files``)."""
    return hashlib.sha256(json.dumps(sorted(adapter_files.items())).encode()).hexdigest()[:16]


def adapter_files_of(adapter_dir: str | Path) -> dict[str, str]:
    """``{relative file name: sha256}`` of an adapter folder, as a manifest lists them."""
    root = Path(adapter_dir)
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def version_subject(namespace: str, version: str, adapter_files: Mapping[str, str]) -> str:
    """Cache subject of a model version: its name and its adapter's digest (a version re-made after a
    crash before its manifest keeps its name but may get other weights)."""
    return f"{namespace}/{version}-{files_digest(adapter_files)}"


class EvalCache:
    """Evaluation results as immutable objects ``evals/<kind>/<fingerprint>/<subject>.json``.

    ``kind`` is ``policy`` (held-out episodes) or ``ood``; ``fingerprint`` covers the spec and the
    experience (or the OOD prompt set); ``subject`` names the model (:func:`base_subject`,
    :func:`version_subject`)."""

    def __init__(self, store: ObjectStore):
        self.store = store

    @staticmethod
    def key(kind: str, fingerprint: str, subject: str) -> str:
        return f"{EVALS_PREFIX}/{kind}/{fingerprint}/{subject}.json"

    def get(self, kind: str, fingerprint: str, subject: str) -> dict[str, Any] | None:
        try:
            return self.store.get_json(self.key(kind, fingerprint, subject))
        except ObjectNotFound:
            return None

    def put(self, kind: str, fingerprint: str, subject: str, summary: Mapping[str, Any]) -> dict[str, Any]:
        """Store a result; if another writer stored one first, that one wins and is returned."""
        key = self.key(kind, fingerprint, subject)
        try:
            self.store.put_json(key, dict(summary))
        except ImmutableObjectConflict:
            return self.store.get_json(key)
        return dict(summary)

    def get_or_compute(
        self, kind: str, fingerprint: str, subject: str, compute: Callable[[], Mapping[str, Any]]
    ) -> tuple[dict[str, Any], bool]:
        """(summary, computed): the cached result, else ``compute()`` stored."""
        hit = self.get(kind, fingerprint, subject)
        if hit is not None:
            return hit, False
        return self.put(kind, fingerprint, subject, compute()), True


def ensure_adapter(backend: Backend, name: str, path: str | Path) -> bool:
    """Load ``path`` as ``name`` unless a backend already holds that name (names are immutable: the
    same name means the same weights). True if this call loaded it (the caller unloads it)."""
    if name in backend.list_adapters():
        return False
    backend.load_adapter(name, Path(path))
    return True


class Evaluator:
    """Cached evaluations of the base model and of model versions, stored or about to be.

    ``backend``: the backend that runs them, or a function that makes it on first use (so that a gate
    whose results are all cached never loads a model). A model is named by its cache *subject*; the
    ``*_of`` methods take a stored version (None = the base model) and load its adapter only when the
    result is not cached yet."""

    def __init__(
        self,
        store: ObjectStore,
        backend: Backend | Callable[[], Backend],
        registry: ModelRegistry | None = None,
        *,
        ood_prompts: Sequence[OODPrompt] = OOD_PROMPTS,
        ood_max_new_tokens: int = OOD_MAX_NEW_TOKENS,
    ):
        from learner.versions import ModelRegistry

        self.store = store
        self.registry = registry or ModelRegistry(store)
        self.cache = EvalCache(store)
        self._backend = backend
        self.ood_prompts = tuple(ood_prompts)
        self.ood_max_new_tokens = ood_max_new_tokens

    @classmethod
    def from_settings(
        cls,
        store: ObjectStore,
        backend: Backend | Callable[[], Backend],
        settings: Settings,
        registry: ModelRegistry | None = None,
        **kwargs: Any,
    ) -> Evaluator:
        """An evaluator with the OOD answer budget of ``learner.ood_max_new_tokens``."""
        return cls(store, backend, registry, ood_max_new_tokens=settings.learner.ood_max_new_tokens, **kwargs)

    @property
    def backend(self) -> Backend:
        if not isinstance(self._backend, Backend):
            self._backend = self._backend()
        return self._backend

    # --- by subject, with the adapter already loaded ---------------------------------------------

    def policy_eval(self, spec: EvalSpec, subject: str, adapter: str | None, experience: Sequence[str] | None = None) -> dict[str, Any]:
        """Held-out result (:meth:`EvalResult.summary`) of ``adapter`` (loaded; None = base), cached as ``subject``."""
        experience = list(experience or []) or None
        summary, computed = self.cache.get_or_compute(
            "policy",
            spec.fingerprint(experience),
            subject,
            lambda: evaluate_policy(self.backend, spec, adapter=adapter, experience=experience).summary(),
        )
        log.info(
            "eval %s on %s%s: pass rate %.3f (%s)",
            subject,
            spec.env,
            " with experience" if experience else "",
            summary["pass_rate"],
            "measured" if computed else "cached",
        )
        return summary

    def ood_eval(self, subject: str, adapter: str | None, experience: Sequence[str] | None = None) -> dict[str, Any]:
        """OOD result (:meth:`evaluation.ood.OODResult.to_dict`) of ``adapter`` (loaded; None = base), with
        ``experience`` in context if given, cached as ``subject``."""
        experience = list(experience or []) or None
        fp = prompts_fingerprint(self.ood_prompts, self.ood_max_new_tokens, experience)
        summary, computed = self.cache.get_or_compute(
            "ood",
            fp,
            subject,
            lambda: ood_score(
                self.backend, adapter, prompts=self.ood_prompts, max_new_tokens=self.ood_max_new_tokens, experience=experience
            ).to_dict(),
        )
        log.info(
            "OOD %s%s: %.3f (%s)", subject, " with experience" if experience else "", summary["score"], "measured" if computed else "cached"
        )
        return summary

    def cached_policy(self, spec: EvalSpec, subject: str, experience: Sequence[str] | None = None) -> dict[str, Any] | None:
        """The cached held-out result of ``subject``, or None."""
        return self.cache.get("policy", spec.fingerprint(list(experience or []) or None), subject)

    def cached_ood(self, subject: str) -> dict[str, Any] | None:
        """The cached OOD result of ``subject``, or None."""
        return self.cache.get("ood", prompts_fingerprint(self.ood_prompts, self.ood_max_new_tokens), subject)

    def with_adapter(self, name: str, adapter_dir: str | Path, fn: Callable[[], Any]) -> Any:
        """``fn()`` with the adapter folder loaded as ``name`` (unloaded after, if loaded here)."""
        loaded = ensure_adapter(self.backend, name, adapter_dir)
        try:
            return fn()
        finally:
            if loaded:
                self.backend.unload_adapter(name)

    # --- by stored version ----------------------------------------------------------------------

    def subject_of(self, namespace: str, version: str | None, model_hash: str) -> str:
        if version is None:
            return base_subject(model_hash)
        return version_subject(namespace, version, self.registry.manifest(namespace, version).adapter_files)

    def _stored(
        self,
        namespace: str,
        version: str | None,
        model_hash: str,
        kind: str,
        fingerprint: str,
        measure: Callable[[str, str | None], dict[str, Any]],
    ) -> dict[str, Any]:
        subject = self.subject_of(namespace, version, model_hash)
        hit = self.cache.get(kind, fingerprint, subject)
        if hit is not None:
            return hit
        if version is None:
            return measure(subject, None)
        record = self.registry.get(namespace, version)
        name = "eval-" + subject.replace("/", "-")
        with tempfile.TemporaryDirectory(prefix="oel-eval-") as tmp:
            path = self.registry.download_adapter(record, tmp)
            return self.with_adapter(name, path, lambda: measure(subject, name))

    def policy_of(
        self, spec: EvalSpec, namespace: str, version: str | None, model_hash: str, experience: Sequence[str] | None = None
    ) -> dict[str, Any]:
        """Held-out result of a stored version (None = the base model with hash ``model_hash``)."""
        experience = list(experience or []) or None
        return self._stored(
            namespace,
            version,
            model_hash,
            "policy",
            spec.fingerprint(experience),
            lambda subject, name: self.policy_eval(spec, subject, name, experience),
        )

    def ood_of(self, namespace: str, version: str | None, model_hash: str, experience: Sequence[str] | None = None) -> dict[str, Any]:
        """OOD result of a stored version (None = the base model with hash ``model_hash``), with
        ``experience`` in context if given."""
        experience = list(experience or []) or None
        fp = prompts_fingerprint(self.ood_prompts, self.ood_max_new_tokens, experience)
        return self._stored(namespace, version, model_hash, "ood", fp, lambda subject, name: self.ood_eval(subject, name, experience))
