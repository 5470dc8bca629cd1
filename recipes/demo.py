"""``oel demo``: the whole learning loop on one machine, with the same core code the services run.

One process plays every part, in rounds:

1. **agents play** a batch of training episodes on a reference environment (house rules by default;
   FrozenLake or Sokoban selectable) with the namespace's current model version
   (:func:`oel.rollout.run_episodes`) and record them with the recorder SDK
   (:func:`reference.live_agent.record_episode`) as :class:`~oel.schemas.TrajectoryEvent` messages;
2. **the processor** assembles episodes from those events with the processor's assembler
   (:func:`oel.episodes.assemble`; invalid events are dead-lettered), stores them as
   training data and lets the model extract experience items into the KB
   (:class:`oel.knowledge.KnowledgeWriter`), publishing an :class:`~oel.schemas.ExperienceUpdate`;
3. **the learner** applies the trigger policy and runs an OPCD round with the evaluation gate
   (:class:`learner.consolidator.Consolidator`, :class:`learner.rounds.RoundRunner`); an accepted
   version is promoted, i.e. published as a :class:`~oel.schemas.ModelVersion`;
4. **the agents follow** the model-versions topic (:class:`oel.versions.VersionState`) and load
   the new adapter before their next episodes.

The services' transports are replaced by an in-process bus (:class:`oel.bus.InProcessBus`, same wire
bytes, same validation; the recorder writes to it through :class:`oel.bus.BusProducer`) and the object store by a local directory (:class:`oel.store.LocalStore`), so
nothing else needs to run. At the end the ``oel eval`` table of the namespace is printed and saved as
markdown and PNG. The same loop runs on the real services (Kafka, MinIO, the Faust processor, the
learner service): see ``tests/test_loop_stack.py``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from learner.consolidator import Consolidator
from learner.policy import TriggerPolicy
from learner.rounds import RoundRunner
from learner.versions import ModelRegistry, VersionRecord
from oel.bus import BusProducer, InProcessBus
from oel.episodes import Action, ClosedEpisode, CompletedEpisode, EpisodeBuffer, assemble, close
from oel.kb import KBState
from oel.knowledge import KnowledgeWriter, WriterConfig
from oel.model.backend import Backend
from oel.schemas import ExperienceUpdate, ModelVersion, decode
from oel.settings import Settings
from oel.store import LocalStore, ObjectStore
from oel.topics import dead_letter
from oel.versions import BASE_VERSION, VersionState
from producers.recorder import Recorder
from reference.live_agent import record_episode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs. The defaults take minutes on two CPU cores with the default model."""

    env: str = "house-rules"
    """Reference environment: ``house-rules``, ``frozenlake`` or ``sokoban``."""
    rules: tuple[str, ...] = ("greeting",)
    """House rules of the house-rules tasks. The default is the one rule the default model measurably
    follows once it knows it (held-out pass rate 28% without experience, 94% with a hand-written correct
    item in context: bench/README.md); the environment's default house has four."""
    rounds: int = 2
    """Learning rounds (play -> extract -> consolidate -> gate -> roll out)."""
    episodes: int = 16
    """Training episodes the agents play per round (fresh seeds every round)."""
    eval_episodes: int = 32
    """Held-out episodes per cell of the final table and per gate evaluation."""
    steps: int = 40
    """OPCD optimizer steps per round (the ``oel demo`` command takes ``OEL_LEARNER__STEPS``)."""
    agent_batch: int = 8
    """Episodes played side by side per generation call."""
    mode: str | None = None
    """Action mode for the games (``free``, ``short``, ``choice``); None = ``choice`` for the games
    (the one the default model can follow), ``free`` for house rules."""
    variant: str = "auto"
    """Extraction variant (``OEL_PROCESSOR__EXTRACTION_VARIANT``): ``auto`` = ``grounded`` (rule statements
    lifted from the environment's trusted feedback) for the default model, the paper's ``structured``
    prompt for a model given by ``OEL_MODEL__PATH``; or ``unstructured``."""
    extraction_tokens: int = 96
    """Longest extraction answer of the model's variants."""
    in_context: bool = False
    """Agents also put the current KB in their prompt while playing (the paper's in-context condition)."""
    namespace: str | None = None
    """Namespace of the run; None = the environment's name (which also tells the gate what to evaluate on)."""
    out_dir: Path = Path("oel-demo")
    """Everything the run writes: ``store/`` (the object store), the table (markdown, PNG) and ``demo.json``."""
    seed: int = 0

    @property
    def ns(self) -> str:
        return self.namespace or self.env

    @property
    def env_options(self) -> dict[str, Any]:
        """Constructor options of the environment."""
        return {"rules": tuple(self.rules)} if self.env == "house-rules" else {}

    @property
    def action_mode(self) -> str:
        if self.mode is not None:
            return self.mode
        return "free" if self.env == "house-rules" else "choice"


@dataclass
class RoundReport:
    """What one demo round did (one row of ``demo.json`` and of the summary the CLI prints). Rounds count
    from 1, like the generations of the versions they make (the ``oel eval`` table's rows)."""

    round: int
    played_with: str
    episodes: int
    train_pass_rate: float
    events: int
    invalid_events: int
    new_items: int
    kb_items: int
    kb_version: str | None
    version: str | None = None
    status: str | None = None
    reason: str | None = None
    training: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    stages: dict[str, float] = field(default_factory=dict)
    """Seconds per stage of the round's consolidation (:data:`learner.rounds.STAGES`), when the learner ran in this
    process; part of ``seconds["consolidate+gate"]``."""


class LearningLoop:
    """Rounds of play -> extract -> consolidate -> gate -> roll out, whatever carries the messages.

    Subclasses say how episodes are published (:meth:`publish_episode`, or all of :meth:`play`), how the processor and the
    learner get their turn (:meth:`process`, :meth:`learn`) and how agents learn of a new version
    (:meth:`follow`): :class:`DemoLoop` does all of it in this process; :class:`recipes.demo_stack.StackLoop`
    on the real services."""

    def __init__(
        self, settings: Settings, config: DemoConfig, store: ObjectStore, backend: Backend | None, progress: Callable[[str], None]
    ):
        self.config = config
        self.settings = _demo_settings(settings, config)
        self.progress = progress
        self.out_dir = Path(config.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.store = store
        if backend is None:
            from oel.model.hf_backend import HFBackend

            backend = HFBackend.from_settings(self.settings, max_batch_size=max(config.agent_batch, 4))
        self.backend = backend
        self.serving: str | None = None  # the adapter the agents act with; None = the base model
        self.round_stages: dict[str, float] = {}  # seconds per round stage of the last learn(), when known
        self.reports: list[RoundReport] = []
        self.table_paths: tuple[Path, Path] | None = None
        self.registry: ModelRegistry

    # --- what a transport provides ------------------------------------------------------------

    def publish_episode(self, episode, episode_id: str, agent_id: str, version: str) -> int:
        """Send one played episode as trajectory events; returns how many were sent."""
        raise NotImplementedError

    def process(self) -> tuple[ExperienceUpdate | None, int]:
        """The processor's turn on the new events: (the KB update it published, events it dead-lettered)."""
        raise NotImplementedError

    def learn(self, update: ExperienceUpdate | None) -> list[VersionRecord]:
        """The learner's turn: the versions its rounds made (decided: promoted or rejected)."""
        raise NotImplementedError

    def follow(self) -> None:
        """Agents learn of the version to serve (they switch between episodes)."""
        raise NotImplementedError

    # --- driving ----------------------------------------------------------------------------

    def play(self, round_no: int) -> tuple[list, int, str]:
        """Agents play this round's training episodes and publish their events; (episodes, events sent,
        the version they played with)."""
        from oel.envs import make_env, train_seeds
        from oel.rollout import AgentConfig, run_episodes

        cfg = self.config
        seeds = train_seeds(cfg.episodes, start=cfg.seed + (round_no - 1) * cfg.episodes)
        experience = self._kb_items() if cfg.in_context else None
        agent = AgentConfig(mode=cfg.action_mode, batch_size=cfg.agent_batch, seed=cfg.seed + round_no, adapter=self.serving)
        version = self.serving or BASE_VERSION
        sent = 0

        def publish(ep) -> None:
            nonlocal sent
            sent += self.publish_episode(ep, self.episode_id(round_no, ep.seed), f"demo-agent-{ep.seed % 4}", version)

        with progress_bar(len(seeds), f"round {round_no}: agents play ({version})") as bar:
            episodes = run_episodes(
                self.backend,
                lambda: make_env(cfg.env, **cfg.env_options),
                seeds,
                agent,
                experience=experience,
                on_episode=lambda ep: (publish(ep), bar.update(1)),
            )
        return episodes, sent, version

    def episode_id(self, round_no: int, seed: int) -> str:
        return f"{self.config.ns}-r{round_no}-s{seed}"

    def run_round(self, round_no: int) -> RoundReport:
        """One round: play, process, learn, follow; returns (and saves) its report."""
        t: dict[str, float] = {}
        t0 = time.monotonic()
        episodes, sent, played_with = self.play(round_no)
        t["play"] = time.monotonic() - t0
        t1 = time.monotonic()
        update, invalid = self.process()
        t["extract"] = time.monotonic() - t1
        t2 = time.monotonic()
        self.round_stages = {}
        versions = self.learn(update)
        t["consolidate+gate"] = time.monotonic() - t2
        self.follow()
        passed = sum(1 for ep in episodes if ep.passed)
        last = self.reports[-1] if self.reports else None
        report = RoundReport(
            round=round_no,
            played_with=played_with,
            episodes=len(episodes),
            train_pass_rate=passed / len(episodes) if episodes else 0.0,
            events=sent,
            invalid_events=invalid,
            new_items=len(update.new_item_ids) if update else 0,
            kb_items=update.total_items if update else (last.kb_items if last else 0),
            kb_version=update.kb_version if update else (last.kb_version if last else None),
            seconds={k: round(v, 1) for k, v in t.items()},
            stages={k: round(v, 1) for k, v in self.round_stages.items()},
        )
        if versions:
            v = versions[-1]
            report.version, report.status, report.reason = v.manifest.version, v.status.value, v.reason
            report.training = dict(v.manifest.training)
        self.reports.append(report)
        self._save()
        return report

    def run(self) -> list[RoundReport]:
        """Every round of the configuration, with a one-line summary each."""
        for r in range(1, self.config.rounds + 1):
            report = self.run_round(r)
            self.progress(
                f"round {r}: played with {report.played_with}: train pass rate {report.train_pass_rate:.0%}; "
                f"+{report.new_items} items (KB {report.kb_items}); "
                + (
                    f"version {report.version}: {report.status}" + (f" ({report.reason})" if report.reason else "")
                    if report.version
                    else "no round (no new items)"
                )
                + f"; {sum(report.seconds.values()):.0f} s"
            )
        return self.reports

    def final_table(self):
        """The ``oel eval`` table of the namespace (:func:`evaluation.table.eval_table`), saved under the
        output folder (markdown, PNG, JSON; :attr:`table_paths`); None when no round ran."""
        from evaluation.evaluator import EvalSpec, Evaluator
        from evaluation.table import eval_table

        if not self.registry.list(self.config.ns):
            self.progress("no round ran (the KB never got an item), so there is no table to show")
            return None
        self.progress("evaluating every round on the held-out seeds (no experience / in context / consolidated)")
        spec = EvalSpec.from_settings(self.settings, self.config.env)
        table = eval_table(
            self.store,
            self.backend,
            self.config.ns,
            spec,
            registry=self.registry,
            ood=True,
            evaluator=Evaluator.from_settings(self.store, self.backend, self.settings, self.registry),
            progress=lambda line: self.progress(f"  eval: {line}"),
        )
        paths = table.save(self.out_dir)
        self.table_paths = (Path(paths["markdown"]), Path(paths["png"]))
        return table

    def _kb_items(self) -> list[str] | None:
        from oel.kb import latest_snapshot

        snap = latest_snapshot(self.store, self.config.ns)
        return list(snap.items) if snap and snap.items else None

    def _save(self) -> None:
        import json

        doc = {
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self.config).items()},
            "rounds": [asdict(r) for r in self.reports],
        }
        (self.out_dir / "demo.json").write_text(json.dumps(doc, indent=2, default=str))


class DemoLoop(LearningLoop):
    """The loop in one process: an in-process bus for the topics, a local directory (default) as the store.
    ``gate`` overrides the evaluation gate the round runner builds from the settings."""

    TRAJECTORIES = "oel.trajectories"
    EXPERIENCE = "oel.experience"
    VERSIONS = "oel.model-versions"

    def __init__(
        self,
        settings: Settings,
        config: DemoConfig,
        *,
        backend: Backend | None = None,
        store: ObjectStore | None = None,
        gate: Any = None,
        progress: Callable[[str], None] = print,
    ):
        super().__init__(settings, config, store or LocalStore(Path(config.out_dir) / "store"), backend, progress)
        from oel.model.factory import token_counter

        self.bus = InProcessBus()
        self.registry = ModelRegistry(self.store, publisher=self._publish_version)
        runner_kwargs: dict[str, Any] = {
            "registry": self.registry,
            "auto_promote": True,
            "backend": self.backend,
            "on_step": self._opcd_progress,
        }
        if gate is not None:
            runner_kwargs["gate"] = gate
        self.runner = RoundRunner(self.store, self.settings, **runner_kwargs)
        self.learner = Consolidator(self.runner, TriggerPolicy(min_new_items=1, cooldown_s=0.0))
        self.versions = VersionState(config.ns)
        self.writer = KnowledgeWriter(
            self.store, self.backend, BASE_VERSION, WriterConfig.from_settings(self.settings), count_tokens=token_counter(self.backend)
        )
        self.kb_state = KBState(namespace=config.ns)
        self._opcd_bar = None
        self.buffers: dict[str, EpisodeBuffer | ClosedEpisode] = {}
        """Open episodes' buffers, and the tombstones of closed ones (as in the processor's table)."""
        self.recorder = Recorder(self.settings, topic=self.TRAJECTORIES, producer=BusProducer(self.bus))
        from producers.adapters import AdapterLoader

        self.loader = AdapterLoader(self.backend, self.store, cache_dir=self.out_dir / "adapters")

    def publish_episode(self, episode, episode_id: str, agent_id: str, version: str) -> int:
        """Record the episode with the agents' recorder SDK, whose producer is the in-process bus."""
        return record_episode(self.recorder, episode, self.config.ns, agent_id, version, episode_id=episode_id)

    def process(self) -> tuple[ExperienceUpdate | None, int]:
        """Assemble episodes from the new events with the processor's assembler (invalid ones to the DLQ
        topic), store them, extract, append."""
        completed: list[CompletedEpisode] = []
        invalid = 0
        t = self.settings.topics
        for msg in self.bus.read(self.TRAJECTORIES, "processor"):
            key = msg.key.encode() if msg.key is not None else None
            step = assemble(
                key, msg.value, self.buffers.get, time.time(), max_event_bytes=t.max_event_bytes, max_episode_bytes=t.max_episode_bytes
            )
            if step.action in (Action.dead_letter, Action.close_truncated):
                dlq, _ = dead_letter(msg.topic, 0, msg.offset, step.reason)
                self.bus.publish(dlq, msg.key, msg.value)
                invalid += 1
            if step.action is Action.keep_open:
                self.buffers[step.event.episode_id] = step.buffer
            elif step.action in (Action.close, Action.close_truncated):
                self.buffers[step.event.episode_id] = ClosedEpisode(truncated=step.action is Action.close_truncated)
                completed.append(close(step.buffer, abandoned=step.action is Action.close_truncated, reason=step.close_reason))
        if not completed:
            return None, invalid
        self.progress(f"  processor: {len(completed)} episodes -> extraction ({self.writer.config.extraction.variant.value})")
        self.kb_state, result = self.writer.process_batch(self.kb_state, completed)
        if result.update is not None:
            self.bus.publish(self.EXPERIENCE, self.config.ns, result.update.to_bytes())
        self.progress(
            f"  processor: {len(result.new_items)} new items ({result.deduplicated} duplicates, "
            f"{result.rejected} rejected); KB {self.kb_state.version} has {len(self.kb_state.all_ids)} items"
        )
        return result.update, invalid

    def learn(self, update: ExperienceUpdate | None) -> list[VersionRecord]:
        """Read the experience updates and run every round that is due."""
        for msg in self.bus.read(self.EXPERIENCE, "learner"):
            self.learner.observe(decode(msg.value, ExperienceUpdate))
        outcomes = []
        for trigger in self.learner.due():
            self.progress(
                f"  learner: round {trigger.round_id[:8]} on KB {trigger.kb_version} ({trigger.new_items} new items): "
                f"knowledge gate, then up to {self.config.steps} OPCD steps and the evaluation gate"
            )
            outcome = self.learner.run_round(trigger)
            if self._opcd_bar is not None:  # a round that stopped early at its agreement target
                self._opcd_bar.close()
                self._opcd_bar = None
            if outcome is not None:
                outcomes.append(outcome.record)
                for stage, seconds in outcome.stages.items():
                    self.round_stages[stage] = self.round_stages.get(stage, 0.0) + seconds
                checks = outcome.record.manifest.training.get("checks") or []
                if checks:
                    kept = outcome.record.manifest.training.get("kept_step")
                    shown = ", ".join(f"{c['step']}: {c['agreement']:.2f}" for c in checks)
                    self.progress(f"  OPCD: agreement with the teacher by step ({shown}); kept the weights of step {kept}")
        return outcomes

    def _opcd_progress(self, m) -> None:
        """A progress bar over the round's OPCD steps, with the loss."""
        if self._opcd_bar is None or m.step == 1:
            if self._opcd_bar is not None:
                self._opcd_bar.close()
            from tqdm import tqdm

            self._opcd_bar = tqdm(total=self.config.steps, desc="  OPCD", unit="step", leave=True)
        self._opcd_bar.set_postfix(loss=f"{m.loss:.3f}", refresh=False)
        self._opcd_bar.update(1)
        if m.step >= self.config.steps:
            self._opcd_bar.close()
            self._opcd_bar = None

    def follow(self) -> None:
        for msg in self.bus.read(self.VERSIONS, "agents"):
            self.versions.apply(decode(msg.value, ModelVersion))
        self.serve(self.versions.current)

    def serve(self, version: ModelVersion | None) -> None:
        """Act with ``version`` (None = the base model) from now on: its adapter is fetched from the store
        and loaded (:class:`producers.adapters.AdapterLoader`, as agents do), the old one unloaded."""
        name = version.version if version is not None else None
        if name == self.serving:
            return
        if version is not None and not self.loader.load(version):
            raise RuntimeError(f"could not load the adapter of {name} (see the log); still serving {self.serving or BASE_VERSION}")
        old, self.serving = self.serving, name
        if old is not None and old in self.backend.list_adapters():
            self.backend.unload_adapter(old)  # nothing is in flight between rounds
        self.progress(f"  agents: now serving {name or BASE_VERSION} (was {old or BASE_VERSION})")

    def _publish_version(self, event: ModelVersion) -> None:
        self.bus.publish(self.VERSIONS, event.namespace, event.to_bytes())


def _demo_settings(settings: Settings, config: DemoConfig) -> Settings:
    """The settings with the demo's round size; everything else (model, LR, gate tolerances) as configured."""
    learner = settings.learner.model_copy(
        update={
            "steps": config.steps,
            "min_new_items": 1,
            "cooldown_s": 0.0,
            "auto_promote": True,
            "eval_env": config.env,
            "eval_episodes": config.eval_episodes,
            "eval_rules": ",".join(config.rules) if config.env == "house-rules" else None,
        }
    )
    processor = settings.processor.model_copy(update={"extraction_variant": config.variant, "max_new_tokens": config.extraction_tokens})
    return settings.model_copy(update={"learner": learner, "processor": processor})


class progress_bar:
    """A tqdm progress bar (to stderr), closed on exit."""

    def __init__(self, total: int, desc: str):
        from tqdm import tqdm

        self.progress_bar = tqdm(total=total, desc=desc, unit="ep", leave=True)

    def __enter__(self):
        return self.progress_bar

    def __exit__(self, *exc) -> None:
        self.progress_bar.close()
