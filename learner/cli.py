"""``oel learner``: the learner's commands. ``oel learner distill`` runs one OPCD consolidation from files."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from oel.settings import LearnerSettings, default_of


def _default(name: str) -> str:
    """``[default: OEL_LEARNER__<NAME>, <its default>]`` for the help of an option that falls back to a setting."""
    return f"[default: OEL_LEARNER__{name.upper()}, {default_of(LearnerSettings, name)}]"


log = logging.getLogger(__name__)


@click.group()
def learner() -> None:
    """The learner: consolidation of experience into the weights (OPCD)."""


@learner.command("run")
@click.pass_context
def run(ctx: click.Context) -> None:
    """The learner service, until SIGTERM or Ctrl-C: consume oel.experience, run a consolidation round
    when a namespace has enough new knowledge (OEL_LEARNER__MIN_NEW_ITEMS, OEL_LEARNER__COOLDOWN_S),
    gate it (OEL_LEARNER__GATE_*), store the version and publish it if accepted
    (OEL_LEARNER__AUTO_PROMOTE). Metrics on OEL_METRICS__PORT (default 9102)."""
    from learner.service import serve
    from oel.cli_context import settings_of

    serve(settings_of(ctx))


@learner.command("distill")
@click.option(
    "--prefixes",
    "prefixes_file",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JSON lines of training prefixes (chat conversations ending with a user message).",
)
@click.option(
    "--experience",
    "experience_files",
    required=True,
    multiple=True,
    type=click.Path(exists=True, path_type=Path),
    help="An experience set (.json/.jsonl/.txt, items oldest first). Repeat for K sets, or give a folder.",
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Output folder: the adapter (peft format) and opcd-summary.json.",
)
@click.option(
    "--model",
    "model_path",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="A local Hugging Face model folder [default: OEL_MODEL__PATH, else the bundled SmolLM2-135M-Instruct].",
)
@click.option(
    "--init-adapter",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Continue from this parent adapter; it is also the (frozen) teacher.",
)
@click.option("--steps", type=click.IntRange(min=1), default=None, help=f"Optimizer steps {_default('steps')}.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help=f"Prefixes per step {_default('batch_size')}.")
@click.option(
    "--lr",
    "learning_rate",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help=f"Peak AdamW learning rate {_default('learning_rate')[:-1]} for LoRA, 1e-6 for --full].",
)
@click.option(
    "--temperature", type=click.FloatRange(min=0, min_open=True), default=None, help=f"Sampling temperature {_default('temperature')}."
)
@click.option("--top-k", type=click.IntRange(min=1), default=None, help=f"Student top-k support of the KL {_default('top_k')}.")
@click.option("--full-vocab-kl", is_flag=True, help="Use the exact full-vocabulary reverse KL instead of the top-k one.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None, help=f"Longest sampled answer {_default('max_new_tokens')}.")
@click.option(
    "--max-prompt-tokens",
    type=click.IntRange(min=1),
    default=2048,
    show_default=True,
    help="Longer prefixes are left out (never truncated).",
)
@click.option(
    "--experience-budget",
    type=click.IntRange(min=16),
    default=None,
    help=f"Experience token budget; the oldest items over it are dropped and reported {_default('experience_token_budget')}.",
)
@click.option("--lora-rank", type=click.IntRange(min=1), default=None, help=f"LoRA rank {_default('lora_rank')}.")
@click.option("--full", "full_finetune", is_flag=True, help="Full fine-tune instead of LoRA (float32 weights, a frozen teacher copy).")
@click.option(
    "--experience-position",
    type=click.Choice(["first_user", "last_user"]),
    default="first_user",
    show_default=True,
    help="Which user message of a prefix gets the experience block in the teacher's context.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch threads [default: torch's choice].")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def distill(
    ctx: click.Context,
    prefixes_file: Path,
    experience_files: tuple[Path, ...],
    out_dir: Path,
    model_path: Path | None,
    init_adapter: Path | None,
    steps: int | None,
    batch_size: int | None,
    learning_rate: float | None,
    temperature: float | None,
    top_k: int | None,
    full_vocab_kl: bool,
    max_new_tokens: int | None,
    max_prompt_tokens: int,
    experience_budget: int | None,
    lora_rank: int | None,
    full_finetune: bool,
    experience_position: str,
    seed: int,
    threads: int | None,
    quiet: bool,
) -> None:
    """Run one on-policy context distillation (OPCD) round from files.

    The student (no experience in context) answers each training prefix once; the frozen teacher
    (the round-start weights) scores those answer tokens with one of the experience sets in context;
    the student minimises the reverse KL to it. Writes the adapter and opcd-summary.json to --out.

    \b
    PREFIXES: JSON lines, one conversation per line, ending with a user message:
      [{"role": "system", "content": "..."}, {"role": "user", "content": "..."}]
      or {"prompt": [...]} / {"messages": [...]}, or a plain string (one user message).
    EXPERIENCE: one file per experience set (one of the K extraction runs), items oldest first:
      .json   ["item", ...]  or  [{"text": "item"}, ...]  or  {"items": [...]}
      .jsonl  one JSON string or {"text": ...} per line
      .txt    one item per line ("- EXPERIENCE ITEM:" / "- " markers stripped, "#" lines ignored)
    """
    from learner.opcd import DataError, OPCDConfig, load_experience_sets, load_prefixes
    from oel.cli_context import settings_of

    settings = settings_of(ctx)
    overrides: dict = {
        "finetune": "full" if full_finetune else "lora",
        "max_prompt_tokens": max_prompt_tokens,
        "experience_position": experience_position,
        "seed": seed,
        "num_threads": threads,
        "init_adapter": init_adapter,
    }
    for name, value in (
        ("model_path", model_path),
        ("steps", steps),
        ("batch_size", batch_size),
        ("temperature", temperature),
        ("top_k", top_k),
        ("max_new_tokens", max_new_tokens),
        ("experience_token_budget", experience_budget),
        ("lora_rank", lora_rank),
    ):
        if value is not None:
            overrides[name] = value
    if full_vocab_kl:
        overrides["top_k"] = None
    # The settings' learning rate is the LoRA default; a full fine-tune takes the paper's 1e-6 unless --lr says otherwise.
    overrides["learning_rate"] = learning_rate if learning_rate is not None else (None if full_finetune else settings.learner.learning_rate)
    try:
        config = OPCDConfig.from_settings(settings, **overrides)
        prefixes = load_prefixes(prefixes_file)
        experience = load_experience_sets(experience_files)
    except (DataError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None

    click.echo(
        f"OPCD: {len(prefixes)} prefixes, {len(experience)} experience sets, {config.steps} steps x {config.batch_size}, "
        f"{config.finetune}, lr {config.effective_learning_rate:g}",
        err=True,
    )
    # This command reports progress, experience cuts and skipped prefixes itself (bar + lines below);
    # the trainer's own log lines would interleave with the bar.
    trainer_log = logging.getLogger("learner.opcd.trainer")
    level = trainer_log.level
    trainer_log.setLevel(logging.ERROR)
    try:
        _distill(config, prefixes, experience, out_dir, quiet)
    finally:
        trainer_log.setLevel(level)


def _distill(config, prefixes, experience, out_dir: Path, quiet: bool) -> None:
    from tqdm import tqdm

    from learner.opcd import DataError, OPCDTrainer

    try:
        trainer = OPCDTrainer(config, prefixes, experience)
    except DataError as exc:
        raise click.ClickException(str(exc)) from None
    for cut in trainer.experience_cuts:
        click.echo(f"warning: {cut.describe()}", err=True)
    if trainer.skipped_prefixes:
        click.echo(f"warning: left out {trainer.skipped_prefixes} prefixes longer than {config.max_prompt_tokens} tokens", err=True)

    bar = tqdm(total=config.steps, desc="opcd", unit="step", disable=quiet, file=sys.stderr, dynamic_ncols=True)

    def on_step(m) -> None:
        bar.set_postfix(loss=f"{m.loss:.4f}", kl=f"{m.kl:.4f}", tok_s=f"{m.tokens_per_s:.0f}")
        bar.update(1)
        bar.write(f"step {m.step:4d}  loss {m.loss:.5f}  kl {m.kl:.5f}  tokens {m.response_tokens:5d}  {m.tokens_per_s:7.1f} tok/s")

    try:
        result = trainer.train(callback=on_step)
    finally:
        bar.close()
    path = trainer.save(out_dir, result)
    summary = result.to_dict()
    click.echo(
        json.dumps(
            {
                "out": str(path),
                "steps": len(result.steps),
                "first_loss": summary["first_loss"],
                "last_loss": summary["last_loss"],
                "response_tokens": summary["response_tokens"],
                "tokens_per_s": round(summary["tokens_per_s"], 2),
                "experience_items_dropped": sum(c.items_dropped for c in result.experience_cuts),
                "skipped_prefixes": result.skipped_prefixes,
                "checks": [(c.step, round(c.agreement, 3)) for c in result.checks],
                "kept_step": result.kept_step,
                "seconds": round(result.seconds, 1),
            }
        )
    )
