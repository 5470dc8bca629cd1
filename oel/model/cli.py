"""``oel model``: prepare and inspect the model every service uses."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from oel.cli_context import settings_of


@click.group("model")
def model() -> None:
    """The base model: the bundled SmolLM2-135M-Instruct (converted once from its GGUF) or OEL_MODEL__PATH."""


@model.command("prepare")
@click.option("--force", is_flag=True, help="Convert again even if the folder exists.")
@click.pass_context
def model_prepare(ctx: click.Context, force: bool) -> None:
    """Convert the bundled GGUF into a bfloat16 Hugging Face folder under the cache dir (once; idempotent)."""
    from oel.model.prepare import ModelPrepareError, model_hash, prepare_default_model

    s = settings_of(ctx)
    if s.model.path is not None and not force:
        click.echo(f"OEL_MODEL__PATH is set: using {s.model.path}; nothing to prepare (the default model is only used when it is unset)")
        return
    try:
        path, seconds = prepare_default_model(s, force=force)
    except ModelPrepareError as exc:
        raise click.ClickException(str(exc)) from None
    if seconds:
        click.echo(f"converted the default model into {path} in {seconds:.1f} s")
    else:
        click.echo(f"default model already prepared at {path}")
    click.echo(f"hash {model_hash(path)}")


@model.command("info")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.pass_context
def model_info(ctx: click.Context, as_json: bool) -> None:
    """Show which model folder is used, its architecture, size and hash (preparing the default model if needed)."""
    from oel.model.prepare import ModelPrepareError, model_hash, resolve_model_path

    s = settings_of(ctx)
    try:
        path = resolve_model_path(s)
    except ModelPrepareError as exc:
        raise click.ClickException(str(exc)) from None
    config = json.loads((path / "config.json").read_text())
    size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    info = {
        "path": str(path),
        "default": s.model.path is None,
        "model_type": config.get("model_type"),
        "architectures": config.get("architectures"),
        "hidden_size": config.get("hidden_size"),
        "num_hidden_layers": config.get("num_hidden_layers"),
        "vocab_size": config.get("vocab_size"),
        "dtype": config.get("dtype") or config.get("torch_dtype"),
        "size_mb": round(size / 1e6, 1),
        "hash": model_hash(path),
        "backend": s.model.backend,
    }
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            click.echo(f"{key:18s} {value}")


@model.command("generate")
@click.argument("prompt")
@click.option(
    "--adapter-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="A LoRA adapter folder to answer with.",
)
@click.option("--max-new-tokens", default=64, show_default=True)
@click.option("--temperature", default=0.0, show_default=True, help="0 = greedy.")
@click.option("--seed", type=int, default=None)
@click.pass_context
def model_generate(
    ctx: click.Context, prompt: str, adapter_dir: Path | None, max_new_tokens: int, temperature: float, seed: int | None
) -> None:
    """Answer one user PROMPT with the in-process backend (a quick check that the model works)."""
    from oel.model.backend import SamplingParams
    from oel.model.hf_backend import HFBackend
    from oel.schemas import ChatMessage

    backend = HFBackend.from_settings(settings_of(ctx))
    adapter = None
    if adapter_dir is not None:
        adapter = "cli"
        backend.load_adapter(adapter, adapter_dir)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    t0 = time.monotonic()
    g = backend.generate([[ChatMessage(role="user", content=prompt)]], params, adapter=adapter)[0]
    seconds = time.monotonic() - t0
    click.echo(g.text)
    click.echo(f"[{g.prompt_tokens} prompt + {g.response_tokens} response tokens, {g.finish_reason}, {seconds:.1f} s]", err=True)


BENCH_PROMPTS = [
    "Explain in two sentences why the sky is blue.",
    "Write a short poem about a lighthouse.",
    "List three uses of a paperclip.",
    "What should I pack for a day hike?",
    "Describe a cat to someone who has never seen one.",
    "Give me a tip for learning a new language.",
    "Why do we have seasons?",
    "Summarise the plot of a heist movie in one paragraph.",
]


@model.command("bench")
@click.option("--batch", "batches", multiple=True, type=int, default=(1, 8), show_default=True, help="Batch sizes to time.")
@click.option("--max-new-tokens", default=32, show_default=True)
@click.option("--repeats", default=2, show_default=True, help="Timed runs per batch size (after one warm-up).")
@click.pass_context
def model_bench(ctx: click.Context, batches: tuple[int, ...], max_new_tokens: int, repeats: int) -> None:
    """Generation throughput of the in-process backend: response tokens/s per batch size.

    Every row is forced to produce exactly --max-new-tokens tokens (EOS ignored) so runs are comparable.
    """
    from oel.model.backend import SamplingParams
    from oel.model.hf_backend import HFBackend
    from oel.schemas import ChatMessage

    backend = HFBackend.from_settings(settings_of(ctx), max_batch_size=max(batches))
    backend.eos_ids = [-1]  # no end token: always decode max_new_tokens
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    click.echo(f"model {backend.base_model} ({backend.model.dtype}), torch threads {torch_threads()}")
    for b in batches:
        convs = [[ChatMessage(role="user", content=BENCH_PROMPTS[i % len(BENCH_PROMPTS)])] for i in range(b)]
        backend.generate(convs, SamplingParams(max_new_tokens=4, temperature=0.0))  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.monotonic()
            gens = backend.generate(convs, params)
            times.append(time.monotonic() - t0)
        tokens = sum(g.response_tokens for g in gens)
        best = min(times)
        click.echo(f"batch {b:3d}: {tokens} tokens in {best:.2f} s (best of {repeats}) = {tokens / best:.1f} tok/s")


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()
