"""From completed episodes to knowledge: the work the processor does per namespace, free of any transport.

:class:`KnowledgeWriter` takes a batch of completed episodes of one namespace, asks the model for
experience items (one conversation per episode, all in one batched generation call), and appends the
items to the namespace's KB. It is idempotent under replay: what the model answered for an episode
is stored under ``extractions/<namespace>/<episode id>.json`` and reused, episodes already applied are
skipped, and every object is written under a deterministic key. The Faust processor and the one-machine
demo both drive it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from oel import kb
from oel.episodes import CompletedEpisode
from oel.extraction import ExtractionConfig, PromptVariant, build_prompt, item_id
from oel.grounded import DEFAULT_TRUSTED_FEEDBACK, GroundedConfig, answer_items, grounded_items, trusted_sources
from oel.model.backend import Backend, BackendError, SamplingParams
from oel.schemas import ExperienceUpdate
from oel.settings import KB_TOKEN_BUDGET, ProcessorSettings, Settings, default_of
from oel.store import ObjectStore, StoreError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WriterConfig:
    """How extraction is run and how big the KB may grow."""

    extraction: ExtractionConfig = field(default_factory=ExtractionConfig)
    max_new_tokens: int = default_of(ProcessorSettings, "max_new_tokens")
    temperature: float = default_of(ProcessorSettings, "temperature")
    token_budget: int = KB_TOKEN_BUDGET
    """Experience beyond this many tokens is dropped, oldest first."""
    trusted_feedback: str = DEFAULT_TRUSTED_FEEDBACK
    """Namespaces (comma-separated globs) whose environment feedback is trusted (:func:`oel.grounded.trusted_sources`)."""
    grounded: GroundedConfig = field(default_factory=GroundedConfig)
    attempts: int = 5
    """Tries for a model or store failure before the batch fails (it is then retried by the caller, never dropped)."""
    backoff_s: float = 0.5

    @classmethod
    def from_settings(cls, settings: Settings) -> WriterConfig:
        """The configuration the settings describe (``processor``: variant, previous experience, length,
        budget, trust; ``model``: which model, for the ``auto`` variant)."""
        processor = settings.processor
        return cls(
            extraction=ExtractionConfig(variant=resolve_variant(settings), include_previous=processor.include_previous),
            max_new_tokens=processor.max_new_tokens,
            temperature=processor.temperature,
            token_budget=processor.token_budget,
            trusted_feedback=processor.trusted_feedback,
            grounded=GroundedConfig(min_episodes=processor.grounded_min_episodes),
        )

    def trusted(self, namespace: str):
        return trusted_sources(namespace, self.trusted_feedback)


def resolve_variant(settings: Settings) -> PromptVariant:
    """The extraction variant of ``processor.extraction_variant``; ``auto`` = ``grounded`` for the bundled
    default model (too small to abstract a lesson: its own extractions measured as noise), ``structured``
    (the paper's) for a model given by ``model.path``."""
    name = settings.processor.extraction_variant
    if name == "auto":
        return PromptVariant.grounded if settings.model.path is None else PromptVariant.structured
    return PromptVariant(name)


@dataclass
class BatchResult:
    """What one batch did."""

    update: ExperienceUpdate | None
    new_items: list[kb.ExperienceItem]
    deduplicated: int
    rejected: int
    skipped_episodes: list[str]
    extraction_seconds: float
    reused_extractions: int
    snapshot_tokens: int | None = None
    """Tokens of the new snapshot (None when the batch added nothing)."""


class KnowledgeWriter:
    """Extraction plus KB appends for the namespaces this worker owns. Batches of different namespaces may
    be processed from several threads at once (one namespace's batches one at a time, in order)."""

    def __init__(
        self,
        store: ObjectStore,
        backend: Backend | None,
        model_version: str,
        config: WriterConfig | None = None,
        count_tokens: kb.TokenCounter = kb.approx_tokens,
        clock: Callable[[], float] = time.time,
    ):
        self.store = store
        self.backend = backend
        self.model_version = model_version
        self.config = config or WriterConfig()
        self.count_tokens = count_tokens
        self.clock = clock
        self._io = ThreadPoolExecutor(max_workers=8, thread_name_prefix="oel-store")

    def _retrying(self) -> Retrying:
        return Retrying(
            stop=stop_after_attempt(self.config.attempts),
            wait=wait_exponential(multiplier=self.config.backoff_s, max=30),
            retry=retry_if_exception_type((BackendError, StoreError, OSError)),
            reraise=True,
            before_sleep=lambda rs: log.warning("extraction failed (%s); retrying", rs.outcome.exception()),
        )

    def _put_all(self, objects: list[tuple[str, object]]) -> list[bool]:
        """Write several JSON objects side by side (each idempotent, each retried); per object, whether
        it was new (False: the identical object was already there)."""
        if not objects:
            return []
        put = self._retrying()

        def one(item: tuple[str, object]) -> bool:
            return put(self.store.put_json, item[0], item[1])

        return list(self._io.map(one, objects))

    def _get_existing(self, keys: list[str]) -> dict[str, object]:
        """The JSON objects among ``keys`` that are already stored, looked up side by side."""
        retrying = self._retrying()

        def one(key: str) -> tuple[str, object] | None:
            return (key, retrying(self.store.get_json, key)) if retrying(self.store.exists, key) else None

        return dict(found for found in self._io.map(one, keys) if found is not None)

    def save_episodes(self, episodes: list[CompletedEpisode]) -> list[bool]:
        """Store episodes as training data (idempotent), in parallel; per episode, whether it was new."""
        return self._put_all([(ep.store_key, ep.model_dump(mode="json")) for ep in episodes])

    def _extract(
        self, episodes: list[CompletedEpisode], previous: list[str], seen_before: set[str] | None = None
    ) -> tuple[dict[str, dict], int, float]:
        """Model answers per episode id, reusing stored ones; returns (answers, reused count, model seconds).

        Only the batch's own keys are looked up (not a listing of the namespace, which grows with it),
        and of those only the episodes in ``seen_before`` (default: all): an extraction is stored after
        its episode, so an episode stored just now has none yet.
        """
        keys = {ep.episode_id: kb.extraction_key(ep.namespace, ep.episode_id) for ep in episodes}
        lookup = [key for eid, key in keys.items() if seen_before is None or eid in seen_before]
        stored = self._get_existing(lookup)
        answers: dict[str, dict] = {eid: stored[key] for eid, key in keys.items() if key in stored}
        todo = [ep for ep in episodes if ep.episode_id not in answers]
        reused = len(episodes) - len(todo)
        seconds = 0.0
        if todo:
            cfg = self.config
            prompts = [build_prompt(ep, previous, cfg.extraction) for ep in todo]
            seed = int(hashlib.sha256(",".join(ep.episode_id for ep in todo).encode()).hexdigest()[:8], 16)
            params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=seed)
            if self.backend is None:
                raise RuntimeError(f"the {cfg.extraction.variant.value} variant needs a model, and this writer has none")
            t0 = time.monotonic()
            # batches of several namespaces may call at once: the in-process backend serialises its calls, a
            # vLLM server batches them together
            outputs = self._retrying()(self.backend.generate, prompts, params)
            seconds = time.monotonic() - t0
            for ep, out in zip(todo, outputs, strict=True):
                answers[ep.episode_id] = {
                    "episode_id": ep.episode_id,
                    "model_version": self.model_version,
                    "variant": cfg.extraction.variant.value,
                    "include_previous": cfg.extraction.include_previous,
                    "output": out.text,
                }
            self._put_all([(keys[ep.episode_id], answers[ep.episode_id]) for ep in todo])
        return answers, reused, seconds

    def _grounded(self, episodes: list[CompletedEpisode], trusted, known: list[str]) -> list[kb.ExperienceItem]:
        """Items lifted from the batch's trusted feedback (:mod:`oel.grounded`; no model call), other than
        the ``known`` ones (the KB's)."""
        t0 = time.monotonic()
        found = grounded_items(episodes, trusted, self.config.grounded, known)
        if not trusted:
            log.info("%s: no trusted source, so the grounded variant extracts nothing", episodes[0].namespace)
        versions = {ep.episode_id: ep.model_version for ep in episodes}
        items = [
            kb.ExperienceItem(
                id=item_id(episodes[0].namespace, g.text),
                namespace=episodes[0].namespace,
                text=g.text,
                source_episode_ids=sorted(g.episode_ids),
                extracted_by=versions[g.episode_ids[0]],
                variant=PromptVariant.grounded.value,
                sources=list(g.fields),
            )
            for g in found
        ]
        # One record per episode, as for the model's variants: what extraction made of it (for audits, and for
        # whoever waits on the processor: an empty KB publishes no update).
        self._put_all(
            [
                (
                    kb.extraction_key(ep.namespace, ep.episode_id),
                    {
                        "episode_id": ep.episode_id,
                        "model_version": ep.model_version,
                        "variant": PromptVariant.grounded.value,
                        "include_previous": False,
                        "output": "",
                        "trusted": sorted(s.value for s in trusted),
                        "items": [g.text for g in found if ep.episode_id in g.episode_ids],
                        "batch": sorted(e.episode_id for e in episodes),
                    },
                )
                for ep in episodes
            ]
        )
        log.debug("grounded extraction of %d episodes: %d items in %.3f s", len(episodes), len(items), time.monotonic() - t0)
        return items

    def _from_model(
        self, episodes: list[CompletedEpisode], state: kb.KBState, seen_before: set[str], trusted
    ) -> tuple[list[kb.ExperienceItem], int, int, float]:
        """Items the model wrote about each episode, validated: (items, rejected, reused answers, model seconds)."""
        answers, reused, seconds = self._extract(episodes, state.window_texts, seen_before)
        items: list[kb.ExperienceItem] = []
        rejected = 0
        for ep in episodes:
            answer = answers[ep.episode_id]
            kept, bad = answer_items(answer["output"], PromptVariant(answer["variant"]), ep, trusted)
            rejected += len(bad)
            for reason in bad:
                log.info("episode %s: item rejected (%s): %.80s", ep.episode_id, reason.reason, reason.text)
            items.extend(
                kb.ExperienceItem(
                    id=item_id(ep.namespace, text),
                    namespace=ep.namespace,
                    text=text,
                    source_episode_ids=[ep.episode_id],
                    extracted_by=answer["model_version"],
                    variant=answer["variant"],
                    sources=["model:extraction"],
                )
                for text in kept
            )
        return items, rejected, reused, seconds

    def process_batch(self, state: kb.KBState, episodes: list[CompletedEpisode]) -> tuple[kb.KBState, BatchResult]:
        """Extract from a batch of one namespace's episodes and append the items; safe to call again on a replay."""
        assert all(ep.namespace == state.namespace for ep in episodes), "one namespace per batch"
        fresh = [ep for ep in episodes if ep.episode_id not in state.applied_episodes]
        skipped = [ep.episode_id for ep in episodes if ep.episode_id in state.applied_episodes]
        if not fresh:
            return state, BatchResult(None, [], 0, 0, skipped, 0.0, 0)
        new = self.save_episodes(fresh)
        trusted = self.config.trusted(state.namespace)
        if self.config.extraction.variant is PromptVariant.grounded:
            items, rejected, reused, seconds = self._grounded(fresh, trusted, state.window_texts), 0, 0, 0.0
        else:
            seen_before = {ep.episode_id for ep, was_new in zip(fresh, new, strict=True) if not was_new}
            items, rejected, reused, seconds = self._from_model(fresh, state, seen_before, trusted)
        new_state, snapshot, new_items, dedup = kb.append(
            state,
            items,
            episode_ids=[ep.episode_id for ep in fresh],
            budget=self.config.token_budget,
            count=self.count_tokens,
            as_of=max(ep.ended_at for ep in fresh),
        )
        if snapshot is not None:
            self._retrying()(kb.write_append, self.store, snapshot, new_items, self._put_all)
        # One update per batch, also when nothing was new, so consumers can follow progress;
        # none while the namespace has no KB version at all.
        update = None
        if new_state.version is not None:
            update = ExperienceUpdate(
                namespace=state.namespace,
                kb_version=new_state.version,
                new_item_ids=[i.id for i in new_items],
                total_items=len(new_state.all_ids),
                source_episode_ids=sorted(ep.episode_id for ep in fresh),
                ts=max(ep.ended_at for ep in fresh),
            )
        tokens = snapshot.tokens if snapshot is not None else None
        return new_state, BatchResult(update, new_items, dedup, rejected, skipped, seconds, reused, tokens)
