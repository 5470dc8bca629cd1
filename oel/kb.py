"""The knowledge base (KB) of a namespace: experience items and versioned snapshots in the object store.

Layout under the bucket::

    kb/<namespace>/items/<item id>.json          one immutable ExperienceItem
    kb/<namespace>/snapshots/<kb version>.json   one immutable KBSnapshot
    extractions/<namespace>/<episode id>.json    what the model answered for an episode (reused on replay)

Items are appended in order. A snapshot holds the newest items that fit the token budget; when the
KB outgrows it the *oldest* items are dropped, as the paper does (no other dedup than identical ids).
The version of a snapshot is derived from its parent version and the ids appended, so replaying the
same appends after a crash writes byte-identical objects under the same keys. One namespace has one
writer (its partition's owner), so no locking is needed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from oel.store import ObjectStore

TokenCounter = Callable[[str], int]


def approx_tokens(text: str) -> int:
    """A tokenizer-free estimate (about 4 characters a token), for when no tokenizer is at hand."""
    return max(1, (len(text) + 3) // 4)


class ExperienceItem(BaseModel):
    """One lesson learned, as stored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    namespace: str
    text: str
    source_episode_ids: list[str]
    extracted_by: str = Field(description="The model version that wrote it (grounded items: the model version of the episodes' agents).")
    variant: str = Field(
        description="Extraction variant: structured, unstructured (the model's words) or grounded (trusted feedback's words)."
    )
    sources: list[str] = Field(
        default_factory=list,
        description="Where the text comes from, as source:field (environment:step.feedback, ...); model:extraction = "
        "the model's own words about the episode. Empty on items stored before provenance was recorded.",
    )


class KBSnapshot(BaseModel):
    """The KB as used in context and by the learner at one version: items oldest first, within budget."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    namespace: str
    version: str
    seq: int
    parent_version: str | None
    item_ids: list[str]
    items: list[str]
    dropped_item_ids: list[str] = Field(description="Items over the budget, oldest first (still in the store).")
    tokens: int
    token_budget: int
    source_episode_ids: list[str] = Field(description="Episodes whose extraction produced this version.")
    as_of: datetime = Field(description="End time of the newest source episode (event time, so replays agree).")

    def render(self) -> str:
        return "\n".join(f"- {text}" for text in self.items)


class KBState(BaseModel):
    """What the single writer of a namespace remembers between appends (kept in a Faust table)."""

    model_config = ConfigDict(extra="forbid")

    namespace: str
    version: str | None = None
    seq: int = 0
    window_ids: list[str] = Field(default_factory=list, description="Items of the current snapshot, oldest first.")
    window_texts: list[str] = Field(default_factory=list)
    all_ids: list[str] = Field(default_factory=list, description="Every item id ever appended (for dedup).")
    applied_episodes: dict[str, str | None] = Field(
        default_factory=dict, description="Episode id -> KB version its extraction produced (replays are skipped)."
    )


def snapshot_key(namespace: str, version: str) -> str:
    return f"kb/{namespace}/snapshots/{version}.json"


def item_key(namespace: str, item: str) -> str:
    return f"kb/{namespace}/items/{item}.json"


def extraction_key(namespace: str, episode_id: str) -> str:
    return f"extractions/{namespace}/{episode_id}.json"


def next_version(parent: str | None, seq: int, new_ids: list[str]) -> str:
    digest = hashlib.sha256(((parent or "") + "|" + ",".join(new_ids)).encode()).hexdigest()[:12]
    return f"{seq:06d}-{digest}"


def fit_budget(ids: list[str], texts: list[str], budget: int, count: TokenCounter) -> tuple[list[str], list[str], list[str], int]:
    """Drop the oldest items until the rest fit ``budget`` tokens: (kept ids, kept texts, dropped ids, tokens)."""
    sizes = [count(f"- {t}\n") for t in texts]
    start, total = 0, sum(sizes)
    while total > budget and start < len(ids):
        total -= sizes[start]
        start += 1
    return ids[start:], texts[start:], ids[:start], total


def append(
    state: KBState,
    items: list[ExperienceItem],
    *,
    episode_ids: list[str],
    budget: int,
    count: TokenCounter,
    as_of: datetime,
) -> tuple[KBState, KBSnapshot | None, list[ExperienceItem], int]:
    """Append items; returns (new state, new snapshot or None if nothing new, new items, deduplicated count)."""
    seen = set(state.all_ids)
    new: list[ExperienceItem] = []
    for item in items:
        if item.id in seen:
            continue
        seen.add(item.id)
        new.append(item)
    deduplicated = len(items) - len(new)
    if not new:
        nxt = state.model_copy(deep=True)
        for ep in episode_ids:
            nxt.applied_episodes[ep] = state.version
        return nxt, None, [], deduplicated
    new_ids = [i.id for i in new]
    seq = state.seq + 1
    version = next_version(state.version, seq, new_ids)
    ids, texts, dropped, tokens = fit_budget(state.window_ids + new_ids, state.window_texts + [i.text for i in new], budget, count)
    snapshot = KBSnapshot(
        namespace=state.namespace,
        version=version,
        seq=seq,
        parent_version=state.version,
        item_ids=ids,
        items=texts,
        dropped_item_ids=dropped,
        tokens=tokens,
        token_budget=budget,
        source_episode_ids=sorted(episode_ids),
        as_of=as_of,
    )
    nxt = KBState(
        namespace=state.namespace,
        version=version,
        seq=seq,
        window_ids=ids,
        window_texts=texts,
        all_ids=state.all_ids + new_ids,
        applied_episodes={**state.applied_episodes, **{ep: version for ep in episode_ids}},
    )
    return nxt, snapshot, new, deduplicated


def write_append(
    store: ObjectStore,
    snapshot: KBSnapshot,
    new_items: list[ExperienceItem],
    put_many: Callable[[list[tuple[str, object]]], None] | None = None,
) -> None:
    """Persist the new items (``put_many`` may write them side by side), then the snapshot that names
    them, so a snapshot never points at nothing."""
    objects = [(item_key(i.namespace, i.id), i.model_dump(mode="json")) for i in new_items]
    if put_many is not None:
        put_many(objects)
    else:
        for key, obj in objects:
            store.put_json(key, obj)
    store.put_json(snapshot_key(snapshot.namespace, snapshot.version), snapshot.model_dump(mode="json"))


def latest_snapshot(store: ObjectStore, namespace: str) -> KBSnapshot | None:
    """The newest snapshot of a namespace (versions sort by their sequence prefix)."""
    keys = store.list(f"kb/{namespace}/snapshots/")
    return KBSnapshot.model_validate(store.get_json(keys[-1])) if keys else None


def load_snapshot(store: ObjectStore, namespace: str, version: str) -> KBSnapshot:
    return KBSnapshot.model_validate(store.get_json(snapshot_key(namespace, version)))
