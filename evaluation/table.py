"""The paper's table for one namespace: per round, without experience, with it in context, consolidated.

For every version of the namespace in the registry (one per round, oldest generation first, whatever
its status), :func:`eval_table` measures on the held-out seeds of the namespace's environment:

``none``          the round-start weights (the parent version, or the base model for the first
                  round) with no experience in context;
``in context``    the same weights with the round's KB snapshot (the manifest's ``kb_version``) in
                  the agent prompt;
``consolidated``  the version's own adapter, with no experience in context (none for a round the
                  knowledge gate skipped: it trained nothing).

Each cell is the pass rate, with its binomial standard error, and the mean response tokens per turn.
Rounds are numbered in the order they ran (a rejected or skipped round counts too). Results come from (and go to) the
evaluation cache (:class:`evaluation.evaluator.EvalCache`), so numbers the gate already measured, and a
round's ``consolidated`` that is the next round's ``none``, are not measured again.
:meth:`EvalTable.to_markdown` and :meth:`EvalTable.plot` render it (``oel eval`` does both).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from evaluation.evaluator import EvalSpec, Evaluator
from learner.versions import ModelRegistry
from oel.kb import load_snapshot
from oel.model.backend import Backend
from oel.store import ObjectNotFound, ObjectStore

CONDITIONS = ("none", "in_context", "consolidated")
LABELS = {"none": "no experience", "in_context": "experience in context", "consolidated": "consolidated"}


@dataclass
class EvalRow:
    """One round: the version it produced and the three measured conditions (summaries of
    :class:`evaluation.evaluator.EvalResult`)."""

    round: int
    version: str
    status: str
    parent: str | None
    kb_version: str
    kb_items: int
    none: dict[str, Any]
    in_context: dict[str, Any]
    consolidated: dict[str, Any] | None
    """None for a skipped round (no adapter)."""
    ood: float | None = None
    """The version's OOD instruction-following score (:mod:`evaluation.ood`), when asked for."""
    variants: dict[str, int] = field(default_factory=dict)
    """How the KB's items were extracted (variant -> items; from the manifest's provenance)."""


def stderr(cell: dict[str, Any] | None) -> float | None:
    """Binomial standard error of a cell's pass rate, sqrt(p(1-p)/n) (None for a missing cell)."""
    if cell is None or not cell.get("n_episodes"):
        return None
    p, n = cell["pass_rate"], cell["n_episodes"]
    return math.sqrt(p * (1 - p) / n)


def _cell(c: dict[str, Any] | None) -> str:
    if c is None:
        return "—"
    return f"{100 * c['pass_rate']:.1f}% ± {100 * stderr(c):.1f} ({c['passed']}/{c['n_episodes']})"


@dataclass
class EvalTable:
    """The table of a namespace (module docstring)."""

    namespace: str
    env: str
    spec: dict[str, Any]
    rows: list[EvalRow] = field(default_factory=list)
    base_ood: float | None = None
    """The base model's OOD score, when asked for."""

    def to_dict(self) -> dict[str, Any]:
        rows = []
        for r in self.rows:
            row = asdict(r)
            for cond in CONDITIONS:
                if row[cond] is not None:
                    row[cond]["stderr"] = stderr(row[cond])
            rows.append(row)
        return {"namespace": self.namespace, "env": self.env, "spec": self.spec, "base_ood": self.base_ood, "rows": rows}

    def to_markdown(self) -> str:
        """A markdown table: pass rate (passed/episodes) and mean response tokens per condition and round."""
        s = self.spec
        with_ood = self.base_ood is not None
        lines = [
            f"Namespace `{self.namespace}` on `{self.env}`: {s['episodes']} held-out episodes per cell, "
            f"mode {s['mode']}, greedy. Pass rate ± its standard error (passed/episodes) and mean response tokens per turn."
            + (f" OOD: instruction-following score of the version (base model: {100 * self.base_ood:.1f}%)." if with_ood else ""),
            "",
            "| round | version | status | KB version (items, variant) | pass: none | pass: in context | pass: consolidated "
            "| tokens: none | tokens: in context | tokens: consolidated |" + (" OOD |" if with_ood else ""),
            "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if with_ood else ""),
        ]
        for r in self.rows:
            cells = [getattr(r, c) for c in CONDITIONS]
            variants = ", ".join(f"{n} {v}" for v, n in sorted(r.variants.items())) or f"{r.kb_items}"
            lines.append(
                f"| {r.round} | {r.version} | {r.status} | {r.kb_version} ({variants}) | "
                + " | ".join(_cell(c) for c in cells)
                + " | "
                + " | ".join(_tokens(c["mean_response_tokens"] if c else None) for c in cells)
                + " |"
                + (f" {'n/a' if r.ood is None else f'{100 * r.ood:.1f}%'} |" if with_ood else "")
            )
        return "\n".join(lines) + "\n"

    def plot(self, path: str | Path) -> Path:
        """A PNG: pass rate (with standard-error bars) and mean response tokens per round, one line per
        condition; each round's status (promoted, rejected, skipped...) is written under its point, and the
        base model's and each version's OOD score are drawn when known."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        rounds = [r.round for r in self.rows]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
        for cond, marker in zip(CONDITIONS, ("o", "s", "^")):
            pts = [(r.round, getattr(r, cond)) for r in self.rows if getattr(r, cond) is not None]
            if not pts:
                continue
            xs = [x for x, _ in pts]
            ax1.errorbar(
                xs,
                [100 * c["pass_rate"] for _, c in pts],
                yerr=[100 * stderr(c) for _, c in pts],
                marker=marker,
                capsize=4,
                label=LABELS[cond],
            )
            ax2.plot(xs, [c["mean_response_tokens"] for _, c in pts], marker=marker, label=LABELS[cond])
        if self.base_ood is not None:
            ax1.axhline(100 * self.base_ood, color="grey", linestyle=":", label="OOD score, base model")
            ood = [(r.round, r.ood) for r in self.rows if r.ood is not None]
            if ood:
                ax1.plot([x for x, _ in ood], [100 * v for _, v in ood], "x", color="grey", label="OOD score, version")
        for r in self.rows:
            ax1.annotate(
                r.status,
                (r.round, 0),
                textcoords="offset points",
                xytext=(0, 4),
                ha="center",
                fontsize=8,
                color={"promoted": "green", "rejected": "red", "skipped": "orange"}.get(r.status, "black"),
            )
        ax1.set(title="held-out pass rate (± standard error)", xlabel="round", ylabel="pass rate (%)")
        ax2.set(title="mean response tokens per turn", xlabel="round", ylabel="tokens")
        for ax in (ax1, ax2):
            ax.set_xticks(rounds)
            ax.grid(alpha=0.3)
        cells = [c for r in self.rows for c in (getattr(r, k) for k in CONDITIONS) if c is not None]
        top = max([100 * (c["pass_rate"] + (stderr(c) or 0)) for c in cells] + [100 * (self.base_ood or 0), 0.0])
        ax1.set_ylim(0, min(100.0, max(10.0, 1.15 * top)))
        tokens = [c["mean_response_tokens"] for c in cells]
        tokens = [t for t in tokens if t is not None and not math.isnan(t)]
        ax2.set_ylim(0, 1.15 * max(tokens + [1.0]))
        ax1.legend(fontsize=8, loc="upper left")
        fig.suptitle(f"{self.namespace} on {self.env} ({self.spec['episodes']} held-out episodes, {self.spec['mode']})")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """Write ``eval-<namespace>.md``, ``.png`` and ``.json`` into ``out_dir``; returns the paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {
            "markdown": out / f"eval-{self.namespace}.md",
            "png": out / f"eval-{self.namespace}.png",
            "json": out / f"eval-{self.namespace}.json",
        }
        paths["markdown"].write_text(self.to_markdown())
        self.plot(paths["png"])
        paths["json"].write_text(json.dumps(self.to_dict(), indent=2))
        return paths


def _tokens(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1f}"


def kb_items(store: ObjectStore, namespace: str, kb_version: str) -> list[str]:
    """The items of a KB snapshot (empty when the snapshot is not in the store)."""
    try:
        return list(load_snapshot(store, namespace, kb_version).items)
    except ObjectNotFound:
        return []


def eval_table(
    store: ObjectStore,
    backend: Backend | Callable[[], Backend],
    namespace: str,
    spec: EvalSpec,
    *,
    registry: ModelRegistry | None = None,
    evaluator: Evaluator | None = None,
    progress: Callable[[str], None] | None = None,
    ood: bool = False,
) -> EvalTable:
    """Measure the table of ``namespace`` (module docstring); ``progress`` gets a line per cell. With
    ``ood``, also each version's and the base model's OOD instruction-following score. ``backend``: the
    backend, or a function that makes it when first needed; an ``evaluator`` given brings its own."""
    registry = registry or ModelRegistry(store)
    evaluator = evaluator or Evaluator(store, backend, registry)
    records = registry.list(namespace)
    if not records:
        raise ValueError(f"namespace {namespace!r} has no model versions in the registry")
    table = EvalTable(namespace=namespace, env=spec.env, spec=spec.to_dict())
    for number, rec in enumerate(sorted(records, key=lambda r: r.manifest.created_at), start=1):
        m = rec.manifest
        items = kb_items(store, namespace, m.kb_version)
        trained = m.adapter_uri is not None
        cells: dict[str, dict[str, Any] | None] = {"consolidated": None}
        for cond, version, experience in (
            ("none", m.parent_version, None),
            ("in_context", m.parent_version, items),
            ("consolidated", m.version, None),
        ):
            if cond == "consolidated" and not trained:
                continue
            if progress is not None:
                progress(f"round {number} {m.version}: {LABELS[cond]}")
            cells[cond] = evaluator.policy_of(spec, namespace, version, m.base_model_hash, experience)
        ood_score = None
        if ood:
            if table.base_ood is None:
                table.base_ood = evaluator.ood_of(namespace, None, m.base_model_hash)["score"]
            if trained:
                ood_score = evaluator.ood_of(namespace, m.version, m.base_model_hash)["score"]
        table.rows.append(
            EvalRow(
                round=number,
                version=m.version,
                status=rec.status.value,
                parent=m.parent_version,
                kb_version=m.kb_version,
                kb_items=len(items),
                **cells,
                ood=ood_score,
                variants=dict(m.knowledge.get("variants", {})),
            )
        )
    return table
